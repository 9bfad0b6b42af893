"""`meshbpf probe` on this machine for real, and meshbpf.bpfsys against the kernel.

Probing must find every feature here (kernel 6.x, bcc 0.26, headers linked, both iptables
backends), choose ebpf, choose iptables when told to assume 3.10, and leave nothing
behind: no fds, no cgroup, no pins, no attachment on the machine's root cgroup.
"""

import json
import os
import threading

import pytest
from click.testing import CliRunner

from meshbpf import bpfsys as B
from meshbpf import probe as P
from meshbpf.probe import features, prober
from meshbpf import system
from meshbpf.testbed import Sandbox

pytestmark = pytest.mark.kernel

ROOT_HOOKS = (B.BPF_CGROUP_INET4_CONNECT, B.BPF_CGROUP_INET6_CONNECT, B.BPF_CGROUP_SOCK_OPS,
              B.BPF_CGROUP_GETSOCKOPT, B.BPF_CGROUP_INET4_GETPEERNAME,
              B.BPF_CGROUP_UDP4_SENDMSG, B.BPF_CGROUP_UDP4_RECVMSG)


def pins():
    """Every path under bpffs, except the kernel's own iterators and other test runs' pins
    (`meshbpf-test-*`, made by concurrently running tests, never by probe)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(system.BPFFS):
        rel = os.path.relpath(dirpath, system.BPFFS)
        if rel.split(os.sep)[0].startswith("meshbpf-test-"):
            continue
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames
                   if not n.startswith("meshbpf-test-"))
    return out


def probe_cgroups():
    mount = system.cgroup2_mount()
    return [n for n in os.listdir(mount) if n.startswith(prober.PROBE_CGROUP_PREFIX)]


def root_attachments():
    fd = os.open(system.cgroup2_mount(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {t: B.prog_query(fd, t)[1] for t in ROOT_HOOKS}
    finally:
        os.close(fd)


@pytest.fixture
def no_leftovers(monkeypatch):
    """Snapshot fds, pins, cgroups and root attachments; assert probing left none behind."""
    monkeypatch.delenv(features.ASSUME_ENV, raising=False)
    before = (len(os.listdir("/proc/self/fd")), pins(), probe_cgroups(), root_attachments())
    yield
    after = (len(os.listdir("/proc/self/fd")), pins(), probe_cgroups(), root_attachments())
    assert after[0] == before[0], "probe leaked file descriptors"
    assert after[1] - before[1] == set(), "probe left pins"
    assert after[2] == [], "probe left its throwaway cgroup"
    assert after[3] == before[3], "probe changed the root cgroup's attachments"


def test_probe_finds_everything_and_chooses_ebpf(no_leftovers):
    report = P.probe()
    bad = {k: v for k, v in report["features"].items() if not v["ok"]}
    assert bad == {}
    assert report["mode"] == "ebpf", report["reason"]
    assert report["degraded"] == []
    assert report["kernel"] == os.uname().release and report["assumed_kernel"] is None
    assert set(report["features"]) == set(features.BY_NAME)
    # the cgroup checks really attached (to the throwaway cgroup) and detached
    for name in ("cgroup_connect4", "cgroup_getsockopt", "sock_ops"):
        assert "attached to a throwaway cgroup" in report["features"][name]["detail"]
    assert "SOCKHASH" in report["features"]["sk_msg"]["detail"]
    assert report["features"]["bcc"]["detail"].startswith("bcc 0.")


def test_probe_assuming_310_chooses_iptables_and_says_why(no_leftovers):
    report = P.probe(assume_kernel="3.10")
    assert report["mode"] == "iptables"
    assert report["assumed_kernel"] == "3.10" and report["kernel"] == os.uname().release
    assert "kernel lacks cgroup/connect4 (mainline 4.17)" in report["reason"]
    assert "iptables-nft and iptables-legacy work" in report["reason"]
    assert report["features"]["cgroup_getsockopt"] == {
        "ok": False, "detail": "assumed absent: kernel 3.10 < mainline 5.3"}
    # not kernel features: still checked for real
    for name in ("bcc", "kernel_headers", "iptables_nft", "iptables_legacy"):
        assert report["features"][name]["ok"], name
        assert not report["features"][name]["detail"].startswith("assumed")


def test_env_var_assumes_a_kernel(no_leftovers, monkeypatch):
    monkeypatch.setenv(features.ASSUME_ENV, "4.19")
    report = P.probe()
    assert report["assumed_kernel"] == "4.19"
    assert report["mode"] == "iptables"
    assert "cgroup/getsockopt (mainline 5.3)" in report["reason"]
    assert report["features"]["cgroup_connect4"]["ok"]        # 4.17 <= 4.19: really probed
    assert "attached" in report["features"]["cgroup_connect4"]["detail"]


def test_cli_json_on_this_machine(no_leftovers):
    res = CliRunner().invoke(P.probe_command, ["-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["mode"] == "ebpf"
    assert all(v["ok"] for v in doc["features"].values())
    res = CliRunner().invoke(P.probe_command, ["--assume-kernel", "3.10"])
    assert res.exit_code == 0
    assert "mode: iptables — assuming kernel 3.10: kernel lacks cgroup/connect4" in res.output


def test_probes_in_two_threads_do_not_collide(no_leftovers):
    out, errors = [], []

    def run():
        try:
            out.append(P.probe()["mode"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and out == ["ebpf", "ebpf"]


def test_stale_probe_cgroup_of_a_dead_process_is_removed(no_leftovers):
    mount = system.cgroup2_mount()
    dead = 4194303          # above the default pid_max, so no live process has it
    while os.path.exists(f"/proc/{dead}"):
        dead -= 1
    stale = os.path.join(mount, f"{prober.PROBE_CGROUP_PREFIX}{dead}")
    os.mkdir(stale)
    try:
        P.probe()
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.rmdir(stale)


# --- bpfsys against the kernel -----------------------------------------------------------
def test_bpfsys_map_ops_pin_attach_roundtrip():
    """Maps, pins, cgroup attach/query/detach and links, in a sandbox's cgroup and pin prefix."""
    with Sandbox(name="bpfsys") as sb:
        os.makedirs(sb.pin_prefix, exist_ok=True)
        with B.closing(B.map_create(B.BPF_MAP_TYPE_HASH, 4, 8, 16, name="mbt_hash")) as m:
            info = B.map_get_info(m)
            assert (info["type"], info["key_size"], info["value_size"], info["max_entries"],
                    info["name"]) == (B.BPF_MAP_TYPE_HASH, 4, 8, 16, "mbt_hash")
            for i in range(3):
                B.map_update_elem(m, i.to_bytes(4, "little"), (i * 10).to_bytes(8, "little"))
            assert sorted(int.from_bytes(k, "little") for k in B.map_keys(m, 4)) == [0, 1, 2]
            assert B.map_lookup_elem(m, (2).to_bytes(4, "little"), 8) == (20).to_bytes(8, "little")
            assert B.map_lookup_elem(m, (9).to_bytes(4, "little"), 8) is None
            with pytest.raises(B.BpfError):
                B.map_update_elem(m, (1).to_bytes(4, "little"), bytes(8), B.BPF_NOEXIST)
            assert B.map_delete_elem(m, (1).to_bytes(4, "little")) is True
            assert B.map_delete_elem(m, (1).to_bytes(4, "little")) is False
            path = os.path.join(sb.pin_prefix, "hash")
            B.obj_pin(m, path)
            with B.closing(B.obj_get(path)) as m2:
                assert B.map_get_info(m2)["id"] == info["id"]
                assert B.map_lookup_elem(m2, (0).to_bytes(4, "little"), 8) == bytes(8)
            with B.closing(B.map_get_fd_by_id(info["id"])) as m3:
                assert B.map_get_info(m3)["id"] == info["id"]
            os.unlink(path)

        prog = B.prog_load(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, B.return_imm(1),
                           B.BPF_CGROUP_INET4_CONNECT, name="mbt_connect4")
        cg = os.open(sb.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            pinfo = B.prog_get_info(prog)
            assert pinfo["name"] == "mbt_connect4"
            assert pinfo["type"] == B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR
            B.prog_attach(cg, prog, B.BPF_CGROUP_INET4_CONNECT, B.BPF_F_ALLOW_MULTI)
            flags, ids = B.prog_query(cg, B.BPF_CGROUP_INET4_CONNECT)
            assert flags == B.BPF_F_ALLOW_MULTI and ids == [pinfo["id"]]
            B.prog_detach(cg, prog, B.BPF_CGROUP_INET4_CONNECT)
            assert B.prog_query(cg, B.BPF_CGROUP_INET4_CONNECT)[1] == []
            link = B.link_create(prog, cg, B.BPF_CGROUP_INET4_CONNECT)
            assert B.prog_query(cg, B.BPF_CGROUP_INET4_CONNECT)[1] == [pinfo["id"]]
            os.close(link)
            assert B.prog_query(cg, B.BPF_CGROUP_INET4_CONNECT)[1] == []
            with B.closing(B.prog_get_fd_by_id(pinfo["id"])) as again:
                assert B.prog_get_info(again)["id"] == pinfo["id"]
        finally:
            os.close(cg)
            os.close(prog)


def test_bpfsys_verifier_log_on_rejection():
    with pytest.raises(B.BpfError) as exc:
        B.prog_load(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, B.return_imm(7), B.BPF_CGROUP_INET4_CONNECT)
    assert exc.value.errno == 22
    assert "R0" in exc.value.log and "verifier log" in str(exc.value)
    assert isinstance(exc.value, OSError)
