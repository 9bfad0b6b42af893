#!/usr/bin/env bash
# image-base.sh: make the Debian 12 base image the meshbpf image builds FROM, locally with
# debootstrap (no registry is needed or reached), once: an existing image is kept.
# The same recipe as ../shared/tools/fresh-run.sh: apt inside later builds uses this
# machine's Debian mirror and resolver. Prints the image name. Needs root, podman, debootstrap.
set -euo pipefail
image=${MESHBPF_BASE_IMAGE:-localhost/meshbpf-base:debian12}
for t in podman debootstrap; do
  command -v $t >/dev/null || { echo "image-base: install $t first (apt-get install -y podman runc debootstrap)" >&2; exit 2; }
done
if bash "$(dirname "$0")/../deploy/podman.sh" image exists "$image"; then echo "$image"; exit 0; fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "image-base: debootstrap bookworm from $mirror (about a minute, once)" >&2
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >/dev/null
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/" && rm -f "$root/etc/apt/sources.list"
else
  cp /etc/apt/sources.list "$root/etc/apt/"
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | bash "$(dirname "$0")/../deploy/podman.sh" import - "$image" >/dev/null
echo "$image"
