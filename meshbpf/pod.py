"""A pod as the kernel sees it: a network namespace, a cgroup, interfaces and addresses.

`Pod.from_pid` and `Pod.from_netns` resolve what a user names on the command line into
the kernel objects both interceptors work on, with a clear error when one is missing.
"""

import contextlib
import contextvars
import dataclasses
import ipaddress
import os
import socket
import zlib

from . import istio, system
from .errors import MeshbpfError, NotFoundError, UsageError
from .state import valid_pod_id
from .userns import IdMap

# Istio's inbound passthrough binds its IPv6 upstream connections to ::6, which istio-init
# (ConfigureRoutes) adds to the pod's lo; both modes add it when the pod captures IPv6.
INBOUND_V6_ADDRESS = f"{istio.INBOUND_PASSTHROUGH_V6}/128"
IFA_F_NODAD = 0x02


@dataclasses.dataclass
class Interface:
    name: str
    index: int
    addresses: list  # ipaddress.ip_interface


@dataclasses.dataclass
class Pod:
    netns: str                 # path of the netns file (/proc/PID/ns/net, /run/netns/NAME)
    cgroup: str = None         # absolute cgroup v2 directory, when known
    name: str = None           # how status shows it
    pid: int = None            # a process of the pod, when the pod was named by one
    id: str = None             # stable id its caller gives (Kubernetes UID, name); see pod_id
    # A host workload (a VM or bare-metal service): its netns is the caller's own, the
    # machine's; only `cgroup` tells its sockets from the rest of the host's.
    host: bool = False
    # Where inbound is captured for a host workload: a list of interface names, or "*" for
    # every non-loopback Ethernet interface. None for a pod (its own interfaces).
    inbound_interfaces: object = None

    def __post_init__(self):
        if not os.path.exists(self.netns):
            raise NotFoundError(f"network namespace {self.netns} does not exist")
        system.netns_inode(self.netns)
        if self.cgroup is not None:
            if not os.path.isfile(os.path.join(self.cgroup, "cgroup.procs")):
                raise NotFoundError(f"{self.cgroup} is not a cgroup v2 directory")
            self.cgroup = os.path.realpath(self.cgroup)
        if self.id is not None and not valid_pod_id(self.id):
            raise UsageError(f"pod id {self.id!r} is not usable: letters, digits and ._:@- "
                             "only, starting with a letter or digit, at most 253 characters")
        if not self.name:
            self.name = _netns_name(self.netns)
        self._cookie = None

    @classmethod
    def from_pid(cls, pid, name=None, pod_id=None):
        """The pod process `pid` runs in: its netns and cgroup."""
        if not os.path.exists(f"/proc/{pid}"):
            raise NotFoundError(f"no process with pid {pid}")
        return cls(netns=system.netns_path_of_pid(pid), cgroup=system.cgroup_of_pid(pid),
                   name=name or f"pid-{pid}", pid=int(pid), id=pod_id)

    @classmethod
    def from_netns(cls, path, cgroup=None, name=None, pod_id=None):
        """A pod named by its netns path (or a name under /run/netns)."""
        if "/" not in path:
            path = os.path.join("/run/netns", path)
        return cls(netns=path, cgroup=cgroup, name=name, id=pod_id)

    @property
    def pod_id(self):
        """The id its record is kept under: the caller's, else one made of the netns cookie
        (never reused within a boot, unlike the netns inode) and the cgroup."""
        if self.id is not None:
            return self.id
        try:
            ident = self.netns_cookie
        except MeshbpfError:      # no SO_NETNS_COOKIE (before 5.14): the inode, while it lives
            ident = f"i{system.netns_inode(self.netns)}"
        return generated_pod_id(ident, self.cgroup)

    @property
    def netns_cookie(self):
        """The kernel's key for the pod (bpf_get_netns_cookie), read once."""
        if self._cookie is None:
            self._cookie = system.netns_cookie(self.netns)
        return self._cookie

    def _dump(self):
        """({index: name}, {index: [ip_interface]}, [local address]) in one netlink session."""
        from pyroute2 import IPRoute
        with system.in_netns(self.netns):
            with IPRoute() as ipr:
                names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
                addrs, local = {}, set()
                for a in ipr.get_addr():
                    ip = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                    addrs.setdefault(a["index"], []).append(ip)
                    local.add(ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")))
        return names, addrs, sorted(local, key=lambda a: (a.version, a))

    def interfaces(self):
        """Non-loopback interfaces in the pod's netns with their addresses."""
        names, addrs, _ = self._dump()
        return _interfaces(names, addrs)

    def local_addresses(self):
        """Every address of the pod's netns, on any interface, `lo` and link-local included:
        the destinations the kernel routes through `lo` (iptables' `-o lo`)."""
        return self._dump()[2]

    def addresses(self):
        """The pod's own (non-loopback, non-link-local) IP addresses."""
        return self.address_sets()[0]

    def address_sets(self):
        """(addresses(), local_addresses()) from one netlink dump."""
        names, addrs, local = self._dump()
        own = [a.ip for i in _interfaces(names, addrs) for a in i.addresses
               if not a.ip.is_link_local and not a.ip.is_loopback]
        return own, local

    @property
    def has_ipv6(self):
        return any(a.version == 6 for a in self.addresses())

    def user_namespace(self):
        """The pod's user namespace as an IdMap, or None when the pod runs in ours.

        Read from the pod's process (`pid`) or, for a pod named by its netns, from a
        process in that netns whose user namespace is not ours (Kubernetes puts every
        container of a `hostUsers: false` pod in one). None if there is no such process.
        """
        pids = [self.pid] if self.pid is not None else self.pids()
        own = _userns_inode("self")
        found = {}
        for pid in pids:
            ino = _userns_inode(pid)
            if ino is not None and ino != own:
                found.setdefault(ino, pid)
        if not found:
            return None
        if len(found) > 1:
            raise UsageError(f"pod {self.name}: processes in its netns run in "
                             f"{len(found)} different user namespaces",
                             hint="name the pod by its proxy's pid (--pid)")
        pid = next(iter(found.values()))
        try:
            with open(f"/proc/{pid}/uid_map") as u, open(f"/proc/{pid}/gid_map") as g:
                return IdMap.from_text(u.read(), g.read())
        except OSError as e:
            raise MeshbpfError(f"cannot read the user namespace maps of pid {pid}: {e.strerror}")

    def pids(self):
        """The pod's processes: those of its cgroup subtree in its netns when it has a cgroup
        (a few, whatever the node runs), else every process in its netns."""
        if self.cgroup:
            pids = []
            for dirpath, _, files in os.walk(self.cgroup):
                if "cgroup.procs" in files:
                    try:
                        with open(os.path.join(dirpath, "cgroup.procs")) as f:
                            pids += [int(p) for p in f.read().split() if p != "0"]
                    except OSError:
                        continue
            mine = _in_netns(pids, self.netns)
            if mine:
                return mine
        return _pids_in_netns(self.netns)

    def describe(self):
        return {"name": self.name, "netns": self.netns, "cgroup": self.cgroup}

    def host_fields(self):
        """What a record keeps of a host workload ({} for a pod): detach and status in
        any later process must know the netns is the machine's on purpose."""
        if not self.host:
            return {}
        return {"host": True, "inbound_interfaces": self.inbound_interfaces}


def _interfaces(names, addrs):
    return [Interface(name=name, index=idx, addresses=addrs.get(idx, []))
            for idx, name in sorted(names.items()) if name != "lo"]


def generated_pod_id(netns_cookie, cgroup):
    """Pure: the id of a pod named only by its netns (and cgroup)."""
    return f"netns-{netns_cookie}-{zlib.crc32((cgroup or '').encode()):08x}"


def _userns_inode(pid):
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return None


def _pids_in_netns(netns):
    return _in_netns([int(e) for e in os.listdir("/proc") if e.isdigit()], netns)


def _in_netns(pids, netns):
    """The processes of `pids` that live in network namespace `netns`."""
    try:
        st = os.stat(netns)
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            ns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            out.append(pid)
    return out


# Set (host_netns_allowed) only around a backend's work on a host workload's record or
# Pod: guard_netns then lets the caller's own netns through. A context variable, so a
# thread or task working on a pod at the same time is not affected.
_HOST_ALLOWED = contextvars.ContextVar("meshbpf_host_netns_allowed", default=False)


@contextlib.contextmanager
def host_netns_allowed(allowed=True):
    """Within this block guard_netns accepts the caller's own network namespace (a host
    workload's, named with "host": true), never another process's (pid 1's, when the caller
    runs elsewhere: a test netns)."""
    token = _HOST_ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _HOST_ALLOWED.reset(token)


def is_own_netns(netns):
    """Is `netns` the caller's own network namespace (for the agent: the host's)?"""
    try:
        a, b = os.stat(netns), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def guard_netns(netns):
    """Refuse the machine's own network namespace (the one meshbpf runs in, or init's):
    meshbpf only ever changes pods' namespaces, and the caller's own one only for a host
    workload (inside host_netns_allowed)."""
    try:
        target = os.stat(netns)
    except FileNotFoundError:
        raise NotFoundError(f"network namespace {netns} does not exist")
    if _HOST_ALLOWED.get() and is_own_netns(netns):
        return
    own = set()
    for path in ("/proc/self/ns/net", "/proc/1/ns/net"):
        try:
            st = os.stat(path)
            own.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    if (target.st_dev, target.st_ino) in own:
        raise UsageError(f"{netns} is the machine's own network namespace; meshbpf only "
                         "changes pods' namespaces, and the host's only for a host workload "
                         '(a pods-file entry with "host": true)',
                         hint="name the pod's netns or a pod process")


def ensure_inbound_v6_address(netns):
    """Add ::6/128 to the pod's lo, as istio-iptables does when IPv6 is enabled: the inbound
    passthrough binds to it (IPv6 loopback is only ::1/128 otherwise). Without it Envoy's
    bind fails, it dials the app from the pod's own address, and inbound capture sends that
    straight back to Envoy: a loop.

    Returns True if this call added it, False if it was already there.
    """
    guard_netns(netns)
    if _has_inbound_v6_address(netns):
        return False
    _lo_v6_address(netns, "add")
    return True


def _lo_v6_address(netns, op):
    """Add or delete ::6/128 on the netns's lo (netlink: no `ip` process per pod)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    addr, plen = INBOUND_V6_ADDRESS.split("/")
    with system.in_netns(netns):
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                ipr.addr(op, index=lo, address=addr, prefixlen=int(plen), family=socket.AF_INET6,
                         flags=IFA_F_NODAD)
            except NetlinkError as e:
                if op == "add":
                    raise MeshbpfError(f"adding {INBOUND_V6_ADDRESS} to lo failed: {e}")


def _has_inbound_v6_address(netns):
    """Is ::6/128 on the pod's lo? (/proc's address list of the netns: no `ip` process.)"""
    with system.in_netns(netns):
        try:
            with open("/proc/thread-self/net/if_inet6") as f:
                rows = [l.split() for l in f]
        except FileNotFoundError:          # IPv6 disabled in the netns
            return False
    return any(r[0] == "0" * 31 + "6" and r[2] == "80" and r[-1] == "lo" for r in rows)


def remove_inbound_v6_address(netns):
    """Remove the ::6/128 that ensure_inbound_v6_address added (no error if it is gone)."""
    if netns and os.path.exists(netns):
        _lo_v6_address(netns, "del")


def _netns_name(path):
    if path.startswith("/run/netns/"):
        return os.path.basename(path)
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "proc":
        return f"pid-{parts[1]}"
    return path
