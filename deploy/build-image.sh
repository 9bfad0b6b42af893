#!/usr/bin/env bash
# build-image.sh: build the meshbpf agent image (deploy/Containerfile) with podman, from the
# local Debian base (scripts/image-base.sh). Cached by content: an image whose label
# meshbpf.source equals the hash of what goes into it is not built again. Prints the image.
# podman runs with runc, cgroupfs and explicit nofile/nproc limits, as this kind of machine
# needs (the same as ../shared/tools/fresh-run.sh); apt and pip reach the machine's mirrors.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image=${MESHBPF_IMAGE:-localhost/meshbpf:$version}
base=$(bash scripts/image-base.sh)
podman=(bash "$PWD/deploy/podman.sh")
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md meshbpf | tar -C "$ctx" -xf -
cp deploy/Containerfile "$ctx/Containerfile"
# README.md is only the wheel's long description: its edits do not call for a new image
hash=$( (cd "$ctx" && find . -type f ! -name README.md | LC_ALL=C sort | xargs sha256sum; \
         "${podman[@]}" image inspect --format '{{.Id}}' "$base") | sha256sum | cut -c1-16)
if [ "$("${podman[@]}" image inspect --format '{{index .Labels "meshbpf.source"}}' "$image" 2>/dev/null)" = "$hash" ]; then
  echo "$image"; exit 0
fi
echo "build-image: building $image (source $hash)" >&2
# pip in the build trusts what this machine trusts (its CA bundle, lent at a path of its
# own: apt's ca-certificates rewrites the image's bundle) and uses its pip configuration
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/run/host/ca.crt:ro)
[ -f /etc/pip.conf ] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
"${podman[@]}" build -q --network host --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
  "${mounts[@]}" --build-arg BASE="$base" --label meshbpf.source="$hash" \
  -t "$image" -f "$ctx/Containerfile" "$ctx" >&2
echo "$image"
