#!/bin/sh
# The container image's HEALTHCHECK. What is healthy depends on the command the container runs, read from
# PID 1's command line (`tini -- cosy-entrypoint COMMAND ARGS`):
#   broker    the broker answers (`cosy status`)
#   worker    this container's worker is registered with the broker
#   up        the broker answers and has a worker
#   http      the gateway's /readyz answers 200 (the broker answers and a worker is connected)
#   wyoming   the gateway answers a Wyoming describe with its info
#   anything else (say, batch, status, ...) is healthy while it runs.
set -eu

command=""
port=8000
host=127.0.0.1
uri=tcp://127.0.0.1:10200
set --  # options passed on to `cosy status`: where the broker is
prev=""
started=false
while IFS= read -r arg; do
    if ! $started; then
        case "$arg" in */cosy-entrypoint | cosy-entrypoint | */cosy | cosy) started=true ;; esac
        continue
    fi
    if [ -z "$command" ]; then
        command=$arg
        continue
    fi
    case "$prev" in
        --port | -p) port=$arg ;;
        --host) host=$arg ;;
        --uri) uri=$arg ;;
        --runtime-dir) set -- "$@" --runtime-dir "$arg" ;;
        --connect | --bind) set -- "$@" --connect "$(echo "$arg" | sed 's#//0\.0\.0\.0:#//127.0.0.1:#')" ;;
    esac
    case "$arg" in
        --port=*) port=${arg#*=} ;;
        --host=*) host=${arg#*=} ;;
        --uri=*) uri=${arg#*=} ;;
        --runtime-dir=*) set -- "$@" --runtime-dir "${arg#*=}" ;;
    esac
    prev=$arg
done <<EOF
$(tr '\0' '\n' </proc/1/cmdline)
EOF

status_json() { cosy status --json "$@"; }

case "$command" in
    broker)
        cosy status "$@" >/dev/null
        ;;
    worker)
        status_json "$@" | python3 -c 'import json, socket, sys
sys.exit(0 if any(w.get("host") == socket.gethostname() for w in json.load(sys.stdin)["workers"]) else 1)'
        ;;
    up | "")
        status_json "$@" | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["workers"] else 1)'
        ;;
    http)
        case "$host" in 0.0.0.0 | "") host=127.0.0.1 ;; :: | "[::]") host="[::1]" ;; *:*) host="[$host]" ;; esac
        python3 -c 'import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/readyz", timeout=4)' "$host" "$port" >/dev/null
        ;;
    wyoming)
        python3 -c 'import json, socket, sys
uri = sys.argv[1]
if uri.startswith("unix://"):
    s = socket.socket(socket.AF_UNIX)
    s.connect(uri[len("unix://"):])
else:
    host, _, port = uri[len("tcp://"):].rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "::1", "::": "::1"}.get(host, host.strip("[]"))
    s = socket.create_connection((host, int(port)), timeout=4)
s.settimeout(4)
s.sendall(b"{\"type\": \"describe\"}\n")
line = s.makefile("rb").readline()
sys.exit(0 if json.loads(line).get("type") == "info" else 1)' "$uri"
        ;;
    *)
        exit 0
        ;;
esac
