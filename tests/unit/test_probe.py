"""meshbpf.probe's pure half (feature table, --assume-kernel, mode decision, rendering)
and meshbpf.bpfsys' instruction encoding. No root, no kernel."""

import json
import struct

import pytest
from click.testing import CliRunner

from meshbpf import bpfsys as B
from meshbpf.probe import command, prober
from meshbpf.probe import features as P
from meshbpf.errors import UnsupportedError, UsageError


def all_ok():
    return {f.name: {"ok": True, "detail": "fine"} for f in P.FEATURES}


def with_missing(*names, detail="load failed: Invalid argument"):
    r = all_ok()
    for n in names:
        r[n] = {"ok": False, "detail": detail}
    return r


# --- feature table ---------------------------------------------------------------------
def test_table_covers_design_features_with_their_mainline_versions():
    want = {"sock_ops": (4, 13), "sockmap": (4, 14), "sk_msg": (4, 17),
            "cgroup_connect4": (4, 17), "sockhash": (4, 18), "cgroup_sendmsg4": (4, 18),
            "cgroup_recvmsg4": (5, 2), "cgroup_getsockopt": (5, 3),
            "netns_cookie_sock_addr": (5, 7), "cgroup_getpeername4": (5, 8),
            "sk_lookup": (5, 9)}
    for name, version in want.items():
        assert P.BY_NAME[name].mainline == version, name
    names = [f.name for f in P.FEATURES]
    assert len(names) == len(set(names))
    for f in P.FEATURES:
        assert f.role in (P.REQUIRED, P.DEGRADES, P.IPTABLES, P.INFO)
        assert (f.capability is not None) == (f.role == P.DEGRADES), f.name
        assert f.enables


def test_every_feature_has_a_real_check():
    for f in P.FEATURES:
        assert callable(getattr(prober._Prober, f"check_{f.name}", None)), f.name


# --- decide ----------------------------------------------------------------------------
def test_everything_present_is_ebpf_without_degradation():
    mode, reason = P.decide(all_ok())
    assert mode == "ebpf"
    assert "using ebpf" in reason
    assert P.degraded(all_ok()) == []


def test_missing_getsockopt_drops_to_iptables_and_says_why():
    mode, reason = P.decide(with_missing("cgroup_getsockopt"))
    assert mode == "iptables"
    assert "kernel lacks cgroup/getsockopt (mainline 5.3" in reason
    assert "SO_ORIGINAL_DST" in reason
    assert "using iptables" in reason and "iptables-nft" in reason


@pytest.mark.parametrize("name", [f.name for f in P.FEATURES
                                  if f.role == P.REQUIRED and not f.covered_by])
def test_each_required_feature_alone_forces_iptables(name):
    mode, reason = P.decide(with_missing(name))
    assert mode == "iptables"
    assert P.BY_NAME[name].title in reason


@pytest.mark.parametrize("name,capability", [
    ("cgroup_getpeername4", "apps see the sidecar as peer"),
    ("cgroup_getpeername6", "apps see the sidecar as peer"),
    ("cgroup_sendmsg4", "DNS capture unavailable"),
    ("cgroup_recvmsg4", "DNS capture unavailable"),
    ("sk_lookup", "sk_lookup"),
    ("bpf_link", "bpf_link"),
])
def test_optional_features_only_degrade(name, capability):
    results = with_missing(name)
    mode, reason = P.decide(results)
    assert mode == "ebpf"
    caps = P.degraded(results)
    assert len(caps) == 1 and capability in caps[0]
    assert capability in reason
    report = P.build_report("6.1.0", results)
    assert report["degraded"] == caps


def test_reuseport_listeners_degrade_only_without_sk_lookup():
    # before 6.5 tc hands SYNs for SO_REUSEPORT listeners to sk_lookup: not a degradation
    results = with_missing("tc_sk_assign_reuseport")
    assert P.decide(results)[0] == "ebpf" and P.degraded(results) == []
    assert P.build_report("6.1.0", results)["inbound_reuseport"] == "sk_lookup"
    # the fallback is tried for real: where it failed, the capability is lost
    assert P.degraded(with_missing("tc_sk_assign_reuseport", "sk_lookup_reuseport")) == [
        P.BY_NAME["tc_sk_assign_reuseport"].capability]
    both = with_missing("tc_sk_assign_reuseport", "sk_lookup", "sk_lookup_reuseport")
    assert any("SO_REUSEPORT" in c for c in P.degraded(both))
    assert P.build_report("5.8.0", both)["inbound_reuseport"] is None


def test_degraded_capabilities_are_unique():
    caps = P.degraded(with_missing("cgroup_sendmsg4", "cgroup_recvmsg4",
                                   "cgroup_getpeername4", "cgroup_getpeername6"))
    assert caps == ["DNS capture unavailable", "apps see the sidecar as peer"]


def test_iptables_backends_do_not_matter_in_ebpf_mode():
    mode, _ = P.decide(with_missing("iptables_nft", "iptables_legacy"))
    assert mode == "ebpf"


def test_one_iptables_backend_is_enough():
    mode, reason = P.decide(with_missing("cgroup_connect4", "iptables_legacy"))
    assert mode == "iptables"
    assert "iptables-nft works" in reason and "iptables-legacy" not in reason


def test_no_ebpf_and_no_iptables_still_says_iptables_but_warns():
    results = with_missing("cgroup_getsockopt", "iptables_nft", "iptables_legacy",
                           detail="iptables-nft is not installed")
    mode, reason = P.decide(results)
    assert mode == "iptables"          # the schema has no "none"
    assert "no iptables backend works" in reason and "will fail" in reason
    assert "make setup" in reason


def test_old_bcc_names_the_fix():
    results = with_missing("bcc", detail="bcc 0.24.0 is older than 0.25: it cannot set "
                                         "expected_attach_type")
    mode, reason = P.decide(results)
    assert mode == "iptables"
    assert "bcc 0.24.0" in reason and "make setup" in reason


def test_missing_headers_name_the_fix():
    mode, reason = P.decide(with_missing("kernel_headers", detail="no headers"))
    assert mode == "iptables"
    assert "kernel headers" in reason and "make setup" in reason


def test_unprobed_feature_counts_as_missing():
    results = all_ok()
    del results["sockhash"]
    mode, reason = P.decide(results)
    assert mode == "iptables" and "SOCKHASH" in reason


def test_real_failure_detail_is_kept_in_the_reason():
    mode, reason = P.decide(with_missing("cgroup_connect4", detail="Operation not permitted"))
    assert "Operation not permitted" in reason


def test_reason_stays_readable_when_much_is_missing():
    results = {n: {"ok": False, "detail": "x"} for n in P.BY_NAME}
    _, reason = P.decide(results)
    # connect4 and getsockopt are named first, in full; the rest by title
    assert reason.index("cgroup/connect4") < reason.index("cgroup/getsockopt")
    assert "also missing:" in reason
    assert reason.count("needed to") == 2


# --- assume-kernel ---------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("3.10", (3, 10)), ("4.18.0-305.el8.x86_64", (4, 18)),
                                       ("6.18.44-fc-v657", (6, 18)), (" 5.4", (5, 4))])
def test_parse_kernel_version(text, want):
    assert P.parse_kernel_version(text) == want


@pytest.mark.parametrize("bad", ["", "six", "5", "v5.4x"])
def test_bad_kernel_version_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        P.parse_kernel_version(bad)


def test_assumed_absent_compares_versions_not_strings():
    f = P.BY_NAME["cgroup_getsockopt"]         # 5.3
    assert P.assumed_absent(f, "5.10") is None  # 5.10 > 5.3 although "5.10" < "5.3"
    assert P.assumed_absent(f, "5.3") is None
    assert P.assumed_absent(f, "5.2") == "assumed absent: kernel 5.2 < mainline 5.3"
    assert P.assumed_absent(P.BY_NAME["bcc"], "3.10") is None   # not a kernel feature


def test_assume_310_chooses_iptables_and_says_why():
    report = P.build_report("6.18.44", all_ok(), assume_kernel="3.10")
    assert report["mode"] == "iptables"
    assert report["kernel"] == "6.18.44" and report["assumed_kernel"] == "3.10"
    assert report["reason"].startswith("assuming kernel 3.10:")
    assert "kernel lacks cgroup/connect4 (mainline 4.17)" in report["reason"]
    assert report["degraded"] == []
    for f in P.FEATURES:
        r = report["features"][f.name]
        if f.mainline:
            assert r == {"ok": False,
                         "detail": f"assumed absent: kernel 3.10 < mainline {P.fmt_version(f.mainline)}"}
        else:   # bcc, headers, iptables stay real
            assert r == {"ok": True, "detail": "fine"}


@pytest.mark.parametrize("version,mode,first", [
    ("4.19", "iptables", "cgroup/getsockopt"),
    ("5.4", "iptables", "bpf_get_netns_cookie in cgroup/connect hooks"),
    ("5.10", "ebpf", None),      # sock_ops' netns cookie: BTF; SO_NETNS_COOKIE: BPF
    ("5.15", "ebpf", None),
    ("6.1", "ebpf", None),
])
def test_assume_kernel_walks_the_table(version, mode, first):
    got, reason = P.decide(all_ok(), assume_kernel=version)
    assert got == mode
    if first:
        assert first in reason


def test_assume_515_keeps_optional_features():
    # 5.15 lacks bpf_sk_assign for SO_REUSEPORT listeners (6.5), but sk_lookup (5.9) takes
    # those connections: nothing is lost
    assert P.degraded(all_ok(), assume_kernel="5.15") == []
    assert P.inbound_reuseport(all_ok(), assume_kernel="5.15") == "sk_lookup"
    assert P.degraded(all_ok(), assume_kernel="6.5") == []
    assert P.inbound_reuseport(all_ok(), assume_kernel="6.5") == "sk_assign"
    assert P.inbound_reuseport(all_ok(), assume_kernel="5.8") is None
    assert "through sk_lookup" in command.render_text(P.build_report("5.15.0", all_ok(), "5.15"))
    # 5.8 has getpeername and bpf_link, not sk_lookup nor bpf_skc_to_tcp_sock (5.9)
    assert sorted(P.degraded(all_ok(), assume_kernel="5.8")) == sorted([
        P.BY_NAME["sk_lookup"].capability, P.BY_NAME["tc_sk_assign_reuseport"].capability,
        P.BY_NAME["splice_backpressure"].capability,
        P.BY_NAME["netns_cookie_sockopt"].capability])


def test_netns_cookie_in_sock_ops_is_covered_by_btf_access_and_sockopt_only_degrades():
    # 5.10: sock_ops and sk_msg find the netns through BTF (splice_backpressure's check)
    mode, reason = P.decide(with_missing("netns_cookie_sock_ops", "netns_cookie_sockopt"))
    assert mode == "ebpf"
    assert P.degraded(with_missing("netns_cookie_sock_ops", "netns_cookie_sockopt")) == [
        P.BY_NAME["netns_cookie_sockopt"].capability]
    assert "loopback connection the sidecar did not capture" in reason
    # without that BTF access too, nothing can tell pods apart in sock_ops: iptables
    mode, reason = P.decide(with_missing("netns_cookie_sock_ops", "splice_backpressure"))
    assert mode == "iptables"
    assert "bpf_get_netns_cookie in sock_ops" in reason


def test_disable_features_env_marks_them_absent_and_refuses_unknown_names():
    env = {P.DISABLE_ENV: "netns_cookie_sock_ops, netns_cookie_sockopt"}
    assert P.disabled_features(env) == {"netns_cookie_sock_ops", "netns_cookie_sockopt"}
    out = P.apply_assumption(all_ok(), None, env)
    assert out["netns_cookie_sockopt"] == {"ok": False,
                                           "detail": f"disabled by {P.DISABLE_ENV}"}
    assert out["sock_ops"]["ok"]
    assert P.disabled_features({}) == set()
    with pytest.raises(UsageError, match="unknown feature nope"):
        P.disabled_features({P.DISABLE_ENV: "ringbuf,nope"})


def test_disable_features_env_reaches_the_report(monkeypatch):
    monkeypatch.setenv(P.DISABLE_ENV, "netns_cookie_sockopt")
    report = P.build_report("6.18.0", all_ok())
    assert report["mode"] == "ebpf"
    assert report["features"]["netns_cookie_sockopt"]["ok"] is False
    assert report["degraded"] == [P.BY_NAME["netns_cookie_sockopt"].capability]


def test_apply_assumption_does_not_change_its_input():
    results = all_ok()
    P.apply_assumption(results, "3.10")
    assert results == all_ok()


# --- report and rendering --------------------------------------------------------------
def test_report_schema():
    report = P.build_report("6.1.0-13-amd64", with_missing("sk_lookup"))
    assert set(report) == {"kernel", "assumed_kernel", "features", "mode", "reason", "degraded",
                           "inbound_reuseport"}
    assert report["assumed_kernel"] is None
    assert set(report["features"]) == set(P.BY_NAME)
    for v in report["features"].values():
        assert set(v) == {"ok", "detail"}
        assert isinstance(v["ok"], bool) and isinstance(v["detail"], str)
    assert report["mode"] in ("ebpf", "iptables")
    json.dumps(report)


def test_render_text_lists_every_feature_and_the_mode():
    report = P.build_report("6.1.0", with_missing("cgroup_getpeername4"), assume_kernel=None)
    text = command.render_text(report)
    lines = text.splitlines()
    assert lines[0] == "kernel: 6.1.0"
    for f in P.FEATURES:
        assert any(line.startswith(f.name + " ") for line in lines), f.name
    row = next(line for line in lines if line.startswith("cgroup_getpeername4 "))
    assert "missing" in row and "5.8" in row and "optional" in row
    assert f"mode: ebpf — {report['reason']}" in lines
    assert "degraded: apps see the sidecar as peer" in lines


def test_render_text_shows_the_assumption():
    text = command.render_text(P.build_report("6.18", all_ok(), assume_kernel="3.10"))
    assert text.splitlines()[0] == "kernel: 6.18 (assuming 3.10)"
    assert "mode: iptables — assuming kernel 3.10" in text


# --- the CLI command (probe itself stubbed: this is the pure rendering path) ------------
def test_cli_json_and_env(monkeypatch):
    seen = {}

    def fake_probe(assume_kernel=None):
        seen["assume"] = assume_kernel
        return P.build_report("6.1.0", all_ok(), assume_kernel)

    monkeypatch.setattr(prober, "probe", fake_probe)
    res = CliRunner().invoke(command.probe_command, ["-o", "json"], env={P.ASSUME_ENV: "4.9"})
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert seen["assume"] == "4.9"
    assert doc["mode"] == "iptables" and doc["assumed_kernel"] == "4.9"
    res = CliRunner().invoke(command.probe_command, ["--assume-kernel", "6.1"])
    assert res.exit_code == 0 and "mode: ebpf" in res.output


def test_cli_not_root_exits_4(monkeypatch):
    monkeypatch.setattr(prober.os, "geteuid", lambda: 1000)
    monkeypatch.delenv(P.ASSUME_ENV, raising=False)
    res = CliRunner().invoke(command.probe_command, [])
    assert res.exit_code == UnsupportedError.exit_code
    assert "needs root" in res.output


def test_cli_bad_assume_kernel_exits_2(monkeypatch):
    res = CliRunner().invoke(command.probe_command, ["--assume-kernel", "banana"])
    assert res.exit_code == UsageError.exit_code
    assert "banana" in res.output


# --- small pure helpers of the checks ---------------------------------------------------
@pytest.mark.parametrize("text,want", [("0.26.0", (0, 26, 0)), ("v0.24.0-1", (0, 24, 0)),
                                       ("0.25", (0, 25, 0)), ("dev", None)])
def test_parse_bcc_version(text, want):
    assert prober.parse_bcc_version(text) == want


@pytest.mark.parametrize("version,ok", [("0.17.0", False), ("0.18.0", True), ("0.24.0", True)])
def test_check_bcc_with_a_fake_old_bcc(tmp_path, version, ok):
    # Debian 11's 0.18 is the floor: meshbpf loads what it compiled itself (ebpf/loader.py)
    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "__init__.py").write_text(f"__version__ = '{version}'\n")
    script = tmp_path / "py"
    import sys
    script.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} -S \"$@\"\n")
    script.chmod(0o755)
    got, detail = prober.check_bcc(python=str(script))
    assert got is ok and version in detail
    if not ok:
        assert "older than 0.18" in detail


def test_check_kernel_headers_sources(tmp_path):
    mods = tmp_path / "modules"
    kh = tmp_path / "kheaders.tar.xz"
    ok, detail = prober.check_kernel_headers("9.9.9", str(mods), str(kh))
    assert not ok and "make setup" in detail
    kh.write_bytes(b"")
    ok, detail = prober.check_kernel_headers("9.9.9", str(mods), str(kh))
    assert ok and str(kh) in detail
    src = tmp_path / "linux-headers-6.1.0-9-amd64"
    (src / "include").mkdir(parents=True)
    (mods / "9.9.9").mkdir(parents=True)
    (mods / "9.9.9" / "build").symlink_to(src)
    ok, detail = prober.check_kernel_headers("9.9.9", str(mods), str(kh))
    assert ok and str(src) in detail and "headers of 6.1.0-9-amd64, not of 9.9.9" in detail


# --- bpfsys instruction encoding (struct bpf_insn, little-endian) -----------------------
def test_insn_encoding():
    assert B.mov64_imm(0, 1) == bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0])
    assert B.mov64_imm(3, -1) == bytes([0xb7, 0x03, 0, 0, 0xff, 0xff, 0xff, 0xff])
    assert B.mov64_reg(1, 6) == bytes([0xbf, 0x61, 0, 0, 0, 0, 0, 0])   # src in high nibble
    assert B.call(B.BPF_FUNC_get_netns_cookie) == bytes([0x85, 0, 0, 0, 122, 0, 0, 0])
    assert B.exit() == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    ld = B.ld_map_fd(1, 7)
    assert len(ld) == 16
    assert ld[:8] == bytes([0x18, 0x11, 0, 0, 7, 0, 0, 0])   # src = BPF_PSEUDO_MAP_FD
    assert ld[8:] == bytes(8)
    code, regs, off, imm = struct.unpack("<BBhi", B.insn(0x07, dst=2, src=0, off=-3, imm=5))
    assert (code, regs & 0xf, regs >> 4, off, imm) == (0x07, 2, 0, -3, 5)


def test_assemble_checks_shape():
    assert B.assemble(B.return_imm(1)) == B.mov64_imm(0, 1) + B.exit()
    assert B.assemble(b"\x95" + bytes(7)) == B.exit()
    with pytest.raises(ValueError):
        B.assemble([])
    with pytest.raises(ValueError):
        B.assemble(b"\x95\x00")
    with pytest.raises(ValueError):
        B.insn(0x95, dst=11)


def test_object_names_are_bounded():
    with pytest.raises(ValueError):
        B._name("x" * 16)
    assert B._name("meshbpf_connect") == b"meshbpf_connect"


def test_attr_layouts_match_the_kernel_uapi():
    # offsets from include/uapi/linux/bpf.h (union bpf_attr)
    assert B._ProgLoadAttr.expected_attach_type.offset == 68
    assert B._ProgLoadAttr.prog_name.offset == 48
    assert B._ProgLoadAttr.log_buf.offset == 32
    assert B._MapCreateAttr.map_name.offset == 28
    assert B._AttachAttr.replace_bpf_fd.offset == 16
    assert B._QueryAttr.prog_ids.offset == 16 and B._QueryAttr.prog_cnt.offset == 24
    assert B._MapElemAttr.flags.offset == 24
    assert B._ProgInfo.name.offset == 64
    assert B._MapInfo.name.offset == 24


def test_syscall_number(monkeypatch):
    monkeypatch.setattr(B.platform, "machine", lambda: "aarch64")
    assert B.syscall_nr() == 280
    monkeypatch.setattr(B.platform, "machine", lambda: "x86_64")
    assert B.syscall_nr() == 321
    monkeypatch.setattr(B.platform, "machine", lambda: "s390x")
    with pytest.raises(UnsupportedError):
        B.syscall_nr()


def test_netns_cookie_in_sockopt_is_not_assumed_on_510():
    # The 5.10 VM guest (Debian 11's kernel) rejects bpf_get_netns_cookie in cgroup/getsockopt
    # programs; 6.1 accepts it. The table said 5.8, so --assume-kernel 5.10 claimed it. 5.10
    # runs eBPF without it (sk_orig socket storage), losing only the capability it names.
    assert P.BY_NAME["netns_cookie_sockopt"].mainline == (5, 15)
    mode, reason = P.decide(all_ok(), assume_kernel="5.10")
    assert mode == "ebpf"
    assert P.BY_NAME["netns_cookie_sockopt"].capability in reason


def test_sk_lookup_to_reuseport_listeners_needs_no_so_netns_cookie():
    # meshbpf's sk_lookup path keys listeners by netns cookie, which user space reads
    # through BPF where SO_NETNS_COOKIE (5.14) is missing: sk_lookup's 5.9 is enough.
    assert P.BY_NAME["sk_lookup_reuseport"].mainline == (5, 9)
    assert P.inbound_reuseport(all_ok(), assume_kernel="5.10") == "sk_lookup"


def test_a_feature_not_tried_is_not_blamed_on_the_kernel():
    # Debian 11 userland (bcc 0.18) on 5.10: the inbound probe needs bcc, so tc_sk_assign
    # was never tried; the reason must not say the kernel lacks it.
    r = with_missing("bcc", "tc_sk_assign", detail="not tried: bcc 0.18.0 is older than 0.25")
    mode, reason = P.decide(r)
    assert mode == "iptables"
    assert "kernel lacks bpf_sk_assign" not in reason
    assert "bpf_sk_assign from tc could not be checked (not tried: bcc 0.18.0" in reason


# --- the real probe on a CentOS 7 node (3.10, no bcc), everything below it faked ----------
@pytest.fixture
def centos7_node(monkeypatch):
    """prober.probe() as a CentOS 7 node would run it: every bpf(2) call fails (`err`), no
    cgroup v2, no bpffs, no BTF, no SO_NETNS_COOKIE, no bcc, iptables 1.4.21 only."""
    import os
    import subprocess
    from meshbpf.ebpf import btf
    from meshbpf.errors import MeshbpfError
    from meshbpf.iptables import backend

    def setup(err):
        def no_bpf(cmd, attr, what="bpf()"):
            raise B.BpfError(err, what)

        def no(exc):
            def raise_(*a, **kw):
                raise exc
            return raise_

        uname = os.uname()
        release = "3.10.0-1160.el7.x86_64"
        monkeypatch.setattr(prober.os, "uname", lambda: os.uname_result(
            (uname.sysname, uname.nodename, release, uname.version, uname.machine)))
        monkeypatch.setattr(prober.os, "geteuid", lambda: 0)
        monkeypatch.setattr(prober.memlock, "raise_memlock", lambda: None)
        monkeypatch.setattr(B, "bpf", no_bpf)
        monkeypatch.setattr(prober.system, "cgroup2_mount",
                            no(UnsupportedError("cgroup v2 is not mounted")))
        monkeypatch.setattr(prober.system, "ensure_bpffs", no(MeshbpfError(
            "`mount -t bpf bpf /sys/fs/bpf` failed (exit 32): unknown filesystem type 'bpf'")))
        monkeypatch.setattr(prober.system, "netns_cookie", no(UnsupportedError(
            "kernel cannot report netns cookies (SO_NETNS_COOKIE): Protocol not available")))
        monkeypatch.setattr(btf, "tcp_sock_offsets", no(btf.BtfError("no /sys/kernel/btf/vmlinux")))
        binaries = {"iptables", "iptables-save", "iptables-restore", "ip6tables",
                    "ip6tables-save", "ip6tables-restore"}
        monkeypatch.setattr(backend.shutil, "which", lambda b: f"/sbin/{b}" if b in binaries else None)
        monkeypatch.setattr(backend, "_version_text",
                            lambda b: "iptables v1.4.21\n" if b in binaries else "")
        ran = []

        def run(cmd, timeout=60):
            ran.append(cmd)
            tool = cmd[2] if cmd[:2] == ["unshare", "--net"] else cmd[0]
            if len(cmd) > 2 and cmd[1] == "-c" and "import bcc" in cmd[2]:
                return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\n"
                                                   "ModuleNotFoundError: No module named 'bcc'\n")
            if tool not in binaries:
                return subprocess.CompletedProcess(cmd, 127, "", f"{tool} is not installed")
            if cmd[1:] == ["--version"]:
                return subprocess.CompletedProcess(cmd, 0, "iptables v1.4.21\n", "")
            return subprocess.CompletedProcess(cmd, 0, "-P PREROUTING ACCEPT\n", "")
        monkeypatch.setattr(prober, "_run", run)
        return release, ran
    return setup


@pytest.mark.parametrize("err", ["ENOSYS", "EINVAL"])
def test_probe_on_centos7_says_iptables_and_why_without_bcc(centos7_node, err):
    import errno
    release, ran = centos7_node(getattr(errno, err))
    report = prober.probe()
    assert report["kernel"] == release and report["mode"] == "iptables"
    f = report["features"]
    assert all(v["detail"] != "not probed" for v in f.values())
    assert f["bcc"] == {"ok": False, "detail": "bcc is not importable: "
                        "ModuleNotFoundError: No module named 'bcc'"}
    assert f["iptables_legacy"]["ok"] and "iptables v1.4.21" in f["iptables_legacy"]["detail"]
    assert not f["iptables_nft"]["ok"]
    assert f["cgroup2"] == {"ok": False, "detail": "cgroup v2 is not mounted"}
    assert not f["bpffs"]["ok"] and "unknown filesystem type 'bpf'" in f["bpffs"]["detail"]
    assert f["tc_sk_assign"]["detail"].startswith("not tried: bcc is not importable")
    assert not any(v["ok"] for n, v in f.items() if P.BY_NAME[n].mainline)
    reason = report["reason"]
    assert reason.startswith("kernel lacks cgroup/connect4 (mainline 4.17; here: ")
    assert reason.endswith("using iptables (iptables-legacy works)")
    assert report["degraded"] == [] and report["inbound_reuseport"] is None
    # the plain iptables is probed as the legacy backend, inside a throwaway netns
    assert ["unshare", "--net", "iptables", "-t", "nat", "-S"] in ran
    # nothing bcc-driven ran: the inbound probe was not tried
    assert not any("inbound" in " ".join(map(str, c)) for c in ran)


def test_probe_cli_on_centos7_prints_the_report_and_exits_0(centos7_node):
    import errno
    centos7_node(errno.EINVAL)
    res = CliRunner().invoke(command.probe_command, ["-o", "json"], env={P.ASSUME_ENV: None})
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["mode"] == "iptables" and "Traceback" not in res.output
    text = command.render_text(doc)
    assert "bcc" in text and "mode: iptables — kernel lacks cgroup/connect4" in text
