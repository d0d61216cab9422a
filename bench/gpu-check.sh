#!/usr/bin/env bash
# bench/gpu-check.sh: ONE command for a GPU machine with no network: `cosy bench gpu` (the cosyvoice engine's
# two schedulers, the library's own loop against cosy's pipeline) on a CosyVoice2-0.5B-shaped model with random
# weights, then a one-screen summary. The same command runs here on the CPU (--device cpu) to prove the whole path,
# so that the only thing a GPU run can find is speed.
#
#   bench/gpu-check.sh --prepare [--python-version 3.12]   # HERE (PyPI): wheels into bench/.wheels (< 64 MiB);
#                                                          # another X.Y[.Z]: bench/.wheels-cpXY
#   bench/gpu-check.sh                                     # THERE: cuda, full model, 1/4/8/16 streams, 1 job each
#   bench/gpu-check.sh --device cpu --model tiny           # here: the same path on the tests' tiny model
#   bench/gpu-check.sh --device cpu --model full --streams 1 --text Hi
#
# Options: --device cuda|cpu (cuda), --model full|tiny (full), --streams 1,4,8,16 (cuda; cpu: 1,4,8),
#   --text TEXT (cuda: "Hi."; cpu: "Hello there."), --jobs 1|2 jobs per stream (1: the bench's --quick),
#   --out DIR ($OUT where set, as on the device tool's machine, else $WORK/results), --budget SECONDS (cuda: 450,
#   cpu: none; 0 = none), --wheels DIR, --fresh (remake the work folder). Environment: PYTHON (python3), the
#   interpreter that holds torch; COSY_GPU_CHECK_WORK (/tmp/cosy-gpu-check): site packages, links, models, caches.
#
# Through the device tool: run `bench/gpu-check.sh --prepare` here, then
#   run(command="bash bench/gpu-check.sh", carry=["bench/.wheels"], timeout_s=540)
# gpu.json, gpu.png, gpu-check.log and summary.txt come back from $OUT.
#
# Budget (cuda default, an H100/H200): about 8 minutes in all. Wheels ~10 s; the model ~30 s (bench/full_cosyvoice.py);
# each scheduler loads in ~30 s and warms up; cosy runs first (its rows matter most), the library second: on an
# H100 it runs at RTF ~2 whatever the streams (docs/performance.md), so 1+4+8+16 jobs of "Hi." (3 bytes = 60 tokens
# = 2.4 s of audio each) take it ~2.5 minutes, and "Hello." twice that. The bench is stopped at --budget seconds
# after the start (450 s): the summary then shows the rows measured so far, from the log.
#
# How the machine is used: its python3 (a venv there: /opt/torch/.venv) keeps its own torch, transformers,
# onnxruntime...; the wheels this machine lacks are installed with `pip install --no-index --no-deps --target`
# into $WORK/site (a venv made from a venv would not see the first venv's packages, --system-site-packages or
# not); the project goes on PYTHONPATH as links in $WORK/src (its package-dir layout, nothing built). Packages
# that cannot travel (WeTextProcessing/pynini, librosa's numba, scipy's 37 MB, whisper's numba, modelscope) get
# the stand-ins of bench/gpu_shims/ (package cosy_gpu_shims, for the random-model timing only), each only where
# the real module does not import: the library's own imports of it are pointed there in its private copy in
# $WORK/site, and no other package sees a stand-in (bench/gpu_shims/README.md).
#
# Exit status: 0 the benchmark ran (every row, no failed job), whatever the targets; 3 it ran in part (cut by the
# budget, a child died, or jobs failed); 4 it measured nothing; 1 setup failed (no torch, no CUDA, no wheels, a
# missing import); 2 usage; 130 interrupted.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${COSY_GPU_CHECK_WORK:-${TMPDIR:-/tmp}/cosy-gpu-check}"
LIMIT_MIB=64

# The wheels the CosyVoice library's load and synthesis path needs beyond torch/transformers/onnxruntime/numpy/
# msgpack/typer/rich (the versions scripts/setup-cosyvoice-env.sh's environment runs the tests with).
BINARY_PINS=(
  "cosyvoice2-eu==0.2.8"                                       # the library (pure Python), installed --no-deps
  "torchaudio==2.11.0"                                         # kaldi fbank, resampling (beside torch 2.11)
  "HyperPyYAML==1.2.3" "ruamel.yaml==0.18.17" "ruamel.yaml.clib==0.2.15"  # the model's config
  "omegaconf==2.3.1"                                           # the config's cfm_params (+ antlr4, below)
  "diffusers==0.42.1" "importlib_metadata==10.2.0" "zipp==4.1.2" "pillow==13.0.0"  # matcha's decoder blocks
  "requests==2.34.2" "urllib3==2.8.0" "charset-normalizer==3.5.3" "idna==3.20" "certifi==2026.10.19.post1"
  "einops==0.8.2" "conformer==0.3.2"                           # matcha / the flow
  "inflect==7.6.0" "more-itertools==11.2.1" "typeguard==4.6.1" "jaraco.functools==4.6.0"  # the frontend
  "tiktoken==0.14.0"                                           # imported by the library's tokenizer module
  "onnx==1.23.2" "ml_dtypes==0.6.0"                            # the model generator writes two ONNX stand-ins
  "soundfile==0.14.0" "cffi==2.1.1" "pycparser==3.12"          # the engine reads the voice's reference wav
  "pyzmq==27.3.0"                                              # cosy.bench.common (the machine's facts)
  # matcha/utils/__init__.py (imported by the flow) pulls in its training helpers: hydra, lightning, gdown, wget,
  # matplotlib.pyplot.
  "hydra-core==1.3.8" "lightning==2.6.6" "lightning-utilities==0.15.3" "torchmetrics==1.9.0"
  "gdown==6.5.1" "beautifulsoup4==4.15.0" "soupsieve==4.1.3"
  "matplotlib==3.11.2" "contourpy==1.3.3" "cycler==0.12.1" "fonttools==4.68.0" "kiwisolver==1.5.1"
  "pyparsing==3.3.3" "python-dateutil==4.0.0" "six==1.17.0"
)
SOURCE_PINS=("antlr4-python3-runtime==4.9.3" "wget==3.2")     # sdists only: built here into py3 wheels
# Stand-ins: folder in bench/gpu_shims, and the modules that must import for the real package to be used.
SHIMS=("scipy:scipy.signal,scipy.io.wavfile" "librosa:librosa.filters" "whisper:whisper,whisper.tokenizer"
       "tn:tn.chinese.normalizer,tn.english.normalizer" "modelscope:modelscope")

die() { echo "gpu-check: $*" >&2; exit "${2:-1}"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

prepare=0 pyver=3.12 device=cuda model=full streams="" text="" jobs=1 out="" budget="" wheels="" fresh=0
while (($#)); do
  case "$1" in
    --prepare) prepare=1 ;;
    --python-version) pyver="${2:?}"; shift ;;
    --device) device="${2:?}"; shift ;;
    --model) model="${2:?}"; shift ;;
    --streams) streams="${2:?}"; shift ;;
    --text) text="${2:?}"; shift ;;
    --jobs) jobs="${2:?}"; shift ;;
    --out) out="${2:?}"; shift ;;
    --budget) budget="${2:?}"; shift ;;
    --wheels) wheels="${2:?}"; shift ;;
    --fresh) fresh=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" 2 ;;
  esac
  shift
done

# --- --prepare (here, with PyPI): the wheel set for the target python ------------------------------------------
if ((prepare)); then
  [[ "$pyver" =~ ^3\.([0-9]+)(\.[0-9]+)?$ ]] || die "--python-version X.Y or X.Y.Z, not $pyver" 2
  tag="cp3${BASH_REMATCH[1]}"  # X.Y.Z where a wheel's Requires-Python needs it (soupsieve: >= 3.11.5)
  dest="${wheels:-$ROOT/bench/.wheels$([[ "$tag" == cp312 ]] || echo "-$tag")}"
  want="$( { printf '%s\n' "$tag" "${BINARY_PINS[@]}" "${SOURCE_PINS[@]}"; } | sha256sum | cut -d' ' -f1)"
  if [[ -f "$dest/.stamp" && "$(cat "$dest/.stamp")" == "$want" ]]; then
    echo "gpu-check: $dest is up to date"
  else
    tmp="$dest.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
      platforms+=(--platform "${p}_x86_64")
    done
    echo "gpu-check: downloading ${#BINARY_PINS[@]} wheels for $tag x86_64 into $dest"
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$pyver" --implementation cp --abi "$tag" "${platforms[@]}" -d "$tmp" "${BINARY_PINS[@]}" \
      2>&1 | grep -v '^WARNING: Location' || true
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp" "${SOURCE_PINS[@]}" \
      2>&1 | grep -v '^WARNING: Location' || true
    n=$(find "$tmp" -name '*.whl' | wc -l)
    ((n == ${#BINARY_PINS[@]} + ${#SOURCE_PINS[@]})) || die "expected $((${#BINARY_PINS[@]} + ${#SOURCE_PINS[@]})) wheels, got $n in $tmp"
    echo "$tag" > "$tmp/TARGET"
    echo "$want" > "$tmp/.stamp"
    rm -rf "$dest" && mv "$tmp" "$dest"
  fi
  bytes=$(du -sb "$dest" | cut -f1)
  tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  ls -1 "$dest" | grep '\.whl$' | sed 's/^/  /'
  echo "gpu-check: $dest: $(ls "$dest" | grep -c '\.whl$') wheels, $(mib "$bytes") (the working tree adds $(mib "$tree"); the device tool carries $LIMIT_MIB MiB in all)"
  ((bytes + tree < LIMIT_MIB * 1048576)) || die "over $LIMIT_MIB MiB"
  exit 0
fi

# --- the check -----------------------------------------------------------------------------------------------------
t_start=$SECONDS
case "$device" in cuda|cpu) ;; *) die "--device cuda or cpu, not $device" 2 ;; esac
case "$model" in full|tiny) ;; *) die "--model full or tiny, not $model" 2 ;; esac
case "$jobs" in 1|2) ;; *) die "--jobs 1 or 2, not $jobs" 2 ;; esac
if [[ "$device" == cuda ]]; then
  streams="${streams:-1,4,8,16}" text="${text:-Hi.}" budget="${budget:-450}"
else
  streams="${streams:-1,4,8}" text="${text:-Hello there.}" budget="${budget:-0}"
fi
[[ "$streams" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--streams like 1,4,8,16, not $streams" 2
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget SECONDS, not $budget" 2
command -v "$PYTHON" >/dev/null || die "no $PYTHON (set PYTHON to the interpreter that holds torch)"
pytag="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
"$PYTHON" -c 'import torch' 2>/dev/null || die "$PYTHON has no torch"
if [[ -z "$wheels" ]]; then
  wheels="$ROOT/bench/.wheels"
  [[ -d "$ROOT/bench/.wheels-$pytag" ]] && wheels="$ROOT/bench/.wheels-$pytag"
fi
[[ -f "$wheels/TARGET" ]] || die "no wheels in $wheels: run bench/gpu-check.sh --prepare where PyPI is reachable, and carry bench/.wheels"
[[ "$(cat "$wheels/TARGET")" == "$pytag" ]] || die "$wheels holds $(cat "$wheels/TARGET") wheels, $PYTHON is $pytag (--prepare --python-version)"
out="${out:-${OUT:-$WORK/results}}"
((fresh)) && rm -rf "$WORK"
mkdir -p "$WORK" "$out"
out="$(cd "$out" && pwd)"
cd "$WORK"  # not the repository root: its cosy/ folder would shadow the linked package
SITE="$WORK/site-$pytag"
LOG="$out/gpu-check.log"
: > "$LOG"
say() { echo "gpu-check: $*" | tee -a "$LOG" >&2; }
say "$(date '+%F %T %z'): device $device, model $model, streams $streams, text '$text', $jobs job(s) per stream, budget ${budget}s; work $WORK, out $out"

# 1. Stand-ins: which of these modules the machine cannot import (decided before anything is installed: the
# wheels hold none of them).
shims=()
for shim in "${SHIMS[@]}"; do
  "$PYTHON" -c "import ${shim#*:}" >/dev/null 2>&1 || shims+=("${shim%%:*}")
done

# 2. Wheels the machine lacks, into $SITE (a package the machine has is kept, never shadowed); then, in that private
# copy of the library only, its imports of the missing modules point at bench/gpu_shims (package cosy_gpu_shims),
# so that no other package ever sees a stand-in (transformers, torchmetrics and diffusers probe for scipy and
# librosa by name, then import parts of them that no stand-in has).
stamp="$(cat "$wheels/.stamp" 2>/dev/null) $("$PYTHON" -c 'import sys; print(sys.executable)') ${shims[*]:-}"
if [[ ! -f "$SITE/.stamp" || "$(cat "$SITE/.stamp")" != "$stamp" ]]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  mapfile -t missing < <("$PYTHON" - "$wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
  )
  if ((${#missing[@]})); then
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "${missing[@]}" || die "pip install --target $SITE failed"
  fi
  printf '%s\n' "${missing[@]##*/}" | sed -E 's/-(py2|py3|cp3).*//' > "$SITE/.installed"
  : > "$SITE/.rewritten"
  if ((${#shims[@]})); then
    "$PYTHON" - "$SITE" "$(IFS=,; echo "${shims[*]}")" > "$SITE/.rewritten" <<'EOF' || die "pointing the library's imports at the stand-ins failed"
import pathlib, re, sys
site, mods = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
alt = "|".join(map(re.escape, mods))
from_ = re.compile(rf"^(\s*)from ({alt})((?:\.\w+)*) import ", re.M)
import_ = re.compile(rf"^(\s*)import ({alt})((?:\.\w+)*)(\s+as\s+\w+)?[ \t]*$", re.M)

def plain(m):
    indent, top, sub, alias = m.groups()
    if alias:
        return f"{indent}import cosy_gpu_shims.{top}{sub}{alias}"
    if sub:
        sys.exit(f"cannot point {m.group(0).strip()!r} at a stand-in")
    return f"{indent}import cosy_gpu_shims.{top} as {top}"

for package in ("cosyvoice", "matcha"):
    for path in sorted((site / package).rglob("*.py")):
        text = path.read_text()
        new = import_.sub(plain, from_.sub(r"\1from cosy_gpu_shims.\2\3 import ", text))
        if new != text:
            path.write_text(new)
            print(path.relative_to(site))
EOF
  fi
  echo "$stamp" > "$SITE/.stamp"
fi
say "wheels installed into $SITE: $(tr '\n' ' ' < "$SITE/.installed")"
say "stand-ins (bench/gpu_shims, for the random-model timing only): ${shims[*]:-none}$( ((${#shims[@]})) && echo "; the library's imports of them point there in $(wc -l < "$SITE/.rewritten") of its files")"

# 3. The project, as links in its package-dir layout (pyproject.toml), nothing built; the stand-ins as cosy_gpu_shims.
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
"$PYTHON" - "$ROOT" "$WORK/src" <<'EOF'
import pathlib, sys, tomllib
root, src = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
(src / "cosy").mkdir()
for entry in (root / dirs["cosy"]).iterdir():
    if entry.name != "__pycache__":
        (src / "cosy" / entry.name).symlink_to(entry)
for package, folder in dirs.items():
    if package.startswith("cosy."):
        (src / "cosy" / package.split(".", 1)[1]).symlink_to(root / folder)
(src / "cosy_gpu_shims").symlink_to(root / "bench" / "gpu_shims")
EOF
export PYTHONPATH="$WORK/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 4. Offline, private caches and voices (the shipped voice `joe`).
export XDG_CACHE_HOME="$WORK/cache" XDG_DATA_HOME="$WORK/data" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset COSY_VOICES_DIR COSY_MODEL_DIR onnx_path
if ! err="$("$PYTHON" -c 'import torch, torchaudio, onnx, cosyvoice.cli.cosyvoice, cosy.workers.engines.cosyvoice, cosy.bench.gpu' 2>&1)"; then
  echo "$err" | tail -5 >&2
  die "the library does not import with these wheels and stand-ins (see above)"
fi
gpu="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null || true)"
[[ "$device" == cpu || -n "$gpu" ]] || die "--device cuda, but torch sees no CUDA device"
t_setup=$((SECONDS - t_start))
torchv="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
say "setup in ${t_setup}s (python $("$PYTHON" -c 'import platform; print(platform.python_version())'), torch $torchv${gpu:+, $gpu})"

# 5. The model, made once per work folder (a folder is complete when its marker is there).
mdir="$WORK/model-$model"
t0=$SECONDS
if [[ ! -f "$mdir/.complete" ]]; then
  rm -rf "$mdir" "$mdir.tmp"
  say "generating the $model model (random weights) into $mdir"
  if [[ "$model" == full ]]; then
    "$PYTHON" "$ROOT/bench/full_cosyvoice.py" "$mdir.tmp" >> "$LOG" 2>&1 || die "bench/full_cosyvoice.py failed: see $LOG"
  else
    "$PYTHON" -c 'import sys, pathlib; sys.path.insert(0, sys.argv[1]); from tiny_cosyvoice import make_tiny_model; make_tiny_model(pathlib.Path(sys.argv[2]))' \
      "$ROOT/tests" "$mdir.tmp" >> "$LOG" 2>&1 || die "tests/tiny_cosyvoice.py failed: see $LOG"
  fi
  mv "$mdir.tmp" "$mdir" && touch "$mdir/.complete"
fi
t_model=$((SECONDS - t0))
say "model ready in ${t_model}s: $mdir ($(du -sh "$mdir" | cut -f1))"

# 6. The benchmark: cosy first, then the library, under the budget; its output live and in the log.
remaining=86400
if ((budget)); then
  remaining=$((budget - (SECONDS - t_start)))
  ((remaining > 60)) || die "only ${remaining}s of the ${budget}s budget left for the benchmark"
fi
rm -f "$out/gpu.json"
flags=(--device "$device" --model-dir "$mdir" --out "$out")
((jobs == 1)) && flags+=(--quick)
say "python -m cosy bench gpu ${flags[*]} (streams $streams$( ((budget)) && echo ", stopped after ${remaining}s"))"
offset=$(stat -c %s "$LOG")
t0=$SECONDS
COSY_BENCH_GPU_STREAMS="$streams" COSY_BENCH_GPU_TEXT="$text" COSY_BENCH_GPU_SCHEDULERS=cosy,library \
  timeout -k 15 "$remaining" "$PYTHON" -m cosy bench gpu "${flags[@]}" >> "$LOG" 2>&1 &
bench=$!  # timeout's own process group: the schedulers' children are in it
stop() { kill -TERM -- "-$bench" 2>/dev/null || kill -TERM "$bench" 2>/dev/null || true; }
trap 'stop; exit 130' INT TERM
trap 'stop' EXIT
tail -c +$((offset + 1)) -f --pid="$bench" "$LOG" &
rc=0
wait "$bench" || rc=$?
wait 2>/dev/null || true
trap - EXIT INT TERM
t_bench=$((SECONDS - t0))
((rc == 124)) && say "the benchmark was stopped by the budget after ${t_bench}s"

# 7. The summary: gpu.json, or the rows the log holds when the run was cut short.
set +e
"$PYTHON" - "$out" "$LOG" "$rc" "$streams" "$model" "$text" "$jobs" "${shims[*]:-none}" \
  "$t_setup" "$t_model" "$t_bench" "$((SECONDS - t_start))" "$gpu" "$device" "$torchv" <<'EOF' | tee "$out/summary.txt"
import json, pathlib, platform, re, sys, time
from cosy.bench import common as C
from cosy.bench.gpu import TARGETS
out, log, rc, streams, model, text, jobs, shims, t_setup, t_model, t_bench, t_all, gpu, device, torchv = sys.argv[1:]
streams = [int(s) for s in streams.split(",")]
path = pathlib.Path(out) / "gpu.json"
lines = pathlib.Path(log).read_text(errors="replace").splitlines()
if path.is_file():
    data = json.loads(path.read_text())
    rows, ratios, targets, engines = data["rows"], data["ratios"], data["targets"], data["engines"]
else:  # cut short: the rows the log holds, and the ratios and targets as the bench computes them
    rows = [json.loads(m.group(2)) | {"scheduler": m.group(1)} for m in
            (re.match(r"\s+(\w+) \d+ streams: (\{.*\})$", x) for x in lines) if m]
    engines = {m.group(1): {"load_s": m.group(2), "warm_up_s": m.group(3), "device": m.group(4)} for m in
               (re.match(r"\s+(\w+): loaded in (\S+) s, warm in (\S+) s \(([^,]+)", x) for x in lines) if m}
    by = {(r["scheduler"], r["streams"]): r for r in rows}
    ratios = [{"streams": n, "ttfc_ratio": C.ratio(by[("cosy", n)]["first_chunk_p50_ms"],
                                                  by[("library", n)]["first_chunk_p50_ms"]),
               "throughput_ratio": C.ratio(by[("cosy", n)]["audio_s_per_s"] or 0,
                                           by[("library", n)]["audio_s_per_s"] or 0)}
              for n in streams if ("cosy", n) in by and ("library", n) in by]
    targets = {}
    for name, (key, n, limit, op) in TARGETS[device].items():
        source = next((r for r in ratios if r["streams"] == n), None) if key.endswith("ratio") else by.get(("cosy", n))
        value = source.get(key) if source else None
        targets[name] = None if value is None else (value <= limit if op == "<=" else value >= limit)
done = {(r["scheduler"], r["streams"]) for r in rows}
complete = all((s, n) in done for s in ("cosy", "library") for n in streams) and not any(r["failed"] for r in rows)
print()
print("=" * 100)
info = engines.get("cosy") or engines.get("library") or {}
print(f"cosy gpu-check: {info.get('device') or gpu or device}, torch {torchv}, python "
      f"{platform.python_version()}, {time.strftime('%F %T %z')}")
print(f"  model {model} "
      f"(random weights), text {text!r} ({len(text.encode())} bytes = {20 * len(text.encode())} tokens = "
      f"{0.8 * len(text.encode()):.1f} s of audio per job), {jobs} job(s) per stream")
for name, e in engines.items():
    pipeline = ", ".join(f"{k} {v}" for k, v in (e.get("pipeline") or {}).items())
    print(f"  {name}: loaded in {e.get('load_s')} s, warm in {e.get('warm_up_s')} s{f' ({pipeline})' if pipeline else ''}")
print(f"  stand-ins: {shims}; wall: setup {t_setup} s, model {t_model} s, benchmark {t_bench} s, all {t_all} s")
print(C.table(["scheduler", "streams", "first chunk p50 ms", "p99", "audio s/s", "RTF", "jobs", "failed"],
              [[r["scheduler"], r["streams"], r["first_chunk_p50_ms"], r["first_chunk_p99_ms"], r["audio_s_per_s"],
                r["rtf"], r["jobs"], r["failed"]] for r in rows]) if rows else "  (no rows measured)")
if ratios:
    print(C.table(["streams", "first chunk cosy/library", "throughput cosy/library"],
                  [[r["streams"], r["ttfc_ratio"], r["throughput_ratio"]] for r in ratios]))
for name in TARGETS[device]:
    ok = targets.get(name)
    print(f"  target {name}: {'met' if ok else 'missed' if ok is not None else 'not measured'}")
errors = [e for r in rows for e in r.get("errors", [])]
if errors:
    print("  errors:", *errors[:3], sep="\n    ")
state = "RAN" if complete and rc == "0" else "PARTIAL" if rows else "FAILED"
print(f"result: {state} (bench exit {rc}); files in {out}: "
      f"{' '.join(sorted(p.name for p in pathlib.Path(out).iterdir() if p.is_file()))}")
sys.exit({"RAN": 0, "PARTIAL": 3}.get(state, 4))
EOF
status=${PIPESTATUS[0]}
exit "$status"
