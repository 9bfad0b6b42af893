"""Inbound steering for meshed pods: the tc hook on the pod's interfaces and its policy maps.

One job: make TCP that arrives on a meshed pod's interface for a captured port reach the
sidecar's inbound listener (15006) with its original destination intact, and undo that
exactly. The data path is `bpf/tc_inbound.c` (program `tc_inbound_ingress`, tc clsact
ingress, direct-action), which hands the SYN to the listener with bpf_sk_assign() instead
of rewriting the port; see docs/inbound.md for why tc and not XDP.

Pure part (no root, no kernel): `inbound_policy(config)` turns an InterceptConfig into
Istio's inbound semantics (include '*' with excludes, or a list of ports; the ports in
`config.inbound_excluded_always()` are never captured), `policy_entries(policy, ips)`
packs it into the `inbound_pods` / `inbound_ports` map entries declared in bpf/lib/maps.h,
`steers(policy, port)` says what the program will decide, `select_hook()` picks the hook.

Side-effect part: `attach_pod(pod, config, maps, progs)` writes the entries and installs
the filters inside the pod's netns (pyroute2 under `system.in_netns`), rolling back on
failure; `detach_pod(pod, maps, record)` removes exactly what attach added (the clsact
qdisc only if meshbpf created it); `list_hooks(pod)` reports the filters for status.
`maps` maps a map name to a map fd (or a bcc table); `progs` a program name to a program
fd (or a bcc function). Nothing here loads or pins programs: meshbpf/ebpf/loader.py does.
`probe()` tries the steering for real in a throwaway netns (for `meshbpf probe`).

The TIME_WAIT path: a SYN that meets a TIME_WAIT of the same 4-tuple cannot be assigned by
tc (the listener's request socket would duplicate the TIME_WAIT and be dropped until it
expires); the kernel's TIME_WAIT handling asks sk_lookup instead. When the node has the
`mb_sk_lookup` program pinned (maps given as a `Maps` of the pin prefix, or progs naming
it), attach_pod also links it to the pod's netns (pin `<prefix>/links/sk_lookup-<netns
inode>`), writes `inbound_netns` (pod IP -> netns cookie), puts the sidecar's existing
capture listener in `capture_listeners` (found in /proc, duplicated with pidfd_getfd; later
listeners are added by sockops LISTEN_CB) and sets INBOUND_POD_SK_LOOKUP, so tc marks such
SYNs in `inbound_tw` and leaves them to the kernel. detach_pod undoes all of it.
"""

import dataclasses
import errno
import ipaddress
import struct

from ..config import WILDCARD
from ..errors import (AddressInUseError, ApplyError, MeshbpfError, NotFoundError,
                      UnsupportedError, UsageError)

PROG_INGRESS = "tc_inbound_ingress"
PROG_SK_LOOKUP = "mb_sk_lookup"
MAP_PODS = "inbound_pods"
MAP_PORTS = "inbound_ports"
MAP_NETNS = "inbound_netns"
MAP_TW = "inbound_tw"
MAP_LISTENERS = "capture_listeners"
MAP_IFACES = "inbound_ifaces"

# bpf/lib/types.h, inbound policy
INBOUND_POD_WILDCARD = 1
INBOUND_POD_CAPTURES = 2
INBOUND_PORT_CAPTURE = 1
INBOUND_PORT_BYPASS = 2
INBOUND_POD_SK_LOOKUP = 4
POD_KEY = struct.Struct("!16s")         # struct inbound_pod_key { __u32 ip[4]; }
POD_VAL = struct.Struct("=2sHIQ")       # { __u16 capture_port (net); __u16 flags; __u32 pad;
                                        #   __u64 owner (netns cookie) }
PORT_KEY = struct.Struct("=16s2sH")     # { __u32 ip[4]; __u16 port (net); __u16 pad; }
PORT_VAL = struct.Struct("=I")          # __u32 action
NETNS_VAL = struct.Struct("=Q")         # inbound_netns[inbound_pod_key] = __u64 netns cookie
TW_KEY = struct.Struct("=16s16s2s2s")   # struct inbound_tw_key { local_ip, remote_ip,
                                        #   local_port (net), remote_port (net) }
LISTENER_KEY = struct.Struct("=Q2sHI")  # struct capture_listener_key { __u64 netns;
                                        #   __u16 port (net); __u16 family; __u32 pad; }
LISTENER_VAL = struct.Struct("=I")      # the socket's fd (on update; the map's value is an int)
IFACE_KEY = struct.Struct("=I")         # inbound_ifaces key: the minor of the filter's classid
IFACE_VAL = struct.Struct("=16sQ")      # struct inbound_iface_val { ip[4]; __u64 netns; }
INBOUND_IFACE_MAJOR = 0x4d420000        # classid major of meshbpf's filters ("MB")
IFACE_MAX_ID = 0xfff0                   # minors 0xfff2/0xfff3 name clsact's own classes
AF_INET = 2
AF_INET6 = 10
LINK_PREFIX = "sk_lookup-"              # <pin prefix>/links/sk_lookup-<netns inode>
TCP_LISTEN = 0x0A                       # st in /proc/net/tcp
SYS_PIDFD_GETFD = 438
BPF_LINK_DETACH = 34

# How meshbpf's filters are recognised in a pod: this priority and name, handle 1.
TC_PRIO = 0x6d62                        # "mb"
TC_HANDLE = 1
TC_NAME = "meshbpf_inbound"
TC_INGRESS_PARENT = 0xFFFFFFF2          # clsact ingress (ffff:fff2)
TC_EGRESS_PARENT = 0xFFFFFFF3
ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
HOOKS = ("auto", "tc", "xdp")


# ---- pure ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InboundPolicy:
    """Which inbound ports of a pod go to its sidecar, in Istio's terms.

    wildcard: every port not in `bypass` is captured (inbound_ports_include '*');
    otherwise exactly the ports in `capture` are.
    """

    capture_port: int
    wildcard: bool
    capture: tuple = ()
    bypass: tuple = ()

    def to_dict(self):
        return dataclasses.asdict(self)


def inbound_policy(config):
    """InterceptConfig -> InboundPolicy with Istio's inbound include/exclude semantics.

    include '*': everything except inbound_ports_exclude and the always-excluded ports;
    include list: only those ports (Istio ignores inbound_ports_exclude then), minus the
    always-excluded ones; include '': nothing.
    """
    include, exclude = config.inbound_ports()
    always = set(config.inbound_excluded_always())
    if include == WILDCARD:
        return InboundPolicy(config.inbound_capture_port, True, (),
                             tuple(sorted(set(exclude) | always)))
    return InboundPolicy(config.inbound_capture_port, False,
                         tuple(sorted(set(include) - always)), ())


def steers(policy, port):
    """True if tc_inbound steers a connection to `port` of a pod with `policy`."""
    if port in policy.bypass:
        return False
    if port in policy.capture:
        return True
    return policy.wildcard


def ip_key(ip):
    """16-byte map form of an address: IPv4 as v4-mapped ::ffff:a.b.c.d, network order."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def pod_key(ip):
    return POD_KEY.pack(ip_key(ip))


def pod_value(policy, sk_lookup=False, owner=0):
    """inbound_pods value; `sk_lookup`: mb_sk_lookup is linked in the pod's netns (tc then
    leaves SYNs that meet a TIME_WAIT to the kernel's TIME_WAIT path); `owner`: the netns
    cookie of the pod the entry belongs to (only its owner removes it)."""
    flags = (INBOUND_POD_WILDCARD if policy.wildcard else 0) | \
        (INBOUND_POD_CAPTURES if policy.wildcard or policy.capture else 0) | \
        (INBOUND_POD_SK_LOOKUP if sk_lookup else 0)
    return POD_VAL.pack(struct.pack("!H", policy.capture_port), flags, 0, owner)


def pod_owner(raw):
    """The owner (netns cookie) of an inbound_pods value; 0 if unknown."""
    return POD_VAL.unpack(raw)[3]


def netns_entries(pod_keys, netns_cookie):
    """inbound_netns entries: every pod IP (inbound_pods keys) -> the pod's netns cookie."""
    return {k: NETNS_VAL.pack(netns_cookie) for k in pod_keys}


def listener_key(netns_cookie, port, family):
    return LISTENER_KEY.pack(netns_cookie, struct.pack("!H", port), family, 0)


def decode_listener_key(raw):
    netns, port, family, _ = LISTENER_KEY.unpack(raw)
    return netns, struct.unpack("!H", port)[0], family


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


def port_key(ip, port):
    return PORT_KEY.pack(ip_key(ip), struct.pack("!H", port), 0)


def port_value(action):
    return PORT_VAL.pack(action)


def decode_pod_value(raw):
    port, flags, _, _ = POD_VAL.unpack(raw)
    return {"capture_port": struct.unpack("!H", port)[0],
            "wildcard": bool(flags & INBOUND_POD_WILDCARD),
            "captures": bool(flags & INBOUND_POD_CAPTURES)}


def decode_port_key(raw):
    ip16, port, _ = PORT_KEY.unpack(raw)
    return _ip_from_key(ip16), struct.unpack("!H", port)[0]


def _ip_from_key(ip16):
    ip = ipaddress.IPv6Address(ip16)
    return ip.ipv4_mapped or ip


def policy_entries(policy, addresses, sk_lookup=False, owner=0):
    """The map entries for a pod with `policy` and IPs `addresses`.

    Returns {map name: {key bytes: value bytes}}: one inbound_pods entry per pod IP and
    one inbound_ports entry per (IP, listed port). Link-local and loopback addresses are
    not pod IPs and are skipped. `sk_lookup`, `owner`: see pod_value.
    """
    pods, ports = {}, {}
    for ip in sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a)):
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        pods[pod_key(ip)] = pod_value(policy, sk_lookup, owner)
        for port in policy.capture:
            ports[port_key(ip, port)] = port_value(INBOUND_PORT_CAPTURE)
        for port in policy.bypass:
            ports[port_key(ip, port)] = port_value(INBOUND_PORT_BYPASS)
    return {MAP_PODS: pods, MAP_PORTS: ports}


def iface_id(current, netns_cookie):
    """The id of a pod's tc filters (classid 4d42:<id>, the inbound_ifaces key): the one its
    netns already has (`current`: {id: netns cookie}), else the lowest free one."""
    for n, cookie in sorted(current.items()):
        if cookie == netns_cookie:
            return n
    for n in range(1, IFACE_MAX_ID + 1):
        if n not in current:
            return n
    raise ApplyError(f"inbound_ifaces is full ({IFACE_MAX_ID} pods)")


def iface_value(pod_keys, netns_cookie):
    """inbound_ifaces value: the pod's first enrolled IP (its policy) and its netns cookie."""
    return IFACE_VAL.pack(sorted(pod_keys)[0], netns_cookie)


def _ifaces(ops, fd):
    """{id: netns cookie} of inbound_ifaces."""
    out = {}
    for k in ops.map_keys(fd, IFACE_KEY.size):
        v = ops.map_lookup_elem(fd, k, IFACE_VAL.size)
        if v is not None:
            out[IFACE_KEY.unpack(k)[0]] = IFACE_VAL.unpack(v)[1]
    return out


def select_hook(hook, link_kind):
    """The hook that steers on an interface of kind `link_kind` ("veth", "macvlan", ...).

    Always "tc": steering hands the SYN to the listener socket with bpf_sk_assign(),
    which only exists at tc ingress; XDP has no socket to hand a packet to, and on veth
    it would also see CHECKSUM_PARTIAL/GSO packets whose checksum it cannot fix. "auto"
    and "tc" select tc; "xdp" is refused with the reason (see docs/inbound.md).
    """
    if hook not in HOOKS:
        raise UsageError(f"inbound hook {hook!r} is unknown: choose one of {', '.join(HOOKS)}")
    if hook == "xdp":
        raise UnsupportedError(
            f"inbound steering cannot run at XDP (interface kind {link_kind or 'unknown'}): it "
            "hands connections to the sidecar's listener with bpf_sk_assign, which exists only "
            "at tc ingress", hint="use hook 'tc' or 'auto'; docs/inbound.md explains")
    return "tc"


# ---- side effects -------------------------------------------------------------------------

def _fd(obj, attr):
    """An fd from an int, a bcc object (.map_fd / .fd) or a PinnedMap (.fd)."""
    if isinstance(obj, int):
        return obj
    for name in (attr, "fd"):
        fd = getattr(obj, name, None)
        if isinstance(fd, int):
            return fd
    raise UsageError(f"{obj!r} is not a file descriptor or an object with .{attr}")


def _map_fds(maps):
    try:
        return {name: _fd(maps[name], "map_fd") for name in (MAP_PODS, MAP_PORTS)}
    except KeyError as e:
        raise UsageError(f"the loaded eBPF object has no map {e.args[0]!r}; "
                         "was bpf/tc_inbound.c compiled in?")


def _prog_fd(progs):
    try:
        return _fd(progs[PROG_INGRESS], "fd")
    except KeyError:
        raise UsageError(f"the loaded eBPF object has no program {PROG_INGRESS!r}")


def _map_ops():
    from .. import bpfsys
    return bpfsys


def _links(ipr):
    out = []
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        out.append({"name": link.get_attr("IFLA_IFNAME"), "index": link["index"],
                    "type": link["ifi_type"], "kind": kind})
    return out


def _pick_interfaces(links, config, interfaces):
    """The pod's links to hook: named ones, else every Ethernet link except lo and
    config.exclude_interfaces."""
    by_name = {l["name"]: l for l in links}
    if interfaces:
        missing = [n for n in interfaces if n not in by_name]
        if missing:
            raise NotFoundError(f"the pod has no interface {', '.join(missing)}")
        chosen = [by_name[n] for n in interfaces]
        bad = [l["name"] for l in chosen if l["type"] != ARPHRD_ETHER]
        if bad:
            raise UnsupportedError(f"interface {', '.join(bad)} has no Ethernet framing; "
                                   "tc_inbound parses Ethernet frames only")
        return chosen
    excluded = set(_split(config.exclude_interfaces))
    chosen = [l for l in links
              if l["name"] != "lo" and l["type"] == ARPHRD_ETHER and l["name"] not in excluded]
    if not chosen:
        raise NotFoundError("the pod has no Ethernet interface to steer inbound traffic on")
    return chosen


def _split(value):
    return [p.strip() for p in str(value or "").split(",") if p.strip()]


def _addresses(ipr, indexes):
    out = []
    for a in ipr.get_addr():
        if a["index"] in indexes:
            out.append(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
    return out


def _qdiscs(ipr, index):
    return [q for q in ipr.get_qdiscs(index=index) if q["index"] == index]


def _has_clsact(ipr, index):
    return any(q.get_attr("TCA_KIND") == "clsact" for q in _qdiscs(ipr, index))


def _filters(ipr, index, parent):
    """Filters on `index`/`parent` (any classifier) as dicts: kind, prio, handle, name, ours.

    A tc filter shows up as a chain head (no options) plus its instances; only instances
    are listed."""
    out = []
    try:
        msgs = ipr.get_filters(index=index, parent=parent)
    except Exception as e:  # noqa: BLE001 - no clsact yet: no filters
        if getattr(e, "code", None) in (errno.EINVAL, errno.ENOENT):
            return out
        raise
    for f in msgs:
        opts = f.get_attr("TCA_OPTIONS")
        if not opts:
            continue
        kind = f.get_attr("TCA_KIND")
        prio = (f["info"] >> 16) & 0xFFFF
        name = (opts.get_attr("TCA_BPF_NAME") or "") if kind == "bpf" else ""
        out.append({"kind": kind, "prio": prio, "handle": f["handle"], "name": name,
                    "ours": kind == "bpf" and prio == TC_PRIO and name.startswith(TC_NAME)})
    return out


def _add_filter(ipr, index, parent, fd, classid=None):
    extra = {} if classid is None else {"classid": classid}
    ipr.tc("replace-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO,
           protocol=ETH_P_ALL, fd=fd, name=TC_NAME, direct_action=True, **extra)


def _del_filter(ipr, index, parent):
    try:
        ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO,
               protocol=ETH_P_ALL)
    except Exception as e:  # noqa: BLE001
        if getattr(e, "code", None) not in (errno.ENOENT, errno.EINVAL):
            raise


def _ipr(pod):
    """A netlink handle in the current thread's netns (call under system.in_netns)."""
    from pyroute2 import IPRoute
    return IPRoute()


# ---- the sk_lookup (TIME_WAIT) path: side effects ------------------------------------------

def _has_map(maps, name):
    if hasattr(maps, "exists"):                 # meshbpf.ebpf.maps.Maps
        return maps.exists(name)
    try:
        maps[name]
    except KeyError:
        return False
    return True


def _pin_prefix(maps):
    """The pin prefix of a meshbpf.ebpf.maps.Maps (`<prefix>/maps`), else None."""
    import os
    d = getattr(maps, "dir", None)
    return os.path.dirname(d) if isinstance(d, str) else None


def link_path(pin_prefix, netns_inode):
    """Where the pod's sk_lookup link is pinned."""
    import os
    return os.path.join(pin_prefix, "links", f"{LINK_PREFIX}{netns_inode}")


def _sk_lookup_prog(maps, progs):
    """(program fd, owned, None) of mb_sk_lookup (owned: opened here, the caller closes it),
    or (None, False, reason) when the TIME_WAIT path cannot be set up: the program is not
    loaded (a kernel without sk_lookup or ctx->ingress_ifindex) or the maps are not the
    node's pinned ones (no place to pin the link)."""
    import os
    from .. import bpfsys
    if _pin_prefix(maps) is None:
        return None, False, "maps are not meshbpf's pinned maps: no place to pin a link"
    if not all(_has_map(maps, m) for m in (MAP_NETNS, MAP_TW, MAP_LISTENERS)):
        return None, False, "the loaded eBPF object has no sk_lookup maps"
    if PROG_SK_LOOKUP in progs:
        return _fd(progs[PROG_SK_LOOKUP], "fd"), False, None
    pin = os.path.join(_pin_prefix(maps), "progs", PROG_SK_LOOKUP)
    if not os.path.exists(pin):
        return None, False, (f"program {PROG_SK_LOOKUP} is not loaded (this kernel lacks "
                             "sk_lookup programs, Linux 5.9)")
    return bpfsys.obj_get(pin), True, None


def _link_detach(path):
    """Detach and unpin the bpf_link pinned at `path` (gone already: nothing to do)."""
    import ctypes
    import os
    from .. import bpfsys

    class _Attr(ctypes.Structure):
        _fields_ = [("link_fd", ctypes.c_uint32)]
    try:
        lfd = bpfsys.obj_get(path)
    except OSError:
        lfd = None
    if lfd is not None:
        try:
            bpfsys.bpf(BPF_LINK_DETACH, _Attr(link_fd=lfd), "detaching the sk_lookup link")
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOLINK, errno.EOPNOTSUPP, errno.ENOENT):
                raise
        finally:
            os.close(lfd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _link_sk_lookup(pod, prog_fd, path):
    """Link mb_sk_lookup to the pod's netns and pin the link at `path`; True if made now,
    False if it was there (a re-attach)."""
    import os
    from .. import bpfsys
    if os.path.exists(path):
        return False
    nsfd = os.open(pod.netns, os.O_RDONLY)
    try:
        lfd = bpfsys.link_create(prog_fd, nsfd, bpfsys.BPF_SK_LOOKUP)
    finally:
        os.close(nsfd)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bpfsys.obj_pin(lfd, path)
    finally:
        os.close(lfd)
    return True


def find_listeners(pod, port):
    """The sockets listening on `port` in the pod's netns (wildcard or non-loopback address):
    [{"family", "address", "inode", "pid", "fd"}], one per family, with an owning process."""
    import os
    from .. import system
    found = []
    with system.in_netns(pod.netns):
        for family, name in ((AF_INET, "tcp"), (AF_INET6, "tcp6")):
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
    import ctypes
    import os
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
    import os
    from .. import bpfsys
    added, adopted = [], []
    try:
        listeners = find_listeners(pod, port)
    except OSError as e:
        return [], [], f"listing listeners: {e}"
    existing = set(bpfsys.map_keys(listeners_fd, LISTENER_KEY.size))
    for l in listeners:
        key = listener_key(netns_cookie, port, l["family"])
        try:
            fd = _dup_fd(l["pid"], l["fd"])
        except OSError as e:
            return adopted, added, str(e)
        try:
            if os.fstat(fd).st_ino != l["inode"]:
                continue                     # the process reused the fd meanwhile
            bpfsys.map_update_elem(listeners_fd, key, LISTENER_VAL.pack(fd))
        except OSError as e:
            return adopted, added, f"adding listener {l['address']}:{port}: {e}"
        finally:
            os.close(fd)
        if key not in existing:
            added.append(key)
        adopted.append({k: l[k] for k in ("family", "address", "inode", "pid")})
    return adopted, added, None


def _netns_keys(ops, fd, key_size, cookie):
    return [k for k in ops.map_keys(fd, key_size) if struct.unpack_from("=Q", k)[0] == cookie]


def owners(maps, addresses):
    """{address: owner netns cookie} of the addresses enrolled in inbound_pods."""
    fd = _map_fds(maps)[MAP_PODS]
    ops = _map_ops()
    out = {}
    for a in addresses:
        raw = ops.map_lookup_elem(fd, pod_key(a), POD_VAL.size)
        if raw is not None:
            out[str(ipaddress.ip_address(a))] = pod_owner(raw)
    return out


def attach_pod(pod, config, maps, progs, interfaces=None, hook="auto", owner_alive=None):
    """Steer `pod`'s inbound TCP per `config`; returns a JSON-able record for detach/status.

    Writes the pod IPs' entries into inbound_pods/inbound_ports (replacing the pod's old
    ones) and puts tc_inbound_ingress on the ingress of each chosen interface (creating a
    clsact qdisc where there is none). Where mb_sk_lookup is available (see the module
    docstring) it first sets up the TIME_WAIT path; the record's "sk_lookup" says whether
    it did ({"enabled": False, "reason": ...} otherwise). Idempotent. On failure
    everything this call changed is restored and ApplyError is raised.

    Entries carry the pod's netns cookie as owner. An address whose entry another pod owns
    is refused (UsageError, nothing changed) unless `owner_alive(cookie)` says that pod is
    gone (its entries are then taken over); without `owner_alive` every owner counts as alive.
    """
    import os
    from .. import system
    policy = inbound_policy(config)
    fds = _map_fds(maps)
    prog_fd = _prog_fd(progs)
    ops = _map_ops()
    with system.in_netns(pod.netns):
        with _ipr(pod) as ipr:
            links = _links(ipr)
            chosen = _pick_interfaces(links, config, interfaces)
            hooks = {l["name"]: select_hook(hook, l["kind"]) for l in chosen}
            addrs = _addresses(ipr, {l["index"] for l in chosen})
    me = pod.netns_cookie
    taken = [(a, o) for a, o in owners(maps, addrs).items()
             if o and o != me and (owner_alive is None or owner_alive(o))]
    if taken:
        raise AddressInUseError(f"pod {pod.name}: inbound address "
                         + ", ".join(f"{a} (netns cookie {o})" for a, o in taken)
                         + " belongs to another pod that is still running; refused, nothing changed")
    skl_fd, skl_owned, skl_why = _sk_lookup_prog(maps, progs)
    sk_lookup = skl_fd is not None
    entries = policy_entries(policy, addrs, sk_lookup=sk_lookup, owner=me)
    if not entries[MAP_PODS]:
        if skl_owned:
            os.close(skl_fd)
        raise NotFoundError(f"pod {pod.name} has no IP address on {', '.join(hooks)} to "
                            "steer inbound traffic for")

    undo = []          # callables restoring what was there before, newest last
    added = []         # interface records
    skl_rec = {"enabled": False, "reason": skl_why}
    try:
        # 0. the TIME_WAIT path: sk_lookup linked in the pod's netns, the pod IPs' netns
        # cookie and the existing capture listener, all before tc is told to rely on it
        # (INBOUND_POD_SK_LOOKUP in the inbound_pods entries written in 1).
        if sk_lookup:
            cookie = pod.netns_cookie
            path = link_path(_pin_prefix(maps), pod.key)
            if _link_sk_lookup(pod, skl_fd, path):
                undo.append(lambda p=path: _link_detach(p))
            nfd, lfd = _fd(maps[MAP_NETNS], "map_fd"), _fd(maps[MAP_LISTENERS], "map_fd")
            for key, value in netns_entries(entries[MAP_PODS], cookie).items():
                old = ops.map_lookup_elem(nfd, key, NETNS_VAL.size)
                ops.map_update_elem(nfd, key, value)
                undo.append(_restore(ops, nfd, key, old))
            adopted, new_keys, err = adopt_listeners(pod, cookie, policy.capture_port, lfd)
            for key in new_keys:
                undo.append(lambda k=key: ops.map_delete_elem(lfd, k))
            skl_rec = {"enabled": True, "link": path, "netns_cookie": cookie,
                       "listeners": adopted}
            if err:
                skl_rec["adopt_error"] = err
        # 1. map entries: remember the previous values of every key touched.
        # Port entries an earlier attach wrote for these IPs and this config drops. Only a
        # re-attach (an IP already enrolled) pays for scanning inbound_ports.
        enrolled = [k for k in entries[MAP_PODS]
                    if ops.map_lookup_elem(fds[MAP_PODS], k, POD_VAL.size) is not None]
        stale = [(MAP_PORTS, k) for k in _pod_port_keys(ops, fds[MAP_PORTS], enrolled)
                 if k not in entries[MAP_PORTS]] if enrolled else []
        for name, table in entries.items():
            for key, value in table.items():
                old = ops.map_lookup_elem(fds[name], key, len(value))
                ops.map_update_elem(fds[name], key, value)
                undo.append(_restore(ops, fds[name], key, old))
        for name, key in stale:
            old = ops.map_lookup_elem(fds[name], key, PORT_VAL.size)
            ops.map_delete_elem(fds[name], key)
            undo.append(_restore(ops, fds[name], key, old))
        # 1b. the interface's pod: every address its interfaces deliver follows its policy
        # (tc_inbound reads the filter's classid), not only the IPs enrolled above.
        classid = cookie = None
        if _has_map(maps, MAP_IFACES):
            ifd = _fd(maps[MAP_IFACES], "map_fd")
            cookie = pod.netns_cookie
            n = iface_id(_ifaces(ops, ifd), cookie)
            classid = INBOUND_IFACE_MAJOR | n
            key = IFACE_KEY.pack(n)
            old = ops.map_lookup_elem(ifd, key, IFACE_VAL.size)
            ops.map_update_elem(ifd, key, iface_value(entries[MAP_PODS], cookie))
            undo.append(_restore(ops, ifd, key, old))
        # 2. filters.
        with system.in_netns(pod.netns):
            with _ipr(pod) as ipr:
                for l in chosen:
                    had_clsact = _has_clsact(ipr, l["index"])
                    if not had_clsact:
                        ipr.tc("add", "clsact", l["index"])
                        undo.append(_in_pod(pod, lambda r, i=l["index"]: r.tc("del", "clsact", i)))
                    before = [f for f in _filters(ipr, l["index"], TC_INGRESS_PARENT) if f["ours"]]
                    _add_filter(ipr, l["index"], TC_INGRESS_PARENT, prog_fd, classid)
                    if not before:
                        undo.append(_in_pod(pod, lambda r, i=l["index"]:
                                            _del_filter(r, i, TC_INGRESS_PARENT)))
                    # True: this call created the qdisc; False: it was someone else's;
                    # None: a re-attach (ours already there) cannot tell, so detach
                    # removes it only if no filter at all is left on it.
                    owned = (not had_clsact) or (None if before else False)
                    added.append({"name": l["name"], "index": l["index"], "kind": l["kind"],
                                  "hook": hooks[l["name"]], "direction": "ingress",
                                  "clsact_added": owned})
    except BaseException as e:
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort; the first error is reported
                pass
        if isinstance(e, MeshbpfError):
            raise
        if isinstance(e, Exception):
            raise ApplyError(f"steering inbound traffic of pod {pod.name} failed and was "
                             f"rolled back: {e}") from e
        raise
    finally:
        if skl_owned:                        # we opened the pinned program: close it
            os.close(skl_fd)
    return {"hook": "tc", "policy": policy.to_dict(),
            "addresses": [str(a) for a in sorted(addrs, key=lambda a: (a.version, a))
                          if pod_key(a) in entries[MAP_PODS]],
            "interfaces": added, "sk_lookup": skl_rec, "owner": me,
            "iface": {"classid": classid, "netns_cookie": cookie} if classid else None}


def _restore(ops, fd, key, old):
    def fn():
        if old is None:
            ops.map_delete_elem(fd, key)
        else:
            ops.map_update_elem(fd, key, old)
    return fn


def _in_pod(pod, fn):
    def run():
        from .. import system
        with system.in_netns(pod.netns):
            with _ipr(pod) as ipr:
                fn(ipr)
    return run


def _pod_port_keys(ops, ports_fd, pod_keys):
    ips = {POD_KEY.unpack(k)[0] for k in pod_keys}
    return [k for k in ops.map_keys(ports_fd, PORT_KEY.size) if k[:16] in ips]


def detach_pod(pod, maps=None, record=None):
    """Stop steering `pod`'s inbound traffic: remove exactly what attach_pod added.

    Removes meshbpf's filters from every interface of the pod (found by priority and
    name, so a lost record still cleans up); the clsact qdisc where the record says
    meshbpf created it, and where it cannot tell (no record, or a re-attach's record)
    only if no filter is left on it, never where it was someone else's; and, when
    `maps` is given, the inbound map entries of the record's and the pod's current IPs;
    and the TIME_WAIT path: the pod's sk_lookup link (pin from the record, else derived
    from the pin prefix of `maps` and the pod's netns inode), its inbound_netns, inbound_tw
    and capture_listeners entries. A pod whose netns is gone only has its map entries and
    link pin removed. Idempotent.
    """
    import os
    from .. import system
    skl = (record or {}).get("sk_lookup") or {}
    link = skl.get("link")
    if not link and _pin_prefix(maps) is not None:
        try:
            link = link_path(_pin_prefix(maps), pod.key)
        except (MeshbpfError, OSError, AttributeError):
            link = None
    addrs = set()
    if record:
        addrs |= {ipaddress.ip_address(a) for a in record.get("addresses", [])}
    ifs = {i["index"]: i.get("clsact_added") for i in (record or {}).get("interfaces", [])}
    if os.path.exists(pod.netns):
        with system.in_netns(pod.netns):
            with _ipr(pod) as ipr:
                for l in _links(ipr):
                    if l["name"] == "lo" or not _has_clsact(ipr, l["index"]):
                        continue
                    for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
                        if any(f["ours"] for f in _filters(ipr, l["index"], parent)):
                            _del_filter(ipr, l["index"], parent)
                    left = (_filters(ipr, l["index"], TC_INGRESS_PARENT) +
                            _filters(ipr, l["index"], TC_EGRESS_PARENT))
                    owned = ifs.get(l["index"])          # True / False / None (unknown)
                    if left or owned is False:
                        continue       # someone else's qdisc, or filters still on it
                    ipr.tc("del", "clsact", l["index"])
                addrs |= set(_addresses(ipr, {l["index"] for l in _links(ipr)
                                              if l["name"] != "lo"}))
    if link:
        # after the filters: until then tc may leave TIME_WAIT SYNs to the kernel, and
        # without sk_lookup that path would reach the app's own listener
        _link_detach(link)
    owner = (record or {}).get("owner") or skl.get("netns_cookie")
    if owner is None:
        try:
            owner = pod.netns_cookie
        except (MeshbpfError, OSError, AttributeError):
            owner = None
    if maps is not None and addrs:
        fds = _map_fds(maps)
        ops = _map_ops()
        # Only entries this pod owns: its address may belong to another pod by now (a dead
        # pod's address reused by a live one, which took the entries over).
        mine = {a for a in addrs if _owned(ops, fds[MAP_PODS], a, owner)}
        addrs = mine
        keys = {pod_key(a) for a in addrs}
        policy = (record or {}).get("policy")
        if policy and set(addrs) <= {ipaddress.ip_address(a) for a in record.get("addresses", [])}:
            # The record says which port entries exist: no scan of inbound_ports.
            ports = [port_key(a, p) for a in addrs
                     for p in list(policy.get("capture", [])) + list(policy.get("bypass", []))]
        else:
            ports = _pod_port_keys(ops, fds[MAP_PORTS], keys)
        for k in ports:
            ops.map_delete_elem(fds[MAP_PORTS], k)
        for k in keys:
            ops.map_delete_elem(fds[MAP_PODS], k)
        if _has_map(maps, MAP_NETNS):
            nfd = _fd(maps[MAP_NETNS], "map_fd")
            for k in keys:
                ops.map_delete_elem(nfd, k)
        if _has_map(maps, MAP_TW):           # marks not consumed (normally none)
            tfd = _fd(maps[MAP_TW], "map_fd")
            for k in [k for k in ops.map_keys(tfd, TW_KEY.size) if k[:16] in keys]:
                ops.map_delete_elem(tfd, k)
    if maps is not None and _has_map(maps, MAP_IFACES):
        cookie = ((record or {}).get("iface") or {}).get("netns_cookie") or skl.get("netns_cookie")
        if cookie is None:
            try:
                cookie = pod.netns_cookie
            except (MeshbpfError, OSError, AttributeError):
                cookie = None
        ops = _map_ops()
        ifd = _fd(maps[MAP_IFACES], "map_fd")
        for n, owner in _ifaces(ops, ifd).items():
            if owner == cookie:
                ops.map_delete_elem(ifd, IFACE_KEY.pack(n))
    if maps is not None and _has_map(maps, MAP_LISTENERS):
        cookie = skl.get("netns_cookie")
        if cookie is None:
            try:
                cookie = pod.netns_cookie
            except (MeshbpfError, OSError, AttributeError):
                cookie = None
        if cookie is not None:
            ops = _map_ops()
            lfd = _fd(maps[MAP_LISTENERS], "map_fd")
            for k in _netns_keys(ops, lfd, LISTENER_KEY.size, cookie):
                ops.map_delete_elem(lfd, k)


def _owned(ops, pods_fd, addr, owner):
    """Is `addr`'s inbound_pods entry (if any) `owner`'s? Entries without an owner (0, from
    before owners were recorded) count as anyone's; an unknown `owner` owns only those."""
    raw = ops.map_lookup_elem(pods_fd, pod_key(addr), POD_VAL.size)
    if raw is None:
        return True                      # nothing to take from anyone (ports, marks: ours)
    cur = pod_owner(raw)
    return cur == 0 or cur == owner


def list_hooks(pod):
    """meshbpf's inbound filters in `pod`: [{interface, index, kind, hook, direction, prio,
    name, prog_id, prog_name}] (from `tc -j filter show`, which reports program ids)."""
    import json
    from .. import system
    out = []
    with system.in_netns(pod.netns):
        with _ipr(pod) as ipr:
            links = [l for l in _links(ipr) if l["name"] != "lo" and _has_clsact(ipr, l["index"])]
    for l in links:
        for direction in ("ingress", "egress"):
            res = system.run(["tc", "-j", "filter", "show", "dev", l["name"], direction],
                             netns=pod.netns, check=False)
            if res.returncode != 0:
                continue
            for f in json.loads(res.stdout or "[]"):
                opts = f.get("options") or {}
                if f.get("kind") != "bpf" or f.get("pref") != TC_PRIO or \
                        not str(opts.get("bpf_name", "")).startswith(TC_NAME):
                    continue
                prog = opts.get("prog") or {}
                out.append({"interface": l["name"], "index": l["index"], "kind": l["kind"],
                            "hook": "tc", "direction": direction, "prio": f["pref"],
                            "name": opts.get("bpf_name"), "direct_action":
                            bool(opts.get("direct-action")), "prog_id": prog.get("id"),
                            "prog_name": prog.get("name")})
    return out


def read_policy(maps, addresses):
    """What the maps say for `addresses` (for status): {ip: {capture_port, wildcard,
    capture: [...], bypass: [...]}}; IPs with no entry are left out."""
    fds = _map_fds(maps)
    ops = _map_ops()
    out = {}
    keys = {}
    for a in addresses:
        raw = ops.map_lookup_elem(fds[MAP_PODS], pod_key(a), POD_VAL.size)
        if raw is None:
            continue
        out[str(ipaddress.ip_address(a))] = dict(decode_pod_value(raw), capture=[], bypass=[])
        keys[pod_key(a)] = str(ipaddress.ip_address(a))
    for k in _pod_port_keys(ops, fds[MAP_PORTS], keys):
        raw = ops.map_lookup_elem(fds[MAP_PORTS], k, PORT_VAL.size)
        if raw is None:
            continue
        ip, port = decode_port_key(k)
        action = PORT_VAL.unpack(raw)[0]
        out[str(ip)]["capture" if action == INBOUND_PORT_CAPTURE else "bypass"].append(port)
    for v in out.values():
        v["capture"].sort()
        v["bypass"].sort()
    return out


# ---- probe --------------------------------------------------------------------------------

_PROBE = r"""
import json, os, socket, sys
from bcc import BPF
from pyroute2 import IPRoute
sys.path.insert(0, sys.argv[1])
from meshbpf import bpfsys
from meshbpf.ebpf import inbound, loader, structs
text = loader.c_text(["tc_inbound.c"])
b = BPF(text=text.encode(), cflags=["-Wno-comment"])
fn = b.load_func(b"tc_inbound_ingress", BPF.SCHED_CLS)
with IPRoute() as ipr:
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    ipr.tc("add", "clsact", lo)
    inbound._add_filter(ipr, lo, inbound.TC_INGRESS_PARENT, fn.fd)
out = {}
for name, reuse in (("plain", False), ("reuseport", True)):
    srv = socket.socket()
    if reuse:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cap = srv.getsockname()[1]
    # 127.0.0.1 enrolled like a pod IP whose policy captures every port into `cap`.
    bpfsys.map_update_elem(b[b"inbound_pods"].map_fd, inbound.pod_key("127.0.0.1"),
                           inbound.pod_value(inbound.InboundPolicy(cap, True)))
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 9))          # the discard port: nothing listens on it
        s, _ = srv.accept()
        out[name] = s.getsockname()[1] == 9
    except OSError:
        out[name] = False
    c.close()
    srv.close()
# The path for SO_REUSEPORT listeners that bpf_sk_assign refuses (Linux < 6.5): tc marks
# the SYN and mb_sk_lookup, linked in this netns, assigns the listener from
# capture_listeners. Forced (NODE_F_INBOUND_SK_LOOKUP) so it is tried on every kernel.
try:
    text2 = loader.c_text(["tc_inbound.c", "sk_lookup.c"])
    b2 = BPF(text=text2.encode(), cflags=["-Wno-comment"])
    fn2 = b2.load_func(b"tc_inbound_ingress", BPF.SCHED_CLS)
    skl = b2.load_func(b"mb_sk_lookup", bpfsys.BPF_PROG_TYPE_SK_LOOKUP,
                       attach_type=bpfsys.BPF_SK_LOOKUP)
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY)
    link = bpfsys.link_create(skl.fd, nsfd, bpfsys.BPF_SK_LOOKUP)
    with IPRoute() as ipr:
        inbound._add_filter(ipr, lo, inbound.TC_INGRESS_PARENT, fn2.fd)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")  # SO_NETNS_COOKIE
    s.close()
    bpfsys.map_update_elem(b2[b"node_cfg"].map_fd, (0).to_bytes(4, "little"),
                           (2).to_bytes(4, "little") + bytes(4))   # NODE_F_INBOUND_SK_LOOKUP
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cap = srv.getsockname()[1]
    key = inbound.pod_key("127.0.0.1")
    bpfsys.map_update_elem(b2[b"inbound_pods"].map_fd, key, inbound.pod_value(
        inbound.InboundPolicy(cap, True), sk_lookup=True))
    bpfsys.map_update_elem(b2[b"inbound_netns"].map_fd, key, cookie.to_bytes(8, "little"))
    from bcc import libbcc                     # bcc's Python has no SOCKHASH type
    bpfsys.map_update_elem(libbcc.lib.bpf_table_fd(b2.module, b"capture_listeners"),
                           inbound.listener_key(cookie, cap, inbound.AF_INET),
                           inbound.LISTENER_VAL.pack(srv.fileno()))
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 9))
        a, _ = srv.accept()
        # and it went that way, not through bpf_sk_assign (which 6.5+ would also manage)
        via = sum(b2[b"counters"][structs.COUNTERS.index("inbound_sk_lookup")])
        out["sk_lookup_reuseport"] = a.getsockname()[1] == 9 and via > 0
    except OSError:
        out["sk_lookup_reuseport"] = False
except Exception as e:  # noqa: BLE001 - no sk_lookup here: reported, not raised
    out["sk_lookup_reuseport"] = False
    out["sk_lookup_error"] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else repr(e)
print(json.dumps(out))
"""


def probe(timeout=60):
    """Try inbound steering for real: the tc_inbound program on `lo` of a throwaway
    network namespace (`unshare --net`, gone with the child) hands a connection to port 9
    to a listener on another port, once plain and once with SO_REUSEPORT (what Envoy
    uses; bpf_sk_assign accepts those only since Linux 6.5).

    Then the path such listeners take where bpf_sk_assign refuses them (Linux < 6.5): tc
    leaves the SYN to mb_sk_lookup, linked in that netns, which assigns a SO_REUSEPORT
    listener ("sk_lookup_reuseport").

    Returns {"ok": bool, "reuseport": bool, "sk_lookup_reuseport": bool, "detail": str}.
    """
    import json
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _PROBE, repo],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                "detail": f"the probe could not run: {e}"}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                "detail": "tc_inbound could not be loaded or attached: "
                          + (err[-1] if err else f"exit {proc.returncode}")}
    skl = bool(res.get("sk_lookup_reuseport"))
    skl_detail = ("sk_lookup handed a connection to a SO_REUSEPORT listener" if skl else
                  "sk_lookup did not hand a connection to a SO_REUSEPORT listener"
                  + (f" ({res['sk_lookup_error']})" if res.get("sk_lookup_error") else ""))
    if res.get("plain") and res.get("reuseport"):
        return {"ok": True, "reuseport": True, "sk_lookup_reuseport": skl,
                "detail": "bpf_sk_assign handed connections to plain and SO_REUSEPORT "
                          "listeners; " + skl_detail}
    if res.get("plain"):
        return {"ok": True, "reuseport": False, "sk_lookup_reuseport": skl,
                "detail": "bpf_sk_assign cannot use SO_REUSEPORT listeners (Linux < 6.5); "
                          + skl_detail + (": tc_inbound hands such connections to it" if skl
                                          else "")}
    return {"ok": False, "reuseport": False, "sk_lookup_reuseport": skl,
            "detail": "bpf_sk_assign did not hand a connection to the listener"}
