#!/usr/bin/env bash
# podman.sh ARGS...: podman as meshbpf's image build and image tests run it: runtime runc and
# cgroupfs (this kind of machine), and the vfs storage driver where podman's storage sits on
# overlayfs (inside a container, e.g. ../shared/tools/fresh-run.sh's), since the overlay
# driver cannot stack on overlayfs there. One place, so every call sees the same storage.
set -euo pipefail
opts=(--runtime runc --cgroup-manager=cgroupfs)
d=/var/lib/containers/storage
while [ ! -e "$d" ]; do d=$(dirname "$d"); done
if [ "$(stat -f -c %T "$d")" = overlayfs ]; then opts+=(--storage-driver vfs); fi
exec podman "${opts[@]}" "$@"
