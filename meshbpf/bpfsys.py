"""A tiny ctypes wrapper over the bpf(2) system call, with no bcc and no libbpf.

Its one job: let Python load small programs, create maps, attach/detach/query programs on
cgroups (and sockmaps), pin and open pinned objects, and read/write map elements, by
calling the kernel directly. `meshbpf probe` uses it so probing works on a machine without
bcc or kernel headers; other parts (the eBPF loader, the benchmark) may use it for
attach/pin/map work that bcc does not cover.

Conventions:
- Every function that creates a kernel object returns a plain file descriptor (int); the
  caller owns it and must `os.close()` it (see `closing()`).
- Failures raise `BpfError` (an OSError subclass) with the errno of the syscall; for
  `prog_load` it also carries the verifier log in `.log` (and in the message).
- Constants use the kernel's own names (BPF_PROG_TYPE_*, BPF_MAP_TYPE_*, BPF_CGROUP_*...)
  from include/uapi/linux/bpf.h, so they can be grepped against the kernel.
- Instruction helpers (`mov64_imm`, `mov64_reg`, `call`, `exit`, `ld_map_fd`) return the
  8-byte (16 for ld_map_fd) little-endian encoding of `struct bpf_insn`; concatenate them
  (or pass a list) to `prog_load`.
"""

import collections
import contextlib
import ctypes
import errno as _errno
import os
import platform
import struct

from . import memlock
from .errors import UnsupportedError

# --- bpf(2) commands -------------------------------------------------------------------
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

# --- program types (enum bpf_prog_type) ------------------------------------------------
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SCHED_ACT = 4
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_SKB = 14
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
BPF_PROG_TYPE_SK_LOOKUP = 30

# --- attach types (enum bpf_attach_type) -----------------------------------------------
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_GETSOCKOPT = 21
BPF_CGROUP_SETSOCKOPT = 22
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_CGROUP_INET4_GETSOCKNAME = 31
BPF_CGROUP_INET6_GETSOCKNAME = 32
BPF_CGROUP_INET_SOCK_RELEASE = 34
BPF_SK_LOOKUP = 36
BPF_XDP = 37

# --- map types (enum bpf_map_type) -----------------------------------------------------
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_RINGBUF = 27

# --- flags -----------------------------------------------------------------------------
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2
BPF_F_NO_PREALLOC = 1 << 0          # map_create flags (required for LPM_TRIE)
BPF_ANY = 0                         # map_update flags
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_PSEUDO_MAP_FD = 1

# --- helper ids (enum bpf_func_id) -----------------------------------------------------
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_ktime_get_ns = 5
BPF_FUNC_get_socket_cookie = 46
BPF_FUNC_msg_redirect_hash = 71
BPF_FUNC_get_netns_cookie = 122
BPF_FUNC_skc_to_tcp_sock = 137

# --- return codes used by probe programs -----------------------------------------------
SK_PASS = 1
XDP_PASS = 2
TC_ACT_OK = 0

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "arm64": 280}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed. `.errno` is the kernel's errno; `.log` the verifier log, if any."""

    def __init__(self, err, what, log=""):
        msg = f"{what}: {os.strerror(err)}"
        if log:
            msg += "\nverifier log:\n" + log.rstrip()
        super().__init__(err, msg)
        self.log = log

    def __str__(self):
        return self.strerror


def syscall_nr():
    """The bpf(2) syscall number on this machine's architecture."""
    machine = platform.machine()
    try:
        return _SYSCALL_NR[machine]
    except KeyError:
        raise UnsupportedError(f"meshbpf does not know the bpf(2) syscall number on {machine}")


# bpf(2) calls this process made, by command number: what the O(1) enrollment tests and
# `bench rules` count (bcc's own calls, made when loading, are not seen here).
SYSCALLS = collections.Counter()


def bpf(cmd, attr, what="bpf()"):
    """Issue bpf(cmd, &attr, sizeof(attr)); returns the syscall's result or raises BpfError."""
    SYSCALLS[cmd] += 1
    ret = _libc.syscall(ctypes.c_long(syscall_nr()), ctypes.c_int(cmd), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return ret


# --- union bpf_attr, one struct per command (prefixes of the union are enough) ---------
class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),  # value or next_key
                ("flags", ctypes.c_uint64)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills only what fits)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


def _name(name):
    b = (name or "").encode()
    if len(b) > 15:
        raise ValueError(f"BPF object name {name!r} is longer than 15 bytes")
    return b


# --- instruction assembler -------------------------------------------------------------
BPF_ALU64_MOV_K = 0xb7   # BPF_ALU64 | BPF_MOV | BPF_K
BPF_ALU64_MOV_X = 0xbf   # BPF_ALU64 | BPF_MOV | BPF_X
BPF_JMP_CALL = 0x85      # BPF_JMP | BPF_CALL
BPF_JMP_EXIT = 0x95      # BPF_JMP | BPF_EXIT
BPF_LD_IMM64 = 0x18      # BPF_LD | BPF_DW | BPF_IMM


def insn(code, dst=0, src=0, off=0, imm=0):
    """Encode one `struct bpf_insn` (code, dst_reg:4, src_reg:4, off s16, imm s32)."""
    if not (0 <= dst <= 10 and 0 <= src <= 10):
        raise ValueError(f"register out of range: dst={dst} src={src}")
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_imm(reg, imm):
    """reg = imm (64-bit move of a sign-extended 32-bit immediate)."""
    return insn(BPF_ALU64_MOV_K, dst=reg, imm=imm)


def mov64_reg(dst, src):
    """dst = src (64-bit register move)."""
    return insn(BPF_ALU64_MOV_X, dst=dst, src=src)


def call(helper_id):
    """Call BPF helper `helper_id` (arguments in r1..r5, result in r0)."""
    return insn(BPF_JMP_CALL, imm=helper_id)


def exit():  # noqa: A001 - the instruction is called exit
    """Return r0."""
    return insn(BPF_JMP_EXIT)


def ldx(size, dst, src, off):
    """dst = *(size *)(src + off); size 4 or 8 bytes."""
    return insn({4: 0x61, 8: 0x79}[size], dst=dst, src=src, off=off)


def jeq_imm(reg, imm, skip):
    """if reg == imm: skip the next `skip` instructions."""
    return insn(0x15, dst=reg, off=skip, imm=imm)


def ld_map_fd(reg, map_fd):
    """reg = pointer to the map with file descriptor `map_fd` (two instruction slots)."""
    return (insn(BPF_LD_IMM64, dst=reg, src=BPF_PSEUDO_MAP_FD, imm=map_fd)
            + insn(0, imm=0))


def assemble(insns):
    """Concatenate encoded instructions (bytes or a list of bytes) into one program."""
    if isinstance(insns, (bytes, bytearray)):
        code = bytes(insns)
    else:
        code = b"".join(insns)
    if not code or len(code) % 8:
        raise ValueError("a BPF program is a non-empty sequence of 8-byte instructions")
    return code


def return_imm(value):
    """The smallest program: `r0 = value; exit`."""
    return [mov64_imm(0, value), exit()]


# --- programs --------------------------------------------------------------------------
def prog_load(prog_type, insns, expected_attach_type=0, license="GPL", name="",
              log_size=1 << 16):
    """Load a program; returns its fd. On failure raises BpfError with the verifier log.

    `insns`: bytes or a list of encoded instructions. `name` (≤ 15 chars) is left empty by
    default so that kernels older than 4.15 (which reject the field) still accept the call.
    """
    memlock.ensure()
    code = ctypes.create_string_buffer(assemble(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(code.raw) // 8,
                         insns=_addr(code), license=_addr(lic),
                         prog_name=_name(name), expected_attach_type=expected_attach_type)
    try:
        return bpf(BPF_PROG_LOAD, attr, f"loading a program of type {prog_type}")
    except BpfError as first:
        if first.errno not in (_errno.EACCES, _errno.EINVAL) or not log_size:
            raise
        # Load again with a log so the caller learns why the verifier said no.
        log = ctypes.create_string_buffer(log_size)
        attr.log_level, attr.log_size, attr.log_buf = 1, log_size, _addr(log)
        try:
            fd = bpf(BPF_PROG_LOAD, attr)
        except BpfError as second:
            text = log.value.decode(errors="replace")
            raise BpfError(second.errno, f"loading a program of type {prog_type}", text) from None
        return fd  # pragma: no cover - loads with a log only if the first failure was transient


def prog_attach(target_fd, prog_fd, attach_type, flags=0, replace_fd=0):
    """Attach `prog_fd` to a cgroup fd (or sockmap/sockhash fd for sk_msg/sk_skb)."""
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                       attach_flags=flags, replace_bpf_fd=replace_fd)
    bpf(BPF_PROG_ATTACH, attr, f"attaching program (attach type {attach_type})")


def prog_detach(target_fd, prog_fd, attach_type):
    """Detach exactly `prog_fd` from `target_fd` for `attach_type` (required with ALLOW_MULTI)."""
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    bpf(BPF_PROG_DETACH, attr, f"detaching program (attach type {attach_type})")


def prog_query(target_fd, attach_type, max_progs=64):
    """Programs attached to `target_fd` for `attach_type`: (attach_flags, [prog ids])."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type,
                      prog_ids=_addr(ids), prog_cnt=max_progs)
    bpf(BPF_PROG_QUERY, attr, f"querying attached programs (attach type {attach_type})")
    return attr.attach_flags, list(ids[:attr.prog_cnt])


def link_create(prog_fd, target_fd, attach_type, flags=0):
    """Attach through a bpf_link (kernel ≥ 5.7 for cgroups); returns the link fd.

    The attachment lives as long as the link fd (or a pin of it) does.
    """
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type,
                           flags=flags)
    return bpf(BPF_LINK_CREATE, attr, f"creating a bpf_link (attach type {attach_type})")


def link_update(link_fd, new_prog_fd, old_prog_fd=None):
    """Swap the program of a bpf_link in one step (kernel >= 5.7 for cgroups, 5.9 for
    sk_lookup): the hook never runs without a program. With `old_prog_fd` the kernel
    swaps only if that program is the one linked now (BPF_F_REPLACE), else EPERM, so a
    concurrent upgrade cannot be overwritten unseen."""
    attr = _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd,
                           flags=0 if old_prog_fd is None else BPF_F_REPLACE,
                           old_prog_fd=0 if old_prog_fd is None else old_prog_fd)
    bpf(BPF_LINK_UPDATE, attr, "updating a bpf_link's program")


def link_detach(link_fd):
    """Detach a bpf_link's program now (kernel >= 5.9), even while pins or other fds still
    hold the link; the fd stays the caller's to close. A link already detached, or of a kind
    the kernel cannot detach (which then goes with its last reference), is not an error."""
    try:
        bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd), "detaching a bpf_link")
    except BpfError as e:
        if e.errno not in (_errno.EINVAL, _errno.ENOLINK, _errno.EOPNOTSUPP, _errno.ENOENT):
            raise


def unpin_link(path):
    """Detach the bpf_link pinned at `path`, then remove the pin (also when detaching fails;
    the error is raised after). Detached, not only unpinned: a process still holding the
    link's fd would otherwise keep the program attached. No pin there: nothing to do."""
    try:
        lfd = obj_get(path)
        try:
            link_detach(lfd)
        finally:
            os.close(lfd)
    except BpfError as e:
        if e.errno != _errno.ENOENT:
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def prog_get_fd_by_id(prog_id):
    """Open a loaded program by its id; returns an fd."""
    return bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id), f"opening program id {prog_id}")


def map_get_fd_by_id(map_id):
    """Open a map by its id; returns an fd."""
    return bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(id=map_id), f"opening map id {map_id}")


def _get_info(fd, info, what):
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info


def prog_get_info(fd):
    """Minimal info about a program fd: {"id", "type", "name", "tag"}."""
    info = _get_info(fd, _ProgInfo(), "reading program info")
    return {"id": info.id, "type": info.type, "name": info.name.decode(errors="replace"),
            "tag": bytes(info.tag).hex()}


def prog_map_ids(fd, max_maps=64):
    """Ids of the maps a loaded program uses (what the verifier saw it reference)."""
    ids = (ctypes.c_uint32 * max_maps)()
    info = _ProgInfo(nr_map_ids=max_maps, map_ids=ctypes.addressof(ids))
    _get_info(fd, info, "reading program info")
    return list(ids[:min(info.nr_map_ids, max_maps)])


class _LinkInfo(ctypes.Structure):
    """The head of struct bpf_link_info."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32)]


def link_get_info(fd):
    """Minimal info about a bpf_link fd: {"type", "id", "prog_id"} (the program it runs)."""
    info = _get_info(fd, _LinkInfo(), "reading bpf_link info")
    return {"type": info.type, "id": info.id, "prog_id": info.prog_id}


def map_get_info(fd):
    """Minimal info about a map fd: {"id", "type", "name", "key_size", "value_size", "max_entries", "flags"}."""
    info = _get_info(fd, _MapInfo(), "reading map info")
    return {"id": info.id, "type": info.type, "name": info.name.decode(errors="replace"),
            "key_size": info.key_size, "value_size": info.value_size,
            "max_entries": info.max_entries, "flags": info.map_flags}


# --- maps ------------------------------------------------------------------------------
def map_create(map_type, key_size, value_size, max_entries, flags=0, name=""):
    """Create a map; returns its fd."""
    memlock.ensure()
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_flags=flags, map_name=_name(name))
    return bpf(BPF_MAP_CREATE, attr, f"creating a map of type {map_type}")


def _buf(data):
    return ctypes.create_string_buffer(bytes(data), len(data))


def map_update_elem(fd, key, value, flags=BPF_ANY):
    """map[key] = value (both bytes, exactly key_size/value_size long)."""
    k, v = _buf(key), _buf(value)
    bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k), value=_addr(v), flags=flags),
        "updating a map element")


def map_lookup_elem(fd, key, value_size):
    """map[key] as bytes, or None if the key is absent."""
    k, v = _buf(key), ctypes.create_string_buffer(value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k), value=_addr(v)),
            "looking up a map element")
    except BpfError as e:
        if e.errno == _errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete_elem(fd, key):
    """Delete map[key]; returns False if it was absent."""
    k = _buf(key)
    try:
        bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k)), "deleting a map element")
    except BpfError as e:
        if e.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd, key_size):
    """Iterate over a map's keys (bytes). Entries changing meanwhile may be skipped or repeated."""
    nxt = ctypes.create_string_buffer(key_size)
    attr = _MapElemAttr(map_fd=fd, key=0, value=_addr(nxt))   # key=NULL: first key
    while True:
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr, "iterating a map")
        except BpfError as e:
            if e.errno == _errno.ENOENT:
                return
            raise
        key = nxt.raw
        yield key
        cur = _buf(key)
        attr = _MapElemAttr(map_fd=fd, key=_addr(cur), value=_addr(nxt))


# --- pins ------------------------------------------------------------------------------
def obj_pin(fd, path):
    """Pin a program/map/link fd at `path` on bpffs."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=_addr(p), bpf_fd=fd), f"pinning at {path}")


def obj_get(path):
    """Open a pinned object; returns a new fd."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=_addr(p)), f"opening pin {path}")


@contextlib.contextmanager
def closing(fd):
    """`with closing(map_create(...)) as fd:` closes the fd on exit."""
    try:
        yield fd
    finally:
        os.close(fd)
