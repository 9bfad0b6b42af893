#!/bin/sh
# The guest side of the VM tiers (local QEMU guests and vagrant/ VMs run this same script).
#
# Usage: guest-run.sh REPO RESULTS [PYTHON]
# Writes to RESULTS: probe.json (`meshbpf probe -o json`), probe.txt, junit.xml (the smoke
# tests), mode (the mode the probe chose), rc (0 when probe and smoke tests passed).
# MESHBPF_VM_FAIL=1 adds a test that fails on purpose (the host checks that it fails the run).
# MESHBPF_VM_TESTS overrides the smoke selection (space separated pytest node ids).
set -u
repo=${1:?usage: guest-run.sh REPO RESULTS [PYTHON]}
results=${2:?usage: guest-run.sh REPO RESULTS [PYTHON]}
python=${3:-python3}
mkdir -p "$results"
rm -f "$results/rc"
cd "$repo" || exit 1
export PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 MESHBPF_REQUIRE_KERNEL=1
# bcc compiles take minutes in an emulated (TCG) guest.
export MESHBPF_PROBE_INBOUND_TIMEOUT="${MESHBPF_PROBE_INBOUND_TIMEOUT:-900}"
export MESHBPF_TEST_TIMEOUT_SCALE="${MESHBPF_TEST_TIMEOUT_SCALE:-6}"

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

smoke="tests/vm/guest/check_guest_probe.py
tests/kernel/test_e2e.py::test_outbound_goes_through_the_sidecar_to_the_original_destination
tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod
tests/kernel/test_ebpf_datapath.py::test_splice_skips_tcp_for_app_to_sidecar_bytes
tests/kernel/test_iptables_live.py::test_interceptor_moves_traffic_through_envoy_and_detaches_cleanly"
tests=${MESHBPF_VM_TESTS:-$smoke}
if [ "${MESHBPF_VM_FAIL:-0}" = 1 ]; then
  tests="$tests tests/vm/guest/check_deliberate_failure.py"
fi
# shellcheck disable=SC2086 # the selection is a word list on purpose
"$python" -m pytest -p no:cacheprovider -p tests.vm.guest.expectations -ra -v \
  -o junit_family=xunit1 --junitxml="$results/junit.xml" $tests
test_rc=$?
echo "guest: pytest rc=$test_rc ($(( $(date +%s) - start ))s)"
rc=$test_rc
[ "$probe_rc" = 0 ] || rc=$probe_rc
echo "$rc" > "$results/rc"
exit "$rc"
