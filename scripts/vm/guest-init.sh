#!/bin/sh
# PID 1 of a VM tier guest after the initramfs: mount what a node has (cgroup2, bpffs,
# devpts), read meshbpf.* options from the kernel command line, run guest-run.sh (the
# script the vagrant/ VMs run too) and power off. Results land in /mnt/results.
mkdir -p /var/tmp /var/lib /var/log /var/cache /run/lock
ln -sfn /run /var/run
ln -sfn /run/lock /var/lock
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs none /sys/kernel/debug 2>/dev/null
mount -t tracefs none /sys/kernel/tracing 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
hostname meshbpf-vm 2>/dev/null
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export MESHBPF_VM_GUEST=1
python=/usr/bin/python3
# shellcheck disable=SC2013 # the command line is one line of words
for arg in $(cat /proc/cmdline); do
  case $arg in
    meshbpf.python=*) python=${arg#*=} ;;
    meshbpf.fail=1) export MESHBPF_VM_FAIL=1 ;;
    meshbpf.guest=*) export MESHBPF_VM_NAME="${arg#*=}" ;;
    meshbpf.userland=*) export MESHBPF_VM_USERLAND="${arg#*=}" ;;
    meshbpf.probe=0) export MESHBPF_VM_PROBE=0 ;;
    meshbpf.env.*=*) kv=${arg#meshbpf.env.}; export "${kv%%=*}=${kv#*=}" ;;
  esac
done
sh /mnt/repo/scripts/vm/guest-run.sh /mnt/repo /mnt/results "$python" > /mnt/results/log.txt 2>&1
sync
echo o > /proc/sysrq-trigger
sleep 10
