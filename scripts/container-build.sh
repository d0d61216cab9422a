#!/usr/bin/env bash
# Build the cosy image here, from the local Debian base (scripts/container-base.sh), and print its name.
# The tag is a hash of everything the image is made of: the base image, the Containerfile and every file it copies. An image
# with that tag is used as it is; otherwise podman builds, reusing every layer whose inputs did not change (the
# Debian packages and the dependencies are keyed on the Containerfile and pyproject.toml, so a change to cosy's
# code rebuilds only the last layers). Older cosy:cpu-* tags are removed after a build.
#   scripts/container-build.sh                # -> localhost/cosy:cpu-0123456789abcdef (also localhost/cosy:latest)
# The gpu flavour (--build-arg FLAVOR=gpu) cannot be built on these machines: see docs/deploy.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
podman="$ROOT/scripts/container-podman.sh"
BASE=${COSY_BASE_IMAGE:-localhost/debian-base:bookworm}

COSY_BASE_IMAGE="$BASE" "$ROOT/scripts/container-base.sh"
# The files the Containerfile copies from the context (COPY lines without --from), less what .containerignore drops.
mapfile -t sources < <(awk '$1 == "COPY" && $2 !~ /^--from/ { for (i = 2; i < NF; i++) print $i }' Containerfile)
hash=$({ "$podman" image inspect --format '{{.Id}}' "$BASE"
         sha256sum Containerfile .containerignore
         find "${sources[@]}" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path 'bench/results/*' \
             -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
tag="localhost/cosy:cpu-$hash"
if "$podman" image exists "$tag"; then
    echo "container-build: $tag exists" >&2
else
    secrets=()
    [[ -f /etc/pip.conf ]] && secrets+=(--secret "id=pipconf,src=/etc/pip.conf")
    ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
    [[ -n "$ca" && -f "$ca" ]] && secrets+=(--secret "id=cacert,src=$ca")
    t0=$SECONDS
    # --format docker: the OCI image format has no HEALTHCHECK. --isolation chroot: builds in this sandbox.
    "$podman" build --isolation chroot --layers --format docker --build-arg "BASE=$BASE" "${secrets[@]}" \
        -t "$tag" -t localhost/cosy:latest -f Containerfile . >&2
    echo "container-build: $tag built in $((SECONDS - t0)) s" >&2
    "$podman" images --format '{{.Repository}}:{{.Tag}}' localhost/cosy | grep ':cpu-' | grep -vx "$tag" \
        | xargs -r "$podman" rmi >/dev/null 2>&1 || true
fi
echo "$tag"
