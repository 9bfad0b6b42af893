"""The sidecar's capture listeners in a pod, put into `capture_listeners`. Side effects
(apart from the pure `parse_proc_net_tcp`).

mb_sk_lookup hands a TIME_WAIT-reusing SYN to the pod's capture listener, which it finds in
the `capture_listeners` SOCKHASH. sockops LISTEN_CB adds listeners created after attach;
the ones that already exist are found here (in /proc/net/tcp{,6} of the pod's netns, and
the process holding them) and duplicated with pidfd_getfd (Linux 5.6) into the map.
"""

import ctypes
import errno
import ipaddress
import os

from ... import bpfsys, system
from .. import structs

TCP_LISTEN = 0x0A                       # st in /proc/net/tcp
SYS_PIDFD_GETFD = 438


def _proc_addr(hexaddr):
    """An address from /proc/net/tcp{,6}: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hexaddr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def parse_proc_net_tcp(text, port):
    """Sockets LISTENing on `port` in a /proc/net/tcp or tcp6 text: [(address, inode)],
    loopback-bound ones left out (unreachable from the pod's interfaces)."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or ":" not in f[1]:
            continue
        addr, _, p = f[1].rpartition(":")
        try:
            if int(f[3], 16) != TCP_LISTEN or int(p, 16) != port:
                continue
            ip, inode = _proc_addr(addr), int(f[9])
        except ValueError:
            continue                         # not a socket line
        if (getattr(ip, "ipv4_mapped", None) or ip).is_loopback or not inode:
            continue
        out.append((ip, inode))
    return out


def find_listeners(pod, port):
    """The sockets listening on `port` in the pod's netns (wildcard or non-loopback address):
    [{"family", "address", "inode", "pid", "fd"}], one per family, with an owning process."""
    found = []
    with system.in_netns(pod.netns):
        for family, name in ((structs.MB_AF_INET, "tcp"), (structs.MB_AF_INET6, "tcp6")):
            try:
                with open(f"/proc/thread-self/net/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            found += [(family, ip, ino) for ip, ino in parse_proc_net_tcp(text, port)]
    if not found:
        return []
    # who holds them: processes in the pod's netns with an fd on the socket inode
    netns_ino = os.stat(pod.netns).st_ino
    want = {f"socket:[{ino}]": ino for _, _, ino in found}
    owners = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != netns_ino:
                continue
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
