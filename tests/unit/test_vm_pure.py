"""The VM tier's pure parts (meshbpf.vm, tests/vm/guest/expectations.py): module closure
from modules.dep, the QEMU command line, the cpio writer, reading a guest's results, and
the expected-failure table."""

import json
import os

import pytest

from meshbpf import vm
from tests.vm.guest import expectations as X

DEP = """kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
"""


def test_module_closure_puts_dependencies_first_and_skips_builtins():
    got = vm.module_closure(DEP, vm.BOOT_MODULES, "kernel/drivers/virtio/virtio_pci.ko\n")
    assert got == ["kernel/fs/netfs/netfs.ko.xz", "kernel/net/9p/9pnet.ko.xz",
                   "kernel/net/9p/9pnet_virtio.ko.xz", "kernel/fs/9p/9p.ko.xz"]
    got = vm.module_closure(DEP, ["virtio_pci"])
    assert got[-1] == "kernel/drivers/virtio/virtio_pci.ko" and len(got) == 3
    with pytest.raises(KeyError):
        vm.module_closure(DEP, ["nonexistent"])


def test_qemu_argv_shares_read_only_and_picks_the_accelerator():
    argv = vm.qemu_argv("vmlinuz", "initrd", [("root", "/", True), ("results", "/r", False)],
                        "console=ttyS0", kvm=False, console_log="/r/c.txt")
    s = " ".join(argv)
    assert "-accel tcg -cpu max" in s and "-no-reboot" in s and "-nic none" in s
    assert "local,id=fs0,path=/,security_model=none,multidevs=remap,readonly=on" in s
    assert "local,id=fs1,path=/r,security_model=none,multidevs=remap -device" in s
    assert "mount_tag=results" in s and "-serial file:/r/c.txt" in s
    assert "-accel kvm -cpu host" in " ".join(vm.qemu_argv("k", "i", [], "", kvm=True))


def test_cpio_newc_layout():
    data = vm.cpio_newc([("init", 0o100755, b"#!/bin/sh\n")])
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"init\0" in data and b"#!/bin/sh\n" in data and b"TRAILER!!!\0" in data
    # namesize field (13th) counts the NUL
    assert int(data[6 + 11 * 8: 6 + 12 * 8], 16) == len("init") + 1


def test_read_results(tmp_path):
    assert vm.read_results(str(tmp_path))["rc"] is None
    (tmp_path / "rc").write_text("1\n")
    (tmp_path / "probe.json").write_text(json.dumps({"mode": "ebpf"}))
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="a.b" name="t1"/>'
        '<testcase classname="a.b" name="t2"><failure message="x"/></testcase>'
        '<testcase classname="a.b" name="t3"><skipped type="pytest.xfail" message="r"/>'
        '</testcase><testcase classname="a.b" name="t4"><error message="e"/></testcase>'
        '</testsuite></testsuites>')
    res = vm.read_results(str(tmp_path))
    assert res["rc"] == 1 and res["probe"]["mode"] == "ebpf"
    assert res["tests"] == {"a.b::t1": "passed", "a.b::t2": "failed", "a.b::t3": "xfailed",
                            "a.b::t4": "failed"}


def test_expected_failures_by_kernel_and_userland(monkeypatch):
    assert X.EXPECTED_FAILURES == ()        # every guest passes the whole smoke tier today
    monkeypatch.setattr(X, "EXPECTED_FAILURES", (((5, 11), "debian11", "::test_x", "why"),))
    assert X.expected_failure("t.py::test_x[ebpf]", (5, 10), "debian11") == "why"
    assert X.expected_failure("t.py::test_x[ebpf]", (5, 10), "host") is None
    assert X.expected_failure("t.py::test_x[ebpf]", (6, 1), "debian11") is None
    assert X.expected_failure("t.py::test_y", (5, 10), "debian11") is None


def test_every_guest_has_a_debian_suite_and_the_smoke_script_exists():
    assert {g.name for g in vm.GUESTS} == {"5.10", "6.1", "6.12", "5.10-debian11"}
    for name in ("guest-run.sh", "guest-init.sh", "initramfs-init", "fetch-kernel.sh"):
        assert os.access(os.path.join(vm.REPO, "scripts", "vm", name), os.X_OK), name
