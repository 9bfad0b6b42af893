"""RLIMIT_MEMLOCK: kernels before 5.11 charge BPF memory to it (64 KiB by default), so every
process that loads programs lifts it (meshbpf.memlock), with a clear error where it cannot."""

import resource
import subprocess
import sys

import pytest

from meshbpf import memlock
from meshbpf.errors import UnsupportedError

INF = resource.RLIM_INFINITY


class FakeLimit:
    def __init__(self, soft, hard, can_raise=True):
        self.limit = (soft, hard)
        self.can_raise = can_raise

    def get(self, which):
        assert which == resource.RLIMIT_MEMLOCK
        return self.limit

    def set(self, which, value):
        assert which == resource.RLIMIT_MEMLOCK
        soft, hard = value
        if not self.can_raise and (hard == INF or hard > self.limit[1]):
            raise ValueError("not allowed to raise maximum limit")
        self.limit = value


@pytest.mark.parametrize("release,charges", [("5.10.0-32-amd64", True), ("4.19.0", True),
                                             ("5.11.0", False), ("6.1.0-50-amd64", False),
                                             ("3.10.0-1160.el7.x86_64", True)])
def test_which_kernels_charge_bpf_memory_to_memlock(release, charges):
    assert memlock.charges_memlock(release) is charges


def test_a_64k_limit_is_lifted_to_infinity():
    lim = FakeLimit(64 * 1024, 64 * 1024)
    assert memlock.raise_memlock("5.10.0", lim.get, lim.set) == INF
    assert lim.limit == (INF, INF)


def test_without_privilege_the_hard_limit_is_used_and_a_pre_511_kernel_is_refused_clearly():
    lim = FakeLimit(64 * 1024, 128 * 1024, can_raise=False)
    with pytest.raises(UnsupportedError) as e:
        memlock.raise_memlock("5.10.0", lim.get, lim.set)
    assert "128 KiB" in str(e.value) and "5.11" in str(e.value)
    assert lim.limit == (128 * 1024, 128 * 1024)


def test_on_511_and_later_a_limit_that_cannot_be_raised_does_not_matter():
    lim = FakeLimit(64 * 1024, 64 * 1024, can_raise=False)
    assert memlock.raise_memlock("6.1.0", lim.get, lim.set) == 64 * 1024


def _has_cap_sys_resource():
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def test_real_process_started_with_debian11s_64k_limit():
    # A child started with Debian 11's default limit: with CAP_SYS_RESOURCE (root on a real
    # node, the VM guests) the helper lifts it; without (this test machine's container
    # drops it) it says why, for a pre-5.11 kernel, instead of letting loads fail with EPERM.
    code = ("import resource, sys; from meshbpf import memlock, errors\n"
            "try: memlock.raise_memlock('5.10.0')\n"
            "except errors.UnsupportedError as e: print(e); sys.exit(e.exit_code)\n"
            "print(resource.getrlimit(resource.RLIMIT_MEMLOCK))")
    proc = subprocess.run(["prlimit", "--memlock=65536:65536", sys.executable, "-c", code],
                          capture_output=True, text=True)
    if _has_cap_sys_resource():
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"({INF}, {INF})"
    else:
        assert proc.returncode == UnsupportedError.exit_code, proc.stderr
        assert "RLIMIT_MEMLOCK is 64 KiB and cannot be raised" in proc.stdout


def test_loader_probe_and_bpfsys_lift_the_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(memlock, "raise_memlock", lambda *a, **k: calls.append("raise"))
    monkeypatch.setattr(memlock, "_done", False)
    from meshbpf.ebpf import loader
    import bcc
    monkeypatch.setattr(bcc, "BPF", lambda **kw: "compiled")
    assert loader._compile("int x;") == "compiled"
    assert calls == ["raise"]
    from meshbpf import bpfsys
    monkeypatch.setattr(bpfsys, "bpf", lambda *a, **k: 99)
    assert bpfsys.map_create(bpfsys.BPF_MAP_TYPE_HASH, 4, 4, 1) == 99
    assert calls == ["raise", "raise"]
    from meshbpf.probe import prober
    src = open(prober.__file__).read()
    assert "memlock.raise_memlock()" in src.split("def probe(")[1].split("_Prober()")[0]
