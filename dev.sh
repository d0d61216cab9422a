#!/usr/bin/env bash
# The two commands of the README:
#   ./dev.sh demo   set up .venv if needed, start a local stack (broker + Piper worker), speak a sentence
#                   into demo.wav (and out loud when there is an audio device), stop the stack
#   ./dev.sh test   set up .venv if needed, lint, run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${COSY_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.cosy-installed"
    local want
    want=$(cat pyproject.toml | sha256sum | cut -c1-16)
    if [ ! -x "$VENV/bin/python" ]; then
        echo "dev.sh: creating $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "dev.sh: installing cosy with the piper, http, grpc and test extras into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[piper,http,grpc,test]"
        echo "$want" > "$stamp"
    fi
}

demo() {
    setup
    # Globals, not locals: the EXIT trap runs after this function has returned.
    DEMO_RD=$(mktemp -d /tmp/cosy-demo-XXXXXX)
    rd=$DEMO_RD
    "$VENV/bin/cosy" up --runtime-dir "$rd" --engine piper --workers 1 --log-level WARNING &
    DEMO_UP=$!
    trap 'kill -TERM "$DEMO_UP" 2>/dev/null; wait "$DEMO_UP" 2>/dev/null; rm -rf "$DEMO_RD"' EXIT
    for _ in $(seq 1 300); do
        if "$VENV/bin/cosy" status --runtime-dir "$rd" --json 2>/dev/null | grep -q '"state"'; then break; fi
        sleep 0.1
    done
    "$VENV/bin/cosy" say "Hello from cosy. This sentence was synthesized by a Piper worker behind a ZeroMQ broker." \
        --runtime-dir "$rd" --out demo.wav --verbose
    "$VENV/bin/cosy" status --runtime-dir "$rd"
    echo "dev.sh: wrote $(pwd)/demo.wav" >&2
}

tests() {
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/python" -m pytest "$@"
}

case "${1:-}" in
    demo) demo ;;
    test) shift; tests "$@" ;;
    *) echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2; exit 2 ;;
esac
