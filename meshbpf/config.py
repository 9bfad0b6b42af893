"""InterceptConfig: what a pod's interception looks like, with Istio's names and semantics.

The field names and their JSON spellings are Istio's (`proxy_port`,
`inbound_ports_include`, ...), the same as in the istio-iptables conformance cases, so a
config means the same thing in eBPF and iptables mode, in Python, JSON and files. List
fields keep Istio's comma-separated string form. `resolved()` parses and validates them
once into a ResolvedConfig (ports as sets, CIDRs by address family, numeric ids), which
both backends' generators read; it is cached until a field changes.

Pure: no side effects, no imports of kernel-facing code.
"""

import dataclasses
import ipaddress
import json

from . import istio
from .errors import UsageError

WILDCARD = "*"


@dataclasses.dataclass(frozen=True)
class Ports:
    """A port list: '*' or ports, as written (what iptables rules show) and as numbers."""

    wildcard: bool = False
    given: tuple = ()
    numbers: tuple = ()

    def spec(self):
        """'*' or a list of ints (the shape callers compare with WILDCARD)."""
        return WILDCARD if self.wildcard else list(self.numbers)


@dataclasses.dataclass(frozen=True)
class Ranges:
    """A CIDR list: '*' or ip_interface items in the order written, host bits kept as
    written (Istio prints netip.Prefix.String(), which keeps them)."""

    wildcard: bool = False
    given: tuple = ()

    def family(self, version):
        return tuple(i for i in self.given if i.version == version)

    def networks(self):
        return [i.network for i in self.given]

    def has_loopback(self, version):
        return any(i.ip.is_loopback for i in self.family(version))

    def spec(self):
        """'*' or a list of ip_network."""
        return WILDCARD if self.wildcard else self.networks()


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """An InterceptConfig's list fields, parsed and validated once."""

    proxy_uids: tuple
    proxy_gids: tuple
    inbound_include: Ports
    inbound_exclude: Ports
    outbound_ports_include: Ports
    outbound_ports_exclude: Ports
    outbound_include: Ranges
    outbound_exclude: Ranges
    owner_groups: tuple          # names or ids as written
    owner_groups_except: bool    # True: every group but owner_groups is captured
    dns_v4: tuple
    dns_v6: tuple


@dataclasses.dataclass
class InterceptConfig:
    """One pod's interception settings. Defaults are those Istio's sidecar injector uses."""

    proxy_port: int = istio.OUTBOUND_PORT
    inbound_capture_port: int = istio.INBOUND_PORT
    inbound_tunnel_port: int = istio.TUNNEL_PORT
    proxy_uid: str = str(istio.PROXY_UID)
    proxy_gid: str = str(istio.PROXY_GID)
    inbound_tproxy_mark: int = istio.TPROXY_MARK
    inbound_tproxy_route_table: int = 133
    owner_groups_include: str = WILDCARD
    owner_groups_exclude: str = ""
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"
    inbound_ports_include: str = WILDCARD
    inbound_ports_exclude: str = ",".join(map(str, istio.INBOUND_PORTS_EXCLUDE))
    outbound_ip_ranges_include: str = WILDCARD
    outbound_ip_ranges_exclude: str = ""
    outbound_ports_include: str = ""
    outbound_ports_exclude: str = ""
    reroute_virtual_interfaces: str = ""
    exclude_interfaces: str = ""
    inbound_interception_mode: str = "REDIRECT"
    redirect_dns: bool = False
    capture_all_dns: bool = False
    dns_servers_v4: list = dataclasses.field(default_factory=list)
    dns_servers_v6: list = dataclasses.field(default_factory=list)
    drop_invalid: bool = False
    enable_ipv6: bool = False

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data):
        """Build and validate from a dict of Istio field names; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"unknown config field(s): {', '.join(unknown)}",
                             hint=f"known fields: {', '.join(sorted(names))}")
        cfg = cls(**{k: _coerce(cls, k, v) for k, v in data.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"config is not valid JSON: {e}")
        if not isinstance(data, dict):
            raise UsageError("config JSON must be an object of Istio field names")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path):
        try:
            with open(path) as f:
                return cls.from_json(f.read())
        except OSError as e:
            raise UsageError(f"cannot read config file {path}: {e.strerror}")

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        self.__dict__.pop("_resolved", None)        # a field changed: resolve again

    def resolved(self):
        """The ResolvedConfig of this config (parsed once; raises UsageError naming the
        first invalid list field)."""
        r = self.__dict__.get("_resolved")
        if r is None:
            r = _resolve(self)
            self.__dict__["_resolved"] = r
        return r

    def replace(self, **changes):
        """A validated copy with `changes` applied."""
        cfg = dataclasses.replace(self, **{k: _coerce(type(self), k, v) for k, v in changes.items()})
        cfg.validate()
        return cfg

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    # ---- validation ---------------------------------------------------------------

    def validate(self):
        """Raise UsageError naming the first invalid field; returns self."""
        for name in ("proxy_port", "inbound_capture_port", "inbound_tunnel_port"):
            _port(getattr(self, name), name)
        self.resolved()
        cidr = parse_cidrs(self.host_ipv4_loopback_cidr, "host_ipv4_loopback_cidr")
        if cidr == WILDCARD or len(cidr) != 1 or cidr[0].version != 4:
            raise UsageError(f"host_ipv4_loopback_cidr: expected one IPv4 CIDR, got {self.host_ipv4_loopback_cidr!r}")
        if self.inbound_interception_mode not in ("REDIRECT", "TPROXY"):
            raise UsageError(f"inbound_interception_mode: expected REDIRECT or TPROXY, "
                             f"got {self.inbound_interception_mode!r}")
        for name in ("inbound_tproxy_mark", "inbound_tproxy_route_table"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UsageError(f"{name}: expected a non-negative integer, got {v!r}")
        return self

    # ---- parsed views -------------------------------------------------------------

    def proxy_uids(self):
        return list(self.resolved().proxy_uids)

    def proxy_gids(self):
        return list(self.resolved().proxy_gids)

    def inbound_ports(self):
        """(include, exclude): include is "*" or a list of ports."""
        r = self.resolved()
        return r.inbound_include.spec(), r.inbound_exclude.spec()

    def outbound_ports(self):
        r = self.resolved()
        return r.outbound_ports_include.spec(), r.outbound_ports_exclude.spec()

    def outbound_cidrs(self):
        """(include, exclude): include is "*" or a list of ip_network; exclude a list."""
        r = self.resolved()
        return r.outbound_include.spec(), r.outbound_exclude.spec()

    def inbound_excluded_always(self):
        """Ports never captured inbound: the tunnel port only, as Istio's first ISTIO_INBOUND
        rule (`--dport 15008 -j RETURN`). The sidecar's other ports (15001, 15006, 15020,
        15021, 15090) are captured like any other unless inbound_ports_exclude lists them
        (Istio's injector lists 15020, 15021, 15090: the default does too)."""
        return [self.inbound_tunnel_port]


def _resolve(cfg):
    """Parse every list field of `cfg` once (UsageError names the first bad one)."""
    if cfg.owner_groups_include not in ("", WILDCARD) and cfg.owner_groups_exclude:
        raise UsageError("owner_groups_include and owner_groups_exclude cannot both be set")
    dns = {}
    for name, version in (("dns_servers_v4", 4), ("dns_servers_v6", 6)):
        out = []
        for item in getattr(cfg, name):
            try:
                ip = ipaddress.ip_address(item)
            except ValueError:
                raise UsageError(f"{name}: {item!r} is not an IP address")
            if ip.version != version:
                raise UsageError(f"{name}: {item} is not an IPv{version} address")
            out.append(ip)
        dns[version] = tuple(out)
    except_mode = cfg.owner_groups_include.strip() == WILDCARD
    return ResolvedConfig(
        proxy_uids=tuple(parse_ids(cfg.proxy_uid, "proxy_uid")),
        proxy_gids=tuple(parse_ids(cfg.proxy_gid, "proxy_gid")),
        inbound_include=_port_set(cfg.inbound_ports_include, "inbound_ports_include"),
        inbound_exclude=_port_set(cfg.inbound_ports_exclude, "inbound_ports_exclude"),
        outbound_ports_include=_port_set(cfg.outbound_ports_include, "outbound_ports_include"),
        outbound_ports_exclude=_port_set(cfg.outbound_ports_exclude, "outbound_ports_exclude"),
        outbound_include=_ranges(cfg.outbound_ip_ranges_include, "outbound_ip_ranges_include"),
        outbound_exclude=_ranges(cfg.outbound_ip_ranges_exclude, "outbound_ip_ranges_exclude"),
        owner_groups=tuple(split_list(cfg.owner_groups_exclude if except_mode
                                      else cfg.owner_groups_include)),
        owner_groups_except=except_mode,
        dns_v4=dns[4], dns_v6=dns[6])


def _port_set(value, field):
    items = split_list(value)
    if WILDCARD in items and field != "inbound_ports_include":     # as Istio's validation
        raise UsageError(f"{field}: '*' is not a port number (1-65535)")
    numbers = parse_ports(items, field)
    if numbers == WILDCARD:
        return Ports(wildcard=True, given=(WILDCARD,))
    return Ports(given=tuple(items), numbers=tuple(numbers))


def _ranges(value, field):
    items = split_list(value)
    if items == [WILDCARD]:
        return Ranges(wildcard=True)
    if WILDCARD in items:
        raise UsageError(f"{field}: '*' cannot be combined with other ranges")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_interface(item))
        except ValueError:
            raise UsageError(f"{field}: {item!r} is not a valid CIDR")
    return Ranges(given=tuple(out))


def split_list(value):
    """Istio's comma list: '' -> [], spaces trimmed, empty items dropped."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [p.strip() for p in str(value).split(",") if p.strip()]


def _port(value, field):
    if isinstance(value, str) and not value.strip().isdigit():
        raise UsageError(f"{field}: {value!r} is not a port number")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{field}: {value!r} is not a port number")
    if not 0 < port < 65536:
        raise UsageError(f"{field}: port {port} is out of range (1-65535)")
    return port


def parse_ports(value, field="ports"):
    """'' -> [], '*' -> '*', '80,443' -> [80, 443]."""
    items = split_list(value)
    if items == [WILDCARD]:
        return WILDCARD
    if WILDCARD in items:
        raise UsageError(f"{field}: '*' cannot be combined with other ports")
    return [_port(p, field) for p in items]


def parse_cidrs(value, field="cidrs"):
    """'' -> [], '*' -> '*', else a list of ip_network (a bare address is a /32 or /128)."""
    items = split_list(value)
    if items == [WILDCARD]:
        return WILDCARD
    if WILDCARD in items:
        raise UsageError(f"{field}: '*' cannot be combined with other ranges")
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UsageError(f"{field}: {item!r} is not a valid CIDR")
    return nets


def parse_ids(value, field):
    """A comma list of numeric uids/gids (or names known to this machine) -> list of ints."""
    import grp
    import pwd
    ids = []
    for item in split_list(value):
        if item.isdigit():
            n = int(item)
            if n >= 2**32 - 1:
                raise UsageError(f"{field}: {n} is out of range")
            ids.append(n)
            continue
        try:
            ids.append(pwd.getpwnam(item).pw_uid if "uid" in field else grp.getgrnam(item).gr_gid)
        except KeyError:
            raise UsageError(f"{field}: {item!r} is neither a number nor a known name")
    if not ids:
        raise UsageError(f"{field}: at least one id is required")
    return ids


_BOOL = {"redirect_dns", "capture_all_dns", "drop_invalid", "enable_ipv6"}
_INT = {"proxy_port", "inbound_capture_port", "inbound_tunnel_port",
        "inbound_tproxy_mark", "inbound_tproxy_route_table"}
_LIST = {"dns_servers_v4", "dns_servers_v6"}


def _coerce(cls, name, value):
    """Accept the spellings a CLI flag or JSON may give (ints as strings, lists as commas)."""
    if name in _BOOL:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise UsageError(f"{name}: expected true or false, got {value!r}")
        return bool(value)
    if name in _INT:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{name}: {value!r} is not a number")
    if name in _LIST:
        return split_list(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)
