"""A pod as the kernel sees it: a network namespace, a cgroup, interfaces and addresses.

`Pod.from_pid` and `Pod.from_netns` resolve what a user names on the command line into
the kernel objects both interceptors work on, with a clear error when one is missing.
"""

import dataclasses
import ipaddress
import os

from . import system
from .errors import NotFoundError


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

    def __post_init__(self):
        if not os.path.exists(self.netns):
            raise NotFoundError(f"network namespace {self.netns} does not exist")
        system.netns_inode(self.netns)
        if self.cgroup is not None:
            if not os.path.isfile(os.path.join(self.cgroup, "cgroup.procs")):
                raise NotFoundError(f"{self.cgroup} is not a cgroup v2 directory")
            self.cgroup = os.path.realpath(self.cgroup)
        if not self.name:
            self.name = _netns_name(self.netns)

    @classmethod
    def from_pid(cls, pid, name=None):
        """The pod process `pid` runs in: its netns and cgroup."""
        if not os.path.exists(f"/proc/{pid}"):
            raise NotFoundError(f"no process with pid {pid}")
        return cls(netns=system.netns_path_of_pid(pid), cgroup=system.cgroup_of_pid(pid),
                   name=name or f"pid-{pid}")

    @classmethod
    def from_netns(cls, path, cgroup=None, name=None):
        """A pod named by its netns path (or a name under /run/netns)."""
        if "/" not in path:
            path = os.path.join("/run/netns", path)
        return cls(netns=path, cgroup=cgroup, name=name)

    @property
    def key(self):
        """Stable identity while the netns lives: its inode number."""
        return system.netns_inode(self.netns)

    @property
    def netns_cookie(self):
        return system.netns_cookie(self.netns)

    def interfaces(self):
        """Non-loopback interfaces in the pod's netns with their addresses."""
        from pyroute2 import IPRoute
        out = []
        with system.in_netns(self.netns):
            with IPRoute() as ipr:
                names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
                addrs = {}
                for a in ipr.get_addr():
                    ip = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                    addrs.setdefault(a["index"], []).append(ip)
        for idx, name in sorted(names.items()):
            if name == "lo":
                continue
            out.append(Interface(name=name, index=idx, addresses=addrs.get(idx, [])))
        return out

    def local_addresses(self):
        """Every address of the pod's netns, on any interface, `lo` and link-local included:
        the destinations the kernel routes through `lo` (iptables' `-o lo`)."""
        from pyroute2 import IPRoute
        with system.in_netns(self.netns):
            with IPRoute() as ipr:
                return sorted({ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                               for a in ipr.get_addr()}, key=lambda a: (a.version, a))

    def addresses(self):
        """The pod's own (non-loopback, non-link-local) IP addresses."""
        return [a.ip for i in self.interfaces() for a in i.addresses
                if not a.ip.is_link_local and not a.ip.is_loopback]

    @property
    def has_ipv6(self):
        return any(a.version == 6 for a in self.addresses())

    def describe(self):
        return {"name": self.name, "netns": self.netns, "cgroup": self.cgroup}


def _netns_name(path):
    if path.startswith("/run/netns/"):
        return os.path.basename(path)
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "proc":
        return f"pid-{parts[1]}"
    return path
