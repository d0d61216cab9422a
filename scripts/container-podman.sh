#!/usr/bin/env bash
# podman with the settings that containers need on this project's machines (a sandbox without systemd, a hybrid
# cgroup hierarchy, resource limits that may not be set even to their current values):
#   runc (crun refuses the hybrid hierarchy), cgroupfs (no systemd), and no default ulimits.
# They travel in a containers.conf (CONTAINERS_CONF), so that podman-compose and the processes podman starts
# later (the restart of a container that exited) use them too. Elsewhere, plain podman or docker does.
#   scripts/container-podman.sh run --rm IMAGE ...        # any podman command
set -euo pipefail
conf="${TMPDIR:-/tmp}/cosy-containers-$(id -u).conf"
want='[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
'
if [[ "$(cat "$conf" 2>/dev/null)" != "${want%$'\n'}" ]]; then
    tmp=$(mktemp "$conf.XXXXXX")
    printf '%s' "$want" > "$tmp"
    mv -f "$tmp" "$conf"
fi
CONTAINERS_CONF="$conf" exec podman "$@"
