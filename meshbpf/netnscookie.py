"""A network namespace's cookie (what bpf_get_netns_cookie() returns) on kernels without
SO_NETNS_COOKIE (before 5.14), e.g. 5.10 LTS.

Why: meshbpf keys pods by the netns cookie, which the cgroup/connect hooks read with
bpf_get_netns_cookie (5.7). Before 5.14 user space has no getsockopt for it, so it asks that
helper itself: a tiny cgroup/connect4 program attached to a throwaway cgroup
(<cgroup2>/meshbpf-probe-<pid>-<tid>-cookie, like the probe's) stores the cookie of the
connecting socket's netns in an array map, and a short-lived child joins that cgroup,
enters the namespace and connect()s a UDP socket to 127.0.0.1:9 (no packet is sent). The
program and map are the caller's only; nothing of the node's own is touched.
"""

import ctypes
import os
import socket
import threading

from . import bpfsys as B
from .errors import UnsupportedError

CLONE_NEWNET = 0x40000000
BPF_STX_DW = 0x7b         # *(u64 *)(dst + off) = src
BPF_ST_W = 0x62           # *(u32 *)(dst + off) = imm
BPF_ADD64_K = 0x07        # dst += imm
BPF_FUNC_map_update_elem = 2


def program(map_fd):
    """cgroup/connect4: map[0] = bpf_get_netns_cookie(ctx); allow the connect (pure)."""
    return [
        B.call(B.BPF_FUNC_get_netns_cookie),                  # r1 = ctx on entry
        B.insn(BPF_STX_DW, dst=10, src=0, off=-8),            # value = cookie
        B.insn(BPF_ST_W, dst=10, off=-12, imm=0),             # key = 0
        B.ld_map_fd(1, map_fd),                               # two slots, one bytes
        B.mov64_reg(2, 10), B.insn(BPF_ADD64_K, dst=2, imm=-12),
        B.mov64_reg(3, 10), B.insn(BPF_ADD64_K, dst=3, imm=-8),
        B.mov64_imm(4, 0),
        B.call(BPF_FUNC_map_update_elem),
        B.mov64_imm(0, 1),
        B.exit(),
    ]


# The probe's prefix (meshbpf/probe/prober.py): its stale-cgroup sweep removes ours too.
CGROUP_PREFIX = "meshbpf-probe-"


def _cgroup_dir(mount):
    return os.path.join(mount,
                        f"{CGROUP_PREFIX}{os.getpid()}-{threading.get_native_id()}-cookie")


def _child(cgroup_dir, netns_path):
    """In a forked child: join the cgroup, enter the netns, connect a UDP socket."""
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns_path, os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(2)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", 9))
        os._exit(0)
    except BaseException:  # noqa: BLE001 - a forked child must never return
        os._exit(1)


def netns_cookie(netns_path, cgroup_mount):
    """The cookie of the netns at `netns_path`, read through bpf_get_netns_cookie in a
    throwaway cgroup/connect4 program under `cgroup_mount` (cgroup v2). UnsupportedError
    if the kernel cannot do it."""
    path = _cgroup_dir(cgroup_mount)
    if os.path.isdir(path):
        os.rmdir(path)
    os.mkdir(path)
    fds = []
    try:
        cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fds.append(cg)
        mfd = B.map_create(B.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
        fds.append(mfd)
        try:
            pfd = B.prog_load(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, program(mfd),
                              expected_attach_type=B.BPF_CGROUP_INET4_CONNECT)
        except B.BpfError as e:
            raise UnsupportedError("kernel cannot report netns cookies: neither "
                                   "SO_NETNS_COOKIE (5.14) nor bpf_get_netns_cookie in "
                                   f"cgroup/connect4 (5.7): {str(e).splitlines()[0]}")
        fds.append(pfd)
        B.prog_attach(cg, pfd, B.BPF_CGROUP_INET4_CONNECT, B.BPF_F_ALLOW_MULTI)
        try:
            pid = os.fork()
            if pid == 0:
                _child(path, netns_path)
            _, status = os.waitpid(pid, 0)
        finally:
            B.prog_detach(cg, pfd, B.BPF_CGROUP_INET4_CONNECT)
        if os.waitstatus_to_exitcode(status) != 0:
            raise UnsupportedError(f"could not read the cookie of netns {netns_path} "
                                   f"(helper exited {os.waitstatus_to_exitcode(status)})")
        raw = B.map_lookup_elem(mfd, (0).to_bytes(4, "little"), 8)
        cookie = int.from_bytes(raw, "little") if raw else 0
        if not cookie:
            raise UnsupportedError(f"could not read the cookie of netns {netns_path}")
        return cookie
    finally:
        for fd in fds:
            os.close(fd)
        try:
            os.rmdir(path)
        except OSError:
            pass
