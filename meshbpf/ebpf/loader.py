"""Compile, load, pin and attach meshbpf's node-wide eBPF programs — once per node.

The C programs in bpf/ are concatenated, with the bpf/lib/ headers they include inlined
once each, into ONE bcc module (so all programs share its maps), compiled with cflags
chosen from the kernel's features, loaded with their expected attach types and pinned
under <pin_prefix>/{progs,maps,links}. The cgroup programs are attached once at
`cgroup_root` through pinned bpf_links (or BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI where
links are missing); sk_msg is attached to the sockhash. A later process ADOPTS what is
pinned (never loads or attaches twice); `unload` removes exactly what `ensure_loaded`
created. The pinned set carries its version and map layouts (<pin_prefix>/meta,
meshbpf.ebpf.versions); meshbpf.ebpf.upgrade replaces programs of another version in
place, on the same maps.
"""

import ctypes
import dataclasses
import errno
import glob
import os
import re

from .. import __version__, bpfsys, memlock, system
from ..errors import ApplyError, MeshbpfError, UnsupportedError, UsageError
from ..probe.features import disabled_features
from . import btf, structs
from .versions import (META_PIN, META_VALUE_SIZE, decode_meta, encode_meta, map_fingerprint,
                       program_set_version)
from .maps import Maps

# The C sources ship inside the package (package data), so an installed meshbpf finds them.
BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
LIB_DIR = "lib"           # bpf/lib/: the headers the programs include


@dataclasses.dataclass(frozen=True)
class ProgSpec:
    name: str              # C function name (= pin name)
    source: str            # file in bpf/
    prog_type: int         # BPF_PROG_TYPE_*
    attach_type: int       # expected/attach type (BPF_CGROUP_*, BPF_SK_MSG_VERDICT), or -1
    target: str            # "cgroup", "sockhash", "netns" (per pod, by the inbound module)
                           # or "none" (attached elsewhere, e.g. tc)
    feature: str = None    # probe feature that must be present
    splice: bool = False   # only when splicing is on


B = bpfsys
PROGRAMS = (
    ProgSpec("mb_connect4", "connect4.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET4_CONNECT, "cgroup"),
    ProgSpec("mb_connect6", "connect6.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET6_CONNECT, "cgroup"),
    ProgSpec("mb_getpeername4", "getpeername4.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET4_GETPEERNAME, "cgroup", feature="cgroup_getpeername4"),
    ProgSpec("mb_getpeername6", "getpeername6.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET6_GETPEERNAME, "cgroup", feature="cgroup_getpeername6"),
    # getsockname came with getpeername (Linux 5.8, one commit): the same probe says both
    ProgSpec("mb_getsockname4", "getsockname4.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET4_GETSOCKNAME, "cgroup", feature="cgroup_getpeername4"),
    ProgSpec("mb_getsockname6", "getsockname6.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_INET6_GETSOCKNAME, "cgroup", feature="cgroup_getpeername6"),
    ProgSpec("mb_getsockopt", "getsockopt.c", B.BPF_PROG_TYPE_CGROUP_SOCKOPT,
             B.BPF_CGROUP_GETSOCKOPT, "cgroup"),
    ProgSpec("mb_sockops", "sockops.c", B.BPF_PROG_TYPE_SOCK_OPS,
             B.BPF_CGROUP_SOCK_OPS, "cgroup"),
    ProgSpec("mb_sendmsg4", "sendmsg4.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_UDP4_SENDMSG, "cgroup", feature="cgroup_sendmsg4"),
    ProgSpec("mb_sendmsg6", "sendmsg6.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_UDP6_SENDMSG, "cgroup", feature="cgroup_sendmsg4"),
    ProgSpec("mb_recvmsg4", "recvmsg4.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_UDP4_RECVMSG, "cgroup", feature="cgroup_recvmsg4"),
    ProgSpec("mb_recvmsg6", "recvmsg6.c", B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
             B.BPF_CGROUP_UDP6_RECVMSG, "cgroup", feature="cgroup_recvmsg4"),
    ProgSpec("mb_sock_release", "sock_release.c", B.BPF_PROG_TYPE_CGROUP_SOCK,
             B.BPF_CGROUP_INET_SOCK_RELEASE, "cgroup", feature="cgroup_sock_release"),
    ProgSpec("mb_sk_msg", "sk_msg.c", B.BPF_PROG_TYPE_SK_MSG,
             B.BPF_SK_MSG_VERDICT, "sockhash", feature="splice_backpressure", splice=True),
    ProgSpec("tc_inbound_ingress", "tc_inbound.c", B.BPF_PROG_TYPE_SCHED_CLS, -1, "none"),
    ProgSpec("mb_sk_lookup", "sk_lookup.c", B.BPF_PROG_TYPE_SK_LOOKUP, B.BPF_SK_LOOKUP, "netns",
             feature="sk_lookup"),
)
CORE_SOURCES = ("connect4.c", "connect6.c", "getpeername4.c", "getpeername6.c",
                "getsockname4.c", "getsockname6.c",
                "getsockopt.c", "sockops.c", "sock_release.c", "sk_msg.c",
                "sendmsg4.c", "sendmsg6.c", "recvmsg4.c", "recvmsg6.c")
DNS_PROGRAMS = ("mb_sendmsg4", "mb_sendmsg6", "mb_recvmsg4", "mb_recvmsg6")
MAP_NAMES = ("pods", "cidr_rules", "port_rules", "local_ips", "node_cfg", "orig_dst",
             "pairs", "sock_hash", "dns_orig", "counters", "pod_conns", "netns_addrs",
             "netns_src", "netns_ino")
# Overrides the per-node connection capacity (bpf/lib/types.h MB_MAX_CONNS) at load time, so
# a test can fill the maps in its own pin prefix. Unset: the header's default.
MAX_CONNS_ENV = "MESHBPF_MAX_CONNS"
# Extra -D defines (space separated) rendered into the C: a test makes a "new" program set
# (another version) from the same C with a harmless define.
EXTRA_CFLAGS_ENV = "MESHBPF_BPF_EXTRA_CFLAGS"

SOCKHASH_MAP = "sock_hash"


def _has(features, name):
    """Feature present? `features`: None (assume a modern kernel), {name: bool} or a probe
    report ({"features": {name: {"ok": ...}}}). MESHBPF_DISABLE_FEATURES wins over both."""
    if name and name in disabled_features():
        return False
    if name in _TRIED and features is None:
        return _tried(name)
    if not name or features is None:
        return True
    feats = features.get("features", features) if isinstance(features, dict) else {}
    v = feats.get(name, True)
    if isinstance(v, dict):
        v = v.get("ok", True)
    return bool(v)


# Features the programs' variant depends on that the loader tries for itself when it is
# given no probe report (mode forced to ebpf): a 5.10 kernel must never get the variant
# that calls bpf_get_netns_cookie in sock_ops or getsockopt. name -> (prog type, attach).
_TRIED = {
    "netns_cookie_sock_ops": (bpfsys.BPF_PROG_TYPE_SOCK_OPS, 0),
    "netns_cookie_sockopt": (bpfsys.BPF_PROG_TYPE_CGROUP_SOCKOPT, bpfsys.BPF_CGROUP_GETSOCKOPT),
}
_tried_results = {}


def _tried(name):
    """Does a program of that type calling bpf_get_netns_cookie load here? (once per
    process; a program that loads is closed at once)."""
    if name not in _tried_results:
        prog_type, attach = _TRIED[name]
        insns = [bpfsys.call(bpfsys.BPF_FUNC_get_netns_cookie), *bpfsys.return_imm(1)]
        try:
            os.close(bpfsys.prog_load(prog_type, insns, expected_attach_type=attach,
                                      log_size=0))
            _tried_results[name] = True
        except bpfsys.BpfError as e:
            _tried_results[name] = e.errno not in (errno.EINVAL, errno.EACCES)
    return _tried_results[name]


def splice_defines(btf_path=btf.VMLINUX):
    """The -D values the splice's backpressure needs (tcp_sock offsets from the running
    kernel's BTF); raises UnsupportedError when this kernel cannot give them."""
    try:
        off = btf.tcp_sock_offsets(btf_path)
    except btf.BtfError as e:
        raise UnsupportedError(f"splicing needs the kernel's BTF for its backpressure: {e}",
                               hint="use --no-splice, or a kernel built with "
                                    "CONFIG_DEBUG_INFO_BTF (5.10 or later)")
    return [f"-DMB_TCP_COPIED_SEQ_OFF={off['copied_seq']}",
            f"-DMB_TCP_WRITE_SEQ_OFF={off['write_seq']}"]


def netns_defines(btf_path=btf.VMLINUX):
    """The -D values sock_ops and sk_msg need to find a socket's netns without
    bpf_get_netns_cookie (lib/conn.h, MB_NO_NC_SOCKOPS): where struct net sits in a socket
    and its inode number in struct net, from the running kernel's BTF."""
    try:
        off = btf.netns_offsets(btf_path)
    except btf.BtfError as e:
        raise UnsupportedError("this kernel has no bpf_get_netns_cookie in sock_ops, and "
                               f"the way around it needs the kernel's BTF: {e}",
                               hint="use a kernel built with CONFIG_DEBUG_INFO_BTF (5.10 or "
                                    "later), or iptables mode")
    return [f"-DMB_SK_NET_OFF={off['skc_net']}", f"-DMB_NET_INUM_OFF={off['inum']}"]


def cflags(features=None, splice=False):
    """Compiler flags for the features present (documentation for the C as much as gates)."""
    flags = []
    if splice:
        # sk_msg.c hands bpf_msg_redirect_hash this placeholder map fd; _own_load patches it
        flags += splice_defines() + [f"-DMB_SOCKHASH_FD={SOCKHASH_FD_PLACEHOLDER:#x}"]
    if not _has(features, "netns_cookie_sock_ops"):
        flags.append("-DMB_NO_NC_SOCKOPS")   # sock_ops/sk_msg: netns via BTF + netns_ino
        flags += netns_defines()
    if not _has(features, "netns_cookie_sockopt"):
        flags.append("-DMB_NO_NC_SOCKOPT")   # getsockopt: loopback keys by 4-tuple alone
    if not _has(features, "cgroup_sock_release"):
        flags.append("-DMB_NO_SOCK_RELEASE")
    if not _has(features, "ringbuf"):
        flags.append("-DMB_NO_RINGBUF")      # no trace_events / trace_on (lib/trace.h)
    n = max_conns()
    if n is not None:
        flags.append(f"-DMB_MAX_CONNS={n}")
    return flags + extra_cflags()


def extra_cflags(environ=None):
    """The -D flags from MESHBPF_BPF_EXTRA_CFLAGS ([] when unset). Only -DNAME or
    -DNAME=VALUE: anything else could change more than a define and is refused."""
    raw = (os.environ if environ is None else environ).get(EXTRA_CFLAGS_ENV, "")
    out = []
    for fl in raw.split():
        if not re.fullmatch(r"-D[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]*)?", fl):
            raise UsageError(f"{EXTRA_CFLAGS_ENV}: {fl!r} is not a -DNAME or -DNAME=VALUE define")
        out.append(fl)
    return out


def max_conns(environ=None):
    """The MB_MAX_CONNS override from MESHBPF_MAX_CONNS, or None (the header's default)."""
    raw = (os.environ if environ is None else environ).get(MAX_CONNS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 2 <= n <= 1 << 24:
        raise UsageError(f"{MAX_CONNS_ENV}={raw!r} must be a number of connections "
                         f"from 2 to {1 << 24}")
    return n


def wanted_programs(source_text, features=None, splice=True):
    """The ProgSpecs to load: defined in the source, supported, and splice-appropriate."""
    out = []
    for p in PROGRAMS:
        if not re.search(r"\bint\s+" + p.name + r"\s*\(", source_text):
            continue
        if not _has(features, p.feature):
            continue
        if p.splice and not splice:
            continue
        out.append(p)
    return out


_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


def _inline(path, bpf_dir, seen):
    """The text of C file `path` with each `#include "..."` (resolved from the including
    file's folder, as the C compiler does) replaced by that file's text the first time it is
    met and by nothing after: bcc compiles one text, not files, and the headers' include
    guards would make a repeat empty anyway."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UnsupportedError(f"{path} is missing: the installation is incomplete")

    def include(m):
        inc = os.path.normpath(os.path.join(os.path.dirname(path), m.group(1)))
        if inc in seen:
            return ""
        seen.add(inc)
        name = os.path.relpath(inc, bpf_dir)
        return f"/* ==== {name} ==== */\n" + _inline(inc, bpf_dir, seen) + \
            f"/* ==== end of {name} ==== */"
    return _LOCAL_INCLUDE.sub(include, text)


def c_text(names, bpf_dir=BPF_DIR):
    """The one C text of the program files `names` (in bpf/, in that order), every header
    they include inlined once."""
    seen, parts = set(), []
    for name in names:
        parts.append(f"/* ==== {name} ==== */\n" +
                     _inline(os.path.join(bpf_dir, name), bpf_dir, seen))
    return "\n".join(parts)


def header_text(bpf_dir=BPF_DIR):
    """Every header of bpf/lib/, inlined as the programs include them (for the checks
    that compare the C layouts with their Python mirrors)."""
    lib = os.path.join(bpf_dir, LIB_DIR)
    seen, parts = set(), []
    for name in sorted(os.listdir(lib)):
        path = os.path.normpath(os.path.join(lib, name))
        if name.endswith(".h") and path not in seen:
            seen.add(path)
            parts.append(f"/* ==== {LIB_DIR}/{name} ==== */\n" + _inline(path, bpf_dir, seen))
    return "\n".join(parts)


def source_files(bpf_dir=BPF_DIR):
    """bpf/*.c that exist: the core programs in CORE_SOURCES' order (so that every build
    compiles them identically), then the others (tc_inbound.c, sk_lookup.c) by name."""
    present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(bpf_dir, "*.c")))
    core = [f for f in CORE_SOURCES if f in present]
    return core + [f for f in present if f not in core]


def render_source(features=None, bpf_dir=BPF_DIR, splice=False):
    """The C text bcc compiles: each program file, the headers it includes inlined the first
    time (c_text); sk_msg.c only when splicing."""
    parts, names = [], []
    defines = "".join("#define {} {}\n".format(*(fl[2:].split("=", 1) + ["1"])[:2])
                      for fl in cflags(features, splice))
    if defines:
        parts.insert(0, "/* ==== features ==== */\n" + defines)
    have_peer = _has(features, "cgroup_getpeername4") and _has(features, "cgroup_getpeername6")
    have_dns = _has(features, "cgroup_sendmsg4") and _has(features, "cgroup_recvmsg4")
    for name in source_files(bpf_dir):
        if name.startswith(("getpeername", "getsockname")) and not have_peer:
            continue
        if name.startswith(("sendmsg", "recvmsg")) and not have_dns:
            continue
        if name == "sk_lookup.c" and not _has(features, "sk_lookup"):
            continue
        if name == "sk_msg.c" and not splice:
            continue
        names.append(name)
    parts.append(c_text(names, bpf_dir))
    return "\n".join(parts)


# ---- pins ---------------------------------------------------------------------------------

def pin_dirs(pin_prefix):
    return {k: os.path.join(pin_prefix, k) for k in ("progs", "maps", "links")}


def pinned(pin_prefix):
    """What is pinned: {"progs": [...], "maps": [...], "links": [...]} (names)."""
    out = {}
    for k, d in pin_dirs(pin_prefix).items():
        out[k] = sorted(os.listdir(d)) if os.path.isdir(d) else []
    return out


def is_loaded(pin_prefix):
    p = pinned(pin_prefix)
    return ("mb_connect4" in p["progs"] and all(m in p["maps"] for m in MAP_NAMES))


def _safe_prefix(pin_prefix):
    real = os.path.realpath(pin_prefix)
    if not real.startswith(system.BPFFS + "/") or real == system.BPFFS:
        raise UsageError(f"pin prefix {pin_prefix} must be a directory under {system.BPFFS}")
    return real


def _check_cgroup_root(cgroup_root):
    mount = system.cgroup2_mount()
    real = os.path.realpath(cgroup_root)
    if not os.path.isfile(os.path.join(real, "cgroup.procs")):
        raise UsageError(f"{cgroup_root} is not a cgroup v2 directory")
    if not (real == mount or real.startswith(mount.rstrip("/") + "/")):
        raise UsageError(f"{cgroup_root} is not under the cgroup v2 mount {mount}")
    return real


# ---- load ---------------------------------------------------------------------------------

def _compile(text):
    try:
        from bcc import BPF
    except ImportError:
        raise UnsupportedError("bcc's Python module is not importable",
                               hint="install python3-bpfcc (Debian) and use a venv made with "
                                    "--system-site-packages; `make setup` does both")
    memlock.raise_memlock()   # before 5.11 BPF memory counts against it (EPERM otherwise)
    try:
        return BPF(text=text.encode(), cflags=["-Wno-comment"])
    except Exception as e:  # bcc raises bare Exception on compile errors
        raise UnsupportedError(f"bcc could not compile meshbpf's programs: {e}",
                               hint="kernel headers missing? see `meshbpf probe`")


# Set (to anything): load the programs that need an expected attach type through
# meshbpf's own bpf(2) path even where bcc could (tests the old-bcc path on a new bcc).
OWN_LOAD_ENV = "MESHBPF_OWN_PROG_LOAD"


def bcc_sets_attach_type(load_func):
    """Can this bcc's BPF.load_func set expected_attach_type (bcc 0.25+)? Without it the
    kernel refuses cgroup/connect4, cgroup/getsockopt, sk_lookup..."""
    import inspect
    try:
        return "attach_type" in inspect.signature(load_func).parameters
    except (TypeError, ValueError):
        return False


# The map fd sk_msg.c hands bpf_msg_redirect_hash ("mbSH": no fd a process here holds), for
# the loader to replace with sock_hash's: bcc before 0.25 (Debian 11's 0.18) cannot rewrite
# sock_hash.msg_redirect_hash ("invalid bpf_table operation"), so no bcc is asked to, and
# mb_sk_msg is always loaded by _own_load. (Deciding by bcc's version would import bcc in
# the agent's own process, which compiles in a child to stay small.)
SOCKHASH_FD_PLACEHOLDER = 0x6D625348
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1


def patch_map_fd(insns, placeholder, fd):
    """The bytecode with every map-fd load of `placeholder` (ld_imm64, src_reg
    BPF_PSEUDO_MAP_FD) pointing at `fd` instead; (new bytes, how many were patched)."""
    out = bytearray(insns)
    n = 0
    for off in range(0, len(out) - 15, 8):
        if out[off] == BPF_LD_IMM64 and out[off + 1] >> 4 == BPF_PSEUDO_MAP_FD and \
                int.from_bytes(out[off + 4:off + 8], "little", signed=True) == placeholder:
            out[off + 4:off + 8] = fd.to_bytes(4, "little", signed=True)
            n += 1
    return bytes(out), n


def _own_load(b, spec, attach_type):
    """Load `spec` from the bytecode bcc compiled (bcc wrote its maps' fds into the
    instructions already: BPF_PSEUDO_MAP_FD loads) with BPF_PROG_LOAD, setting the expected
    attach type an old bcc cannot, and for sk_msg sock_hash's fd in place of the
    placeholder. Kept in b.funcs like bcc's own loads."""
    from bcc import BPF, libbcc
    name = spec.name.encode()
    if name in b.funcs:
        return b.funcs[name].fd
    lic = libbcc.lib.bpf_module_license(b.module)
    insns = b.dump_func(name)
    if spec.splice:
        insns, _ = patch_map_fd(insns, SOCKHASH_FD_PLACEHOLDER,
                                libbcc.lib.bpf_table_fd(b.module, b"sock_hash"))
    fd = bpfsys.prog_load(spec.prog_type, insns, expected_attach_type=max(attach_type, 0),
                          license=lic.decode() if lic else "GPL", name=spec.name[:15])
    b.funcs[name] = BPF.Function(b, name, fd)
    return fd


def _load_prog(b, spec):
    attach_type = spec.attach_type if spec.target in ("cgroup", "netns") else -1
    try:
        if attach_type >= 0 and (os.environ.get(OWN_LOAD_ENV)
                                 or not bcc_sets_attach_type(b.load_func)):
            return _own_load(b, spec, attach_type)
        if spec.splice:
            return _own_load(b, spec, attach_type)   # the placeholder fd needs patching
        if attach_type < 0:          # bcc < 0.25 has no attach_type parameter at all
            fn = b.load_func(spec.name.encode(), spec.prog_type)
        else:
            fn = b.load_func(spec.name.encode(), spec.prog_type, attach_type=attach_type)
    except Exception as e:  # bcc raises bare Exception with the verifier's verdict
        raise ApplyError(f"the kernel refused program {spec.name}: {e}")
    return fn.fd


def load_and_pin(pin_prefix, features=None, splice=True):
    """Compile + load everything and pin programs and maps; returns ({name: prog id},
    [names of capability-only programs the kernel refused]).

    Anything pinned by a failed attempt is removed again.
    """
    _safe_prefix(pin_prefix)
    system.ensure_bpffs()
    degraded = []
    if splice and not _has(features, "splice_backpressure"):
        splice = False               # never splice without backpressure (docs/splice.md)
        degraded.append("mb_sk_msg")
    text = render_source(features, splice=splice)
    b = _compile(text)
    dirs = pin_dirs(pin_prefix)
    ids = {}
    try:
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        from bcc import libbcc
        for name in MAP_NAMES + _extra_maps(b):
            fd = libbcc.lib.bpf_table_fd(b.module, name.encode())
            if fd < 0:
                raise ApplyError(f"map {name} was not created by the compiled module")
            _pin(fd, os.path.join(dirs["maps"], name))
        for spec in wanted_programs(text, features, splice):
            try:
                fd = _load_prog(b, spec)
            except ApplyError:
                if spec.feature:          # a program that only degrades a capability
                    degraded.append(spec.name)
                    continue
                raise
            _pin(fd, os.path.join(dirs["progs"], spec.name))
            ids[spec.name] = bpfsys.prog_get_info(fd)["id"]
        with Maps(pin_prefix) as maps:
            maps["node_cfg"].update(structs.U32(0), structs.node_config(splice))
        write_meta(pin_prefix, {"version": program_set_version(text, cflags(features, splice)),
                                "meshbpf": __version__, "maps": module_map_layouts(b)})
    except BaseException:
        _remove_pins(pin_prefix)
        raise
    finally:
        b.cleanup()
    return ids, degraded


def _extra_maps(b):
    """Maps declared by other parts (the inbound section), pinned like ours."""
    from bcc import libbcc
    lib = libbcc.lib
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    names = []
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i).decode()
        if name not in MAP_NAMES:
            names.append(name)
    return tuple(names)


def _pin(fd, path):
    """Pin `fd` at `path`. An existing pin is an error: it would be another object than
    the one the freshly loaded programs use (ensure_loaded removes stale pins first)."""
    try:
        bpfsys.obj_pin(fd, path)
    except OSError as e:
        raise ApplyError(f"cannot pin {path}: {os.strerror(e.errno)}")


def prog_fd(pin_prefix, name):
    """A new fd for the pinned program `name` (caller closes)."""
    return bpfsys.obj_get(os.path.join(pin_dirs(pin_prefix)["progs"], name))


# ---- the pinned set's meta (meshbpf.ebpf.versions) ------------------------------------

def read_meta(pin_prefix):
    """What the pinned program set says of itself ({} if it says nothing: pinned before
    versions existed, or not loaded)."""
    path = os.path.join(pin_prefix, META_PIN)
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return {}
    try:
        return decode_meta(bpfsys.map_lookup_elem(fd, structs.u32_bytes(0), META_VALUE_SIZE))
    finally:
        os.close(fd)


def write_meta(pin_prefix, meta):
    """Write `meta` into the pinned meta map, creating and pinning it the first time."""
    path = os.path.join(pin_prefix, META_PIN)
    value = encode_meta(meta)
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, META_VALUE_SIZE, 1,
                               name="mb_meta")
        try:
            _pin(fd, path)
        except BaseException:
            os.close(fd)
            raise
    try:
        bpfsys.map_update_elem(fd, structs.u32_bytes(0), value)
    finally:
        os.close(fd)


def module_map_layouts(b):
    """{name: fingerprint} of every map of a compiled bcc module (its fds: bcc's own)."""
    from bcc import libbcc
    out = {}
    for name in MAP_NAMES + _extra_maps(b):
        fd = libbcc.lib.bpf_table_fd(b.module, name.encode())
        if fd < 0:
            continue
        key = libbcc.lib.bpf_table_key_desc(b.module, name.encode())
        leaf = libbcc.lib.bpf_table_leaf_desc(b.module, name.encode())
        out[name] = map_fingerprint(bpfsys.map_get_info(fd), key and key.decode(),
                                    leaf and leaf.decode())
    return out


# ---- attach -------------------------------------------------------------------------------

def _links_supported(features):
    return _has(features, "bpf_link")


def attach_all(pin_prefix, cgroup_root, features=None):
    """Attach every pinned cgroup program at `cgroup_root` (once) and sk_msg to the sockhash.

    Returns a list of {"program", "target", "how"} describing the attachments made now.
    """
    cg = _check_cgroup_root(cgroup_root)
    dirs = pin_dirs(pin_prefix)
    made = []
    progs = pinned(pin_prefix)["progs"]
    specs = {p.name: p for p in PROGRAMS}
    cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in progs:
            spec = specs.get(name)
            if spec is None or spec.target in ("none", "netns"):
                continue
            pfd = prog_fd(pin_prefix, name)
            try:
                made.extend(_attach_one(pin_prefix, spec, pfd, cgfd, cg, dirs, features))
            except OSError:
                if not spec.feature:
                    raise
                # a capability-only hook this kernel cannot attach: the node runs without it
            finally:
                os.close(pfd)
    except OSError as e:
        raise ApplyError(f"attaching meshbpf's programs at {cg} failed: {e}")
    finally:
        os.close(cgfd)
    return made


def _attach_one(pin_prefix, spec, pfd, cgfd, cg, dirs, features):
    """Attach one program unless it already is; returns the attachments made ([] or [one])."""
    name = spec.name
    pid = bpfsys.prog_get_info(pfd)["id"]
    if spec.target == "sockhash":
        with Maps(pin_prefix) as maps:
            if _attached_ids(maps.fd(SOCKHASH_MAP), spec.attach_type, pid):
                return []
            bpfsys.prog_attach(maps.fd(SOCKHASH_MAP), pfd, spec.attach_type)
        return [{"program": name, "target": SOCKHASH_MAP, "how": "prog_attach"}]
    link_path = os.path.join(dirs["links"], name)
    if os.path.exists(link_path):
        return []              # adopted: attached through this pinned link already
    if _attached_ids(cgfd, spec.attach_type, pid):
        return []              # attached with ALLOW_MULTI by an earlier run
    if _links_supported(features):
        try:
            lfd = bpfsys.link_create(pfd, cgfd, spec.attach_type)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                raise
            lfd = None         # no bpf_link for cgroups here: fall back to ALLOW_MULTI
        if lfd is not None:
            try:
                os.makedirs(dirs["links"], exist_ok=True)
                bpfsys.obj_pin(lfd, link_path)
            finally:
                os.close(lfd)
            return [{"program": name, "target": cg, "how": "bpf_link"}]
    bpfsys.prog_attach(cgfd, pfd, spec.attach_type, bpfsys.BPF_F_ALLOW_MULTI)
    return [{"program": name, "target": cg, "how": "prog_attach(ALLOW_MULTI)"}]


def _attached_ids(target_fd, attach_type, prog_id):
    try:
        _, ids = bpfsys.prog_query(target_fd, attach_type)
    except OSError:
        return False
    return prog_id in ids


def attachments(pin_prefix, cgroup_root):
    """[{"program", "id", "attach_type", "target", "attached"}] for status."""
    out = []
    specs = {p.name: p for p in PROGRAMS}
    cgfd = None
    try:
        if cgroup_root and os.path.isdir(cgroup_root):
            cgfd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        maps = Maps(pin_prefix)
        try:
            for name in pinned(pin_prefix)["progs"]:
                spec = specs.get(name)
                pfd = prog_fd(pin_prefix, name)
                try:
                    info = bpfsys.prog_get_info(pfd)
                finally:
                    os.close(pfd)
                rec = {"program": name, "name": name, "id": info["id"], "type": info["type"]}
                if spec and spec.target == "cgroup":
                    rec["target"] = cgroup_root
                    rec["attached"] = bool(cgfd is not None and
                                           _attached_ids(cgfd, spec.attach_type, info["id"]))
                elif spec and spec.target == "sockhash" and maps.exists(SOCKHASH_MAP):
                    rec["target"] = f"map {SOCKHASH_MAP}"
                    rec["attached"] = True
                else:
                    rec["target"] = {"none": "per pod (tc)", "netns": "per pod (netns)"}.get(
                        spec.target) if spec else None
                rec["attach"] = _describe_attach(spec, rec)
                out.append(rec)
        finally:
            maps.close()
    finally:
        if cgfd is not None:
            os.close(cgfd)
    return out


def _describe_attach(spec, rec):
    if spec is None:
        return ""
    if spec.target == "cgroup":
        how = "attached" if rec.get("attached") else "NOT attached"
        return f"{_ATTACH_NAMES.get(spec.attach_type, spec.attach_type)} @ {rec.get('target')} ({how})"
    if spec.target == "sockhash":
        return f"sk_msg verdict @ map {SOCKHASH_MAP}"
    if spec.target == "netns":
        return "sk_lookup on each meshed pod's network namespace (bpf_link)"
    return "tc ingress on each meshed pod's interfaces"


_ATTACH_NAMES = {
    B.BPF_CGROUP_INET4_CONNECT: "cgroup/connect4", B.BPF_CGROUP_INET6_CONNECT: "cgroup/connect6",
    B.BPF_CGROUP_INET4_GETPEERNAME: "cgroup/getpeername4",
    B.BPF_CGROUP_INET6_GETPEERNAME: "cgroup/getpeername6",
    B.BPF_CGROUP_INET4_GETSOCKNAME: "cgroup/getsockname4",
    B.BPF_CGROUP_INET6_GETSOCKNAME: "cgroup/getsockname6",
    B.BPF_CGROUP_GETSOCKOPT: "cgroup/getsockopt", B.BPF_CGROUP_SOCK_OPS: "sockops",
    B.BPF_CGROUP_INET_SOCK_RELEASE: "cgroup/sock_release",
    B.BPF_CGROUP_UDP4_SENDMSG: "cgroup/sendmsg4", B.BPF_CGROUP_UDP6_SENDMSG: "cgroup/sendmsg6",
    B.BPF_CGROUP_UDP4_RECVMSG: "cgroup/recvmsg4", B.BPF_CGROUP_UDP6_RECVMSG: "cgroup/recvmsg6",
}


def ensure_loaded(pin_prefix, cgroup_root, features=None, splice=True):
    """Load+pin (unless already pinned: adopt) and attach (unless attached). Idempotent.
    Pinned programs of another version are adopted as they are: replacing them is
    meshbpf.ebpf.upgrade's, asked for explicitly.

    Returns {"adopted": bool, "programs": {name: id}, "attached_now": [...],
    "degraded": [programs the kernel refused that only cost a capability]}.
    """
    _safe_prefix(pin_prefix)
    adopted = is_loaded(pin_prefix)
    degraded = []
    if not adopted:
        if any(pinned(pin_prefix).values()):
            unload(pin_prefix, cgroup_root)      # a half-made earlier attempt
        _, degraded = load_and_pin(pin_prefix, features, splice)
    try:
        made = attach_all(pin_prefix, cgroup_root, features)
    except MeshbpfError:
        if not adopted:
            unload(pin_prefix, cgroup_root)
        raise
    ids = {}
    for name in pinned(pin_prefix)["progs"]:
        fd = prog_fd(pin_prefix, name)
        try:
            ids[name] = bpfsys.prog_get_info(fd)["id"]
        finally:
            os.close(fd)
    return {"adopted": adopted, "programs": ids, "attached_now": made, "degraded": degraded}


# ---- unload -------------------------------------------------------------------------------

def unload(pin_prefix, cgroup_root=None):
    """Detach every meshbpf program (links, ALLOW_MULTI attachments, sk_msg) and remove
    every pin under `pin_prefix`. Safe to call when nothing is there."""
    _safe_prefix(pin_prefix)
    dirs = pin_dirs(pin_prefix)
    specs = {p.name: p for p in PROGRAMS}
    errors = []
    # 1. links: detach explicitly, then unpin
    if os.path.isdir(dirs["links"]):
        for name in os.listdir(dirs["links"]):
            path = os.path.join(dirs["links"], name)
            try:
                bpfsys.unpin_link(path)
            except OSError as e:
                errors.append(f"{path}: {e}")
    # 2. prog_attach'ed programs on the cgroup and on the sockhash
    cgfd = None
    if cgroup_root and os.path.isdir(cgroup_root):
        cgfd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if os.path.isdir(dirs["progs"]):
            for name in os.listdir(dirs["progs"]):
                spec = specs.get(name)
                path = os.path.join(dirs["progs"], name)
                if spec and spec.target != "none":
                    try:
                        pfd = bpfsys.obj_get(path)
                    except OSError:
                        pfd = None
                    if pfd is not None:
                        try:
                            pid = bpfsys.prog_get_info(pfd)["id"]
                            if spec.target == "cgroup" and cgfd is not None and \
                                    _attached_ids(cgfd, spec.attach_type, pid):
                                bpfsys.prog_detach(cgfd, pfd, spec.attach_type)
                            elif spec.target == "sockhash" and \
                                    os.path.exists(os.path.join(dirs["maps"], SOCKHASH_MAP)):
                                mfd = bpfsys.obj_get(os.path.join(dirs["maps"], SOCKHASH_MAP))
                                try:
                                    bpfsys.prog_detach(mfd, pfd, spec.attach_type)
                                except OSError:
                                    pass
                                finally:
                                    os.close(mfd)
                        except OSError as e:
                            errors.append(f"{name}: {e}")
                        finally:
                            os.close(pfd)
                _unlink(path)
    finally:
        if cgfd is not None:
            os.close(cgfd)
    _remove_pins(pin_prefix)
    if errors:
        raise ApplyError("some meshbpf programs could not be detached: " + "; ".join(errors))


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_pins(pin_prefix):
    real = _safe_prefix(pin_prefix)
    if not os.path.isdir(real):
        return
    for root, dirs, files in os.walk(real, topdown=False):
        for f in files:
            _unlink(os.path.join(root, f))
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    try:
        os.rmdir(real)
    except OSError:
        pass
