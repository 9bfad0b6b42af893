"""The sidecar's capture listeners in a pod, put into `capture_listeners`. Side effects
(apart from the pure `reachable_listeners`).

mb_sk_lookup hands a TIME_WAIT-reusing SYN to the pod's capture listener, which it finds in
the `capture_listeners` SOCKHASH. sockops LISTEN_CB adds listeners created after attach;
the ones that already exist are found here (sock_diag in the pod's netns, which walks only
the listening sockets, and the pod's processes holding them) and duplicated with
pidfd_getfd (Linux 5.6) into the map.
"""

import ctypes
import errno
import ipaddress
import os
import socket

from ... import bpfsys, system
from .. import structs

TCP_LISTEN = 0x0A
SYS_PIDFD_GETFD = 438


def reachable_listeners(sockets, port):
    """Pure: of `sockets` [(family, address, port, inode)] the ones listening on `port`
    that the pod's interfaces reach (loopback-bound ones are not): [(family, ip, inode)]."""
    out = []
    for family, addr, sport, inode in sockets:
        ip = ipaddress.ip_address(addr)
        if sport != port or not inode or (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
            continue
        out.append((family, ip, inode))
    return out


def _listening_sockets():
    """[(family, address, port, inode)] of the TCP listeners of the current netns."""
    from pyroute2 import DiagSocket
    out = []
    with DiagSocket() as ds:
        ds.bind()
        for family, af in ((structs.MB_AF_INET, socket.AF_INET),
                           (structs.MB_AF_INET6, socket.AF_INET6)):
            for m in ds.get_sock_stats(family=af, states=1 << TCP_LISTEN):
                out.append((family, m["idiag_src"], m["idiag_sport"], m["idiag_inode"]))
    return out


def find_listeners(pod, port):
    """The sockets listening on `port` in the pod's netns (wildcard or non-loopback address):
    [{"family", "address", "inode", "pid", "fd"}], one per family, with an owning process."""
    with system.in_netns(pod.netns):
        found = reachable_listeners(_listening_sockets(), port)
    if not found:
        return []
    # who holds them: the pod's processes with an fd on the socket inode
    want = {f"socket:[{ino}]": ino for _, _, ino in found}
    owners = {}
    for pid in pod.pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                ino = want.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if ino is not None and ino not in owners:
                    owners[ino] = (int(pid), int(fd))
        except OSError:
            continue
    out, seen = [], set()
    # wildcard-bound first: it serves every pod IP
    def wildcard(ip):
        return (getattr(ip, "ipv4_mapped", None) or ip).is_unspecified
    for family, ip, ino in sorted(found, key=lambda x: not wildcard(x[1])):
        if family in seen or ino not in owners:
            continue
        seen.add(family)
        out.append({"family": family, "address": str(ip), "inode": ino,
                    "pid": owners[ino][0], "fd": owners[ino][1]})
    return out


def _dup_fd(pid, fd):
    """A copy of process `pid`'s fd `fd` (pidfd_open + pidfd_getfd, Linux 5.6)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        r = libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd),
                         ctypes.c_uint(0))
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return r
    finally:
        os.close(pidfd)


def adopt_listeners(pod, netns_cookie, port, listeners_fd):
    """Put the capture listeners that already exist in the pod into capture_listeners (later
    ones are added by sockops LISTEN_CB). Returns ([{family, address, inode, pid}], [keys
    added now], error or None). Best effort: without an entry the TIME_WAIT path drops the
    SYN and the client's retransmission goes through tc."""
    added, adopted = [], []
    try:
        listeners = find_listeners(pod, port)
    except OSError as e:
        return [], [], f"listing listeners: {e}"
    for l in listeners:
        key = structs.capture_listener_key(netns_cookie, port, l["family"])
        try:
            fd = _dup_fd(l["pid"], l["fd"])
        except OSError as e:
            return adopted, added, str(e)
        try:
            if os.fstat(fd).st_ino != l["inode"]:
                continue                     # the process reused the fd meanwhile
            # NOEXIST first: a sockhash cannot be read from user space (lookup gives ENOSPC
            # for a 4-byte value), so whether the key was there shows only this way
            try:
                bpfsys.map_update_elem(listeners_fd, key, structs.u32_bytes(fd),
                                       bpfsys.BPF_NOEXIST)
                existed = False
            except bpfsys.BpfError as e:
                if e.errno != errno.EEXIST:
                    raise
                existed = True
                bpfsys.map_update_elem(listeners_fd, key, structs.u32_bytes(fd))
        except OSError as e:
            return adopted, added, f"adding listener {l['address']}:{port}: {e}"
        finally:
            os.close(fd)
        if not existed:
            added.append(key)
        adopted.append({k: l[k] for k in ("family", "address", "inode", "pid")})
    return adopted, added, None
