#!/usr/bin/env bash
# Create or update the CosyVoice *test* environment: a separate venv (default .venv-cosyvoice) with the
# project, CPU-capable torch + torchaudio, the PyPI copy of the CosyVoice library (cosyvoice2-eu, without
# its heavy pins) and only the packages its code path imports. Idempotent: a second run with nothing
# changed returns in about a second.
#
#   scripts/setup-cosyvoice-env.sh            # then: .venv-cosyvoice/bin/python -m pytest tests/test_cosyvoice_engine.py
#   COSYVOICE_VENV=/somewhere scripts/setup-cosyvoice-env.sh
#
# This is for tests on a CPU. GPU users install with pixi (`pixi run -e gpu ...`), see docs/gpu.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COSYVOICE_VENV:-$ROOT/.venv-cosyvoice}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# torch 2.13 (the CPU wheel on these machines) has no matching torchaudio on PyPI (torchaudio stops at
# 2.11, whose native library fails to load beside torch 2.13); the 2.11 pair works on a CPU.
PINS=(
  "torch==2.11.0" "torchaudio==2.11.0"
)
LIBRARY="cosyvoice2-eu==0.2.8"  # vendors upstream cosyvoice/ and matcha/ (pre-Dec-2025: tensor prompts)
# What `from cosyvoice.cli.cosyvoice import CosyVoice2` and the tiny model's load/inference import.
DEPS=(
  "HyperPyYAML==1.2.3" "modelscope==1.40.2" "onnxruntime==1.32.0" "openai-whisper==20250625"
  "inflect==7.6.0" "WeTextProcessing==1.2.0" "transformers==5.24.0" "omegaconf==2.3.1" "scipy==1.17.1"
  "diffusers==0.42.1" "conformer==0.3.2" "einops==0.8.2" "librosa==0.11.0" "hydra-core==1.3.8"
  "lightning==2.6.6" "gdown==6.5.1" "matplotlib==3.11.2" "wget==3.2" "tqdm==4.70.1"
  "onnx==1.23.2"  # the tests write the tiny model's ONNX stand-ins
)

STAMP="$VENV/.cosy-setup"
want="$( { cat "${BASH_SOURCE[0]}" "$ROOT/pyproject.toml"; echo "$ROOT"; } | sha256sum | cut -d' ' -f1)"
installed() {  # fast: package metadata only
  "$VENV/bin/python" -c "import importlib.metadata as m; [m.version(p) for p in ('torch', 'torchaudio', 'cosyvoice2-eu', 'onnx', 'cosy-tts')]" >/dev/null 2>&1
}
imports() { "$VENV/bin/python" -c "import torch, torchaudio, cosyvoice.cli.cosyvoice, onnx, cosy" >/dev/null 2>&1; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && installed; then
  echo "setup-cosyvoice-env: $VENV is up to date"
  exit 0
fi

t0=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # never committed, whatever the repository's .gitignore says
constraints="$VENV/constraints.txt"
printf '%s\n' "${PINS[@]}" > "$constraints"  # pin torch in every call, or pip may move it

pip() {  # quiet, but show everything when pip fails; pip's complaints about cosyvoice2-eu's unmet pins are expected
  local out
  if ! out="$("$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1)"; then
    echo "$out" >&2
    return 1
  fi
  grep -v -e '^WARNING: Location' -e 'which is not installed' -e 'which is incompatible' \
       -e 'dependency resolver' -e '^ERROR: pip' -e '^$' <<<"$out" || true
}

pip install -c "$constraints" "${PINS[@]}"
pip install --no-deps "$LIBRARY"
pip install -c "$constraints" "${DEPS[@]}" -e "$ROOT[http,test]"  # http: tests/test_cosyvoice_gateway.py

if ! imports; then
  echo "setup-cosyvoice-env: the environment does not import; try: $VENV/bin/python -c 'import cosyvoice.cli.cosyvoice'" >&2
  exit 1
fi
echo "$want" > "$STAMP"
echo "setup-cosyvoice-env: ready in $((SECONDS - t0)) s: $VENV"
