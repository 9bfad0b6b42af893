#!/usr/bin/env bash
# Build (once, cached) the Debian 11 userland the VM tier boots on the 5.10 kernel:
# debootstrap bullseye + python3 (3.9), python3-bpfcc (0.18), iptables (1.8.7), iproute2,
# and meshbpf's Python dependencies from Debian packages. Prints the tree's path.
set -euo pipefail
cache=${MESHBPF_VM_CACHE:-/var/cache/meshbpf-vm}
root=$cache/debian11-root
mirror=${MESHBPF_VM_MIRROR:-http://deb.debian.org/debian}
if [ -e "$root/.complete" ]; then echo "$root"; exit 0; fi
pkgs=python3,python3-bpfcc,bpfcc-tools,iptables,iproute2,python3-click,python3-pyroute2,python3-pytest,python3-yaml,curl,procps,util-linux,kmod,iperf3,haproxy,socat
rm -rf "$root.tmp"
debootstrap --variant=minbase --include="$pkgs" bullseye "$root.tmp" "$mirror" >&2
# The guest mounts these; the tree only needs the mount points.
mkdir -p "$root.tmp/mnt" "$root.tmp/sys/fs/bpf"
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
echo "$root"
