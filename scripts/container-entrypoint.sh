#!/bin/sh
# The container image's entrypoint (under tini, which is PID 1): `cosy ARGS`.
#
# One addition: `say` and `batch` with no broker to talk to (no socket in $COSY_RUNTIME_DIR, no --connect,
# no --runtime-dir) run against a broker and one worker started for that one command, so that
#   docker run --rm -v "$PWD:/out" IMAGE say "Hello." -o /out/hello.wav --no-play
# works on its own. With the compose stack's runtime volume mounted, they use its broker instead.
set -eu

oneshot=false
case "${1:-}" in
    say | batch)
        oneshot=true
        for arg in "$@"; do
            case "$arg" in --runtime-dir | --runtime-dir=* | --connect | --connect=*) oneshot=false ;; esac
        done
        if [ -n "${COSY_CONNECT:-}" ] || [ -S "${COSY_RUNTIME_DIR:-/run/cosy}/front.sock" ]; then
            oneshot=false
        fi
        ;;
esac
if ! $oneshot; then
    exec cosy "$@"
fi

exec 3<&0
rd=$(mktemp -d /tmp/cosy-XXXXXX)
up=""
cmd=""
stop() {
    [ -z "$cmd" ] || kill -TERM "$cmd" 2>/dev/null || true
    if [ -n "$up" ]; then
        kill -TERM "$up" 2>/dev/null || true
        wait "$up" 2>/dev/null || true
    fi
    rm -rf "$rd"
}
trap stop EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

cosy up --runtime-dir "$rd" --workers 1 --log-level WARNING </dev/null 2>"$rd/up.log" &
up=$!
deadline=$(($(date +%s) + ${COSY_ONESHOT_START_TIMEOUT:-120}))
until cosy status --runtime-dir "$rd" --json 2>/dev/null | grep -q '"state"'; do
    if ! kill -0 "$up" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
        cat "$rd/up.log" >&2
        echo "cosy: the broker and worker for this command did not start" >&2
        exit 1
    fi
    sleep 0.2
done
# In the background, so that a SIGTERM (docker stop) reaches the trap at once; with the container's stdin
# (sh gives a background command /dev/null unless it is redirected: from the copy on descriptor 3).
COSY_RUNTIME_DIR="$rd" cosy "$@" <&3 3<&- &
cmd=$!
rc=0
wait "$cmd" || rc=$?
cmd=""
exit "$rc"
