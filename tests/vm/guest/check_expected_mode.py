"""Inside a vagrant/ VM: the probe chose the mode vagrant/README.md's table expects for this
VM (MESHBPF_VM_EXPECTED_MODE, from the Vagrantfile), and says why. Not collected on the
host (check_*.py); guest-run.sh names it when the VM has an expected mode."""

import json
import os

import pytest

pytestmark = pytest.mark.kernel


def test_probe_chose_the_expected_mode_and_says_why():
    want = os.environ["MESHBPF_VM_EXPECTED_MODE"]
    with open(os.environ["MESHBPF_VM_PROBE_JSON"]) as fh:
        report = json.load(fh)
    assert report["mode"] == want, report["reason"]
    assert report["reason"]
    if want == "iptables":
        # an iptables backend works on the VM's own iptables
        assert "using iptables (" in report["reason"], report["reason"]
