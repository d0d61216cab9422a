#!/usr/bin/env bash
# A Debian bookworm base image made here from Debian's own packages, for building the Containerfile where no
# registry can be reached (the tests, CI): debootstrap's minbase, trimmed as the official bookworm-slim image is
# (no documentation, man pages or locales; no apt lists or caches), imported into podman. Skips the work when the
# image exists and was made by this version of the script.
#   scripts/container-base.sh            # -> localhost/debian-base:bookworm
#   scripts/container-base.sh --force    # make it again (for example for Debian's security updates)
# Needs root, debootstrap and podman (apt-get install debootstrap podman runc).
set -euo pipefail
IMAGE=${COSY_BASE_IMAGE:-localhost/debian-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
podman="$(dirname "${BASH_SOURCE[0]}")/container-podman.sh"

# The image carries a hash of this script: a changed script makes it again.
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
if [[ "${1:-}" != --force ]] && "$podman" image exists "$IMAGE" \
    && [[ "$("$podman" image inspect --format '{{index .Labels "cosy.base-recipe"}}' "$IMAGE")" == "$recipe" ]]; then
    echo "container-base: $IMAGE exists" >&2
    exit 0
fi
root=$(mktemp -d /var/tmp/cosy-debootstrap-XXXXXX)
trap 'rm -rf "$root"' EXIT
t0=$SECONDS
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { cat "$root.log" >&2; exit 1; }
rm -f "$root.log"
# What the official slim image leaves out of every package installed later, and has removed already.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
CFG
# And, as it, no apt package caches (80 MB after an apt-get update) left in a layer.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$root"/usr/share/{groff,info,linda,lintian,locale,man}/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/bootstrap.log
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
tar -C "$root" -c . | "$podman" import --change 'CMD ["bash"]' --change "LABEL cosy.base-recipe=$recipe" - "$IMAGE" \
    >/dev/null
echo "container-base: $IMAGE made in $((SECONDS - t0)) s" >&2
