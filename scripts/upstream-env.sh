#!/usr/bin/env bash
# A local environment to run the CosyVoice tests against *upstream* CosyVoice (FunAudioLLM/CosyVoice, which
# has CosyVoice3) instead of the PyPI fork cosyvoice2-eu that CI uses. Never used in CI; no upstream code here.
#
#   scripts/upstream-env.sh /path/to/CosyVoice        # or COSYVOICE_SRC=/path/to/CosyVoice scripts/upstream-env.sh
#
# The venv (default: venv-upstream beside this checkout; COSYVOICE_UPSTREAM_VENV to change) is the test venv of
# scripts/setup-cosyvoice-env.sh plus what upstream imports and the fork does not. Upstream's package wins over
# the fork's through PYTHONPATH (the fork still provides matcha). Idempotent: a second run only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$(cd "${1:-${COSYVOICE_SRC:?give the upstream checkout: scripts/upstream-env.sh DIR (or COSYVOICE_SRC)}}" && pwd)"
VENV="${COSYVOICE_UPSTREAM_VENV:-$(dirname "$ROOT")/venv-upstream}"
[[ -f "$SRC/cosyvoice/cli/cosyvoice.py" ]] || { echo "upstream-env: $SRC is no CosyVoice checkout" >&2; exit 1; }

# x-transformers: the CosyVoice3 DiT flow. torchcodec: torchaudio 2.11's load() (upstream's load_wav) needs it,
# with FFmpeg's shared libraries (Debian 12's FFmpeg 5 works). Not wetext: upstream's frontend would pick it and
# download its FSTs from modelscope on every model load (about 20 s of retries offline); without it the frontend
# falls back to no text normalisation, as the tests expect (they pass text_frontend=False anyway).
EXTRAS=("x-transformers==2.11.24" "torchcodec==0.11.1")
FFMPEG_LIBS=(libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4)

COSYVOICE_VENV="$VENV" bash "$ROOT/scripts/setup-cosyvoice-env.sh"
if ! ldconfig -p | grep -q 'libavdevice\.so\.59'; then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${FFMPEG_LIBS[@]}" >/dev/null
  else
    echo "upstream-env: FFmpeg 5 libraries missing, for torchcodec: apt-get install ${FFMPEG_LIBS[*]}" >&2
  fi
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m; [m.version(p) for p in ('x-transformers', 'torchcodec')]" 2>/dev/null; then
  out="$("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$VENV/constraints.txt" "${EXTRAS[@]}" 2>&1)" \
    || { echo "$out" >&2; exit 1; }
fi

PYTHONPATH="$SRC" "$VENV/bin/python" - "$SRC" <<'EOF'
import sys, cosyvoice, torchcodec  # noqa: F401 - torchcodec: its FFmpeg libraries load
from cosyvoice.cli.cosyvoice import CosyVoice2, CosyVoice3  # noqa: F401
assert cosyvoice.__file__.startswith(sys.argv[1]), f"cosyvoice from {cosyvoice.__file__}, not the checkout"
EOF
echo "upstream-env: ready. Run the tests against upstream with:"
echo "  cd $ROOT && PYTHONPATH=$SRC $VENV/bin/python -m pytest -q -p no:cacheprovider tests/test_cosyvoice_engine.py"
