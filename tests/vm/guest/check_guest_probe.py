"""Inside a VM tier guest: the probe's verdict per feature must be what the feature table
says for this kernel (a feature is present exactly from its `mainline` version), and its
mode must follow. So the table is checked against real kernels, not only this machine's.
Not collected on the host (check_*.py); guest-run.sh names it explicitly."""

import json
import os

import pytest

from meshbpf import probe as P
from meshbpf.probe import features as F

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def report():
    """The report guest-run.sh's `meshbpf probe -o json` wrote (probing takes minutes under
    TCG), else a fresh probe."""
    path = os.environ.get("MESHBPF_VM_PROBE_JSON")
    if path and os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return P.probe()


def test_probe_matches_the_feature_table_on_this_kernel(report):
    kernel = F.parse_kernel_version(os.uname().release)
    wrong, untried = {}, []
    for f in F.FEATURES:
        if f.mainline is None:
            continue
        want = kernel >= f.mainline
        got = report["features"][f.name]["ok"]
        if report["features"][f.name]["detail"].startswith("not tried"):
            untried.append(f.name)   # no verdict (e.g. needs bcc, which is too old here)
            continue
        if got != want:
            wrong[f.name] = (f"table says {'present' if want else 'absent'} "
                             f"(mainline {F.fmt_version(f.mainline)}), probe: "
                             f"{report['features'][f.name]['detail']}")
    assert wrong == {}
    # Only the bcc-driven inbound checks may go untried, and only without a usable bcc.
    if report["features"]["bcc"]["ok"]:
        assert untried == []
    assert set(untried) <= {"tc_sk_assign", "tc_sk_assign_reuseport", "sk_lookup_reuseport"}
    ok = {n: v["ok"] for n, v in report["features"].items()}
    required_missing = [f.name for f in F.FEATURES if f.role == F.REQUIRED and not ok[f.name]
                        and not (f.covered_by and all(ok[n] for n in f.covered_by))]
    assert report["mode"] == ("ebpf" if not required_missing else "iptables"), report["reason"]


def test_userland_features_are_present(report):
    # bcc, headers and an iptables backend come from the userland: the guest must have them.
    for name in ("bcc", "kernel_headers", "cgroup2", "bpffs"):
        assert report["features"][name]["ok"], report["features"][name]["detail"]
    assert any(report["features"][n]["ok"] for n in ("iptables_nft", "iptables_legacy"))


def test_probe_chooses_ebpf(report):
    # What issue 13 asks of every guest; expected to fail where expectations.py says why.
    assert report["mode"] == "ebpf", report["reason"]
