"""Run inside a VM tier guest only when the host asks (meshbpf.fail=1 -> MESHBPF_VM_FAIL=1):
it fails on purpose, so the host test can prove that a failing guest test fails the run."""

import os


def test_fails_on_purpose_when_the_host_asks():
    assert os.environ.get("MESHBPF_VM_FAIL") != "1", "deliberate failure requested by the host"
