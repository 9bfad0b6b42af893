#!/bin/sh
# `make vm-test [VM=name]`: bring up each VM (or one), run the smoke script in it, print per
# VM the mode the probe chose, the smoke set it ran (full, iptables, no-envoy: see
# scripts/vm/smoke.sh) and the result, and destroy it. Exit 1 if any VM failed.
set -u
cd "$(dirname "$0")" || exit 1
vms=${1:-$(sed -n 's/^ *"\([a-z0-9]*\)" *=> *\[.*/\1/p' Vagrantfile)}
failed=0
for vm in $vms; do
  start=$(date +%s)
  if vagrant up "$vm" --provision; then
    mode=$(vagrant ssh "$vm" -c 'cat /var/tmp/meshbpf-results/mode' 2>/dev/null | tr -d '\r')
    smoke=$(vagrant ssh "$vm" -c 'cat /var/tmp/meshbpf-results/smoke' 2>/dev/null | tr -d '\r')
    rc=$(vagrant ssh "$vm" -c 'cat /var/tmp/meshbpf-results/rc' 2>/dev/null | tr -d '\r')
  else
    mode=none smoke=none rc=boot-failed
  fi
  echo "vm-test: $vm mode=${mode:-unknown} smoke=${smoke:-unknown} result=$([ "$rc" = 0 ] && echo pass || echo "fail ($rc)") ($(( $(date +%s) - start ))s)"
  [ "$rc" = 0 ] || failed=1
  vagrant destroy -f "$vm" >/dev/null 2>&1
done
exit $failed
