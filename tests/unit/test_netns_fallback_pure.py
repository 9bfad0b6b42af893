"""Pure parts of the data path for kernels without bpf_get_netns_cookie in sock_ops, sk_msg
and getsockopt (5.10 LTS): the BTF offsets that find a socket's netns, the defines that
select the variant (also forced on a new kernel by MESHBPF_DISABLE_FEATURES), and the
netns_ino entry every enrolled pod gets."""

import ipaddress

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import btf, loader, structs
from meshbpf.errors import UnsupportedError
from meshbpf.probe import features as P

from .test_splice_pure import _btf_blob

ALL = {f.name: True for f in P.FEATURES}
NETNS_BTF = [("sock_common", [("skc_daddr", 0), ("skc_net", 384)]),
             ("ns_common", [("stashed", 0), ("inum", 128)]),
             ("net", [("passive", 0), ("ns", 1024)])]


def test_netns_offsets_come_from_btf(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(_btf_blob(NETNS_BTF))
    assert btf.netns_offsets(str(p)) == {"skc_net": 48, "inum": 128 + 16}
    assert loader.netns_defines(str(p)) == ["-DMB_SK_NET_OFF=48", "-DMB_NET_INUM_OFF=144"]


def test_netns_offsets_name_what_is_missing(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(_btf_blob(NETNS_BTF[:1] + [("net", [("ns", 8)])]))
    with pytest.raises(btf.BtfError, match="ns_common"):
        btf.netns_offsets(str(p))
    with pytest.raises(UnsupportedError, match="BTF"):
        loader.netns_defines(str(tmp_path / "absent"))


def test_defines_follow_the_features(monkeypatch):
    monkeypatch.delenv(P.DISABLE_ENV, raising=False)
    monkeypatch.setattr(loader, "netns_defines", lambda: ["-DMB_SK_NET_OFF=1",
                                                          "-DMB_NET_INUM_OFF=2"])
    assert not any("NC_SOCK" in f for f in loader.cflags())
    old = {"netns_cookie_sock_ops": False, "netns_cookie_sockopt": False}
    got = loader.cflags(old)
    assert "-DMB_NO_NC_SOCKOPS" in got and "-DMB_NO_NC_SOCKOPT" in got
    assert "-DMB_SK_NET_OFF=1" in got
    # the env forces the same variant on a kernel that has everything
    monkeypatch.setenv(P.DISABLE_ENV, "netns_cookie_sock_ops,netns_cookie_sockopt")
    assert loader.cflags() == got
    text = loader.render_source()
    assert "#define MB_NO_NC_SOCKOPS 1" in text and "#define MB_NO_NC_SOCKOPT 1" in text


def _preprocessed(tmp_path, source, defines):
    """`source` (a program's C file, its lib/ headers inlined) after the preprocessor,
    with the system headers stubbed out: what the compiler sees of our own code."""
    import shutil
    import subprocess
    cpp = shutil.which("cpp")
    if cpp is None:
        pytest.skip("no C preprocessor")
    for h in ("uapi/linux/bpf.h", "linux/in.h", "linux/in6.h", "linux/socket.h"):
        (tmp_path / h).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / h).write_text("")
    out = subprocess.run([cpp, "-P", "-w", "-nostdinc", "-I", str(tmp_path),
                          "-I", loader.BPF_DIR, *defines, source], cwd=loader.BPF_DIR,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("source", ["sockops.c", "sk_msg.c", "getsockopt.c"])
def test_the_variant_never_calls_the_helper_5_10_rejects_there(tmp_path, source):
    """5.10 refuses to load a sock_ops, sk_msg or cgroup/getsockopt program that calls
    bpf_get_netns_cookie (helper 122): the variant's code must not contain the call."""
    splice = ["-DMB_TCP_COPIED_SEQ_OFF=1", "-DMB_TCP_WRITE_SEQ_OFF=2"]
    assert "bpf_get_netns_cookie" in _preprocessed(tmp_path, source, splice)
    variant = splice + ["-DMB_NO_NC_SOCKOPS", "-DMB_NO_NC_SOCKOPT", "-DMB_SK_NET_OFF=48",
                        "-DMB_NET_INUM_OFF=176"]
    assert "bpf_get_netns_cookie" not in _preprocessed(tmp_path, source, variant)


def test_enrolled_pod_gets_its_netns_inode_mapped_to_its_cookie():
    cfg = InterceptConfig()
    pc = structs.pod_struct(cfg, 0)
    addrs = [ipaddress.ip_address("10.0.0.2")]
    out = structs.pod_entries(77, 3, pc, structs.pod_rules(cfg), addrs, addrs,
                              netns_ino=4026532000)
    assert out["netns_ino"] == {structs.u32_bytes(4026532000): structs.u64_bytes(77)}
    assert structs.pod_entries(77, 3, pc, structs.pod_rules(cfg), addrs, addrs)["netns_ino"] == {}
    assert "netns_ino" in loader.MAP_NAMES
    assert structs.ENTRY_MAPS.index("netns_ino") < structs.ENTRY_MAPS.index("pods")


def test_cookie_program_stores_the_helpers_result_in_map_slot_0():
    import struct

    from meshbpf import bpfsys as B
    from meshbpf import netnscookie
    code = B.assemble(netnscookie.program(7))
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    assert insns[0] == (0x85, 0, 0, B.BPF_FUNC_get_netns_cookie)        # r0 = cookie
    assert insns[1] == (0x7b, 0x0a, -8, 0)                               # fp[-8] = r0
    assert insns[3][0] == B.BPF_LD_IMM64 and insns[3][3] == 7            # r1 = map fd 7
    assert (0x85, 0, 0, 2) in insns                                      # map_update_elem
    assert insns[-2:] == [(0xb7, 0, 0, 1), (0x95, 0, 0, 0)]              # allow the connect


def test_5_10_is_ebpf_with_only_the_sockopt_capability_degraded():
    report = P.build_report("5.10.0", {f.name: {"ok": True, "detail": "fine"}
                                       for f in P.FEATURES}, "5.10")
    assert report["mode"] == "ebpf"
    assert P.BY_NAME["netns_cookie_sockopt"].capability in report["degraded"]
    assert not report["features"]["so_netns_cookie"]["ok"]
    assert P.BY_NAME["so_netns_cookie"].role == P.INFO


def test_old_bcc_is_recognised_by_its_load_func_signature():
    def new_bcc(self, func_name, prog_type, device=None, attach_type=-1):
        pass

    def old_bcc(self, func_name, prog_type, device=None):     # bcc < 0.25 (Debian 11: 0.18)
        pass
    assert loader.bcc_sets_attach_type(new_bcc)
    assert not loader.bcc_sets_attach_type(old_bcc)
    assert not loader.bcc_sets_attach_type(object())


def _insn(code, regs, imm, off=0):
    return bytes([code, regs]) + off.to_bytes(2, "little") + imm.to_bytes(4, "little", signed=True)


def test_old_bcc_sk_msg_gets_sock_hash_in_place_of_the_placeholder_fd():
    ph = loader.SOCKHASH_FD_PLACEHOLDER
    prog = (_insn(0xb7, 0x00, ph)                        # r0 = ph: a constant, not a map
            + _insn(0x18, 0x12, ph) + _insn(0, 0, 0)      # r2 = map_fd(ph): patched
            + _insn(0x18, 0x11, 7) + _insn(0, 0, 0)       # r1 = map_fd(7): another map
            + _insn(0x18, 0x03, ph) + _insn(0, 0, 0)      # r3 = imm64 ph: not a map load
            + _insn(0x95, 0, 0))
    out, n = loader.patch_map_fd(prog, ph, 42)
    assert n == 1 and len(out) == len(prog)
    assert out[8:16] == _insn(0x18, 0x12, 42) and out[:8] == prog[:8] and out[16:] == prog[16:]
    assert loader.patch_map_fd(out, ph, 42) == (out, 0)


def test_the_placeholder_define_comes_with_the_splice(monkeypatch):
    monkeypatch.setattr(loader, "splice_defines", lambda: [])
    flag = f"-DMB_SOCKHASH_FD={loader.SOCKHASH_FD_PLACEHOLDER:#x}"
    assert flag in loader.cflags(ALL, splice=True)
    assert flag not in loader.cflags(ALL, splice=False)


def test_without_a_probe_report_the_loader_tries_the_helper_itself(monkeypatch):
    """`--mode ebpf` gives the loader no probe report: on 5.10 it must still pick the
    variant (the 5.10 VM guest refused mb_getsockopt: unknown func #122)."""
    from meshbpf import bpfsys as B
    monkeypatch.delenv(P.DISABLE_ENV, raising=False)
    monkeypatch.setattr(loader, "netns_defines", lambda: ["-DMB_SK_NET_OFF=1",
                                                          "-DMB_NET_INUM_OFF=2"])
    tried = []

    def refuse(prog_type, insns, expected_attach_type=0, **kw):
        tried.append(prog_type)
        raise B.BpfError(22, "loading")                      # EINVAL: unknown func
    monkeypatch.setattr(B, "prog_load", refuse)
    monkeypatch.setattr(loader, "_tried_results", {})
    got = loader.cflags()
    assert "-DMB_NO_NC_SOCKOPS" in got and "-DMB_NO_NC_SOCKOPT" in got
    assert sorted(tried) == sorted([B.BPF_PROG_TYPE_SOCK_OPS, B.BPF_PROG_TYPE_CGROUP_SOCKOPT])
    loader.cflags()
    assert len(tried) == 2                                   # once per process
    # a probe report, when given, decides
    assert not any("NC_SOCK" in f for f in loader.cflags({"netns_cookie_sock_ops": True,
                                                           "netns_cookie_sockopt": True}))


def test_programs_without_an_attach_type_load_through_an_old_bccs_load_func():
    """Debian 11's bcc: load_func(name, type, device=None) - no attach_type keyword."""
    loaded = []

    class OldBcc:
        def load_func(self, func_name, prog_type, device=None):
            loaded.append((func_name, prog_type))
            return type("Fn", (), {"fd": 42})()
    tc = next(p for p in loader.PROGRAMS if p.name == "tc_inbound_ingress")
    assert loader._load_prog(OldBcc(), tc) == 42
    assert loaded == [(b"tc_inbound_ingress", tc.prog_type)]
