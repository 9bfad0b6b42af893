"""Pure rule generation: an InterceptConfig becomes Istio's `iptables-restore --noflush` payload.

This mirrors istio-iptables' generator (tools/istio-iptables/pkg/capture/run.go and its
rule builder) rule for rule and in the same order, so `render(cfg, 4)` is byte-for-byte
the payload Istio would apply for the same configuration (checked against Istio's own
golden files in tests/unit/test_iptables_conformance.py). Differences from Istio are
deliberate and only about bad input: where Istio silently ignores an unparsable CIDR,
this raises a UsageError naming it (via InterceptConfig.validate).

No side effects: nothing here runs a command or reads the machine. Owner-group names
stay names in the payload (iptables resolves them), exactly as upstream does.
"""

import dataclasses
import re

from .. import istio
from ..config import WILDCARD, split_list
from ..errors import UsageError

# Chains (Istio's names).
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_DROP = "ISTIO_DROP"
CHAIN_PREFIX = "ISTIO_"

BUILTIN_CHAINS = ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING")
TABLES = ("filter", "mangle", "nat", "raw")
OUTBOUND_MARK = str(istio.OUTBOUND_MARK)
DNS_AGENT_PORT = str(istio.DNS_PORT)
PASSTHROUGH_V4 = f"{istio.INBOUND_PASSTHROUGH_V4}/32"
PASSTHROUGH_V6 = f"{istio.INBOUND_PASSTHROUGH_V6}/128"
LOOPBACK_V6 = "::1/128"
FAMILIES = (4, 6)

_V = object()  # placeholder for the family-specific address (Istio's IPVersionSpecific)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule command: `-A chain params...` or `-I chain position params...` in `table`."""

    table: str
    chain: str
    params: tuple
    position: int = None  # None: append; an int: insert at that position

    def command(self):
        head = ["-A", self.chain] if self.position is None else ["-I", self.chain, str(self.position)]
        return " ".join(head + list(self.params))

    @property
    def target(self):
        p = self.params
        return p[p.index("-j") + 1] if "-j" in p and p.index("-j") + 1 < len(p) else None


class _Builder:
    """Istio's IptablesRuleBuilder: two ordered rule lists, one per address family."""

    def __init__(self, ipv6):
        self.ipv6 = ipv6
        self.rules = {4: [], 6: []}

    def append(self, chain, table, *params, family=None):
        for fam in (4, 6) if family is None else (family,):
            if fam == 6 and not self.ipv6:
                continue
            self.rules[fam].append(Rule(table, chain, tuple(params)))

    def insert(self, chain, table, position, *params, family=None):
        for fam in (4, 6) if family is None else (family,):
            if fam == 6 and not self.ipv6:
                continue
            self.rules[fam].append(Rule(table, chain, tuple(params), position))

    def append_versioned(self, v4, v6, chain, table, *params):
        self.append(chain, table, *[v4 if p is _V else p for p in params], family=4)
        self.append(chain, table, *[v6 if p is _V else p for p in params], family=6)


@dataclasses.dataclass
class _Range:
    wildcard: bool = False
    cidrs: list = dataclasses.field(default_factory=list)  # Istio's netip.Prefix.String() spellings
    has_loopback: bool = False


def _separate_v4_v6(ranges):
    """Istio's separateV4V6 of a resolved Ranges: '*' -> wildcard for both; else the v4
    and v6 prefixes, spelt as netip.Prefix.String() (the address as given, host bits kept)."""
    if ranges.wildcard:
        return _Range(wildcard=True), _Range(wildcard=True)
    v4, v6 = _Range(), _Range()
    for iface in ranges.given:
        rng = v4 if iface.version == 4 else v6
        rng.cidrs.append(f"{iface.ip}/{iface.network.prefixlen}")
        rng.has_loopback = rng.has_loopback or iface.ip.is_loopback
    return v4, v6


_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
_OWNER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.$-]{0,31}$")


def _names(value, field, pattern, what):
    """Comma list of interface/user/group names, each one safe as a single iptables word."""
    items = split_list(value)
    for item in items:
        if not pattern.match(item):
            raise UsageError(f"{field}: {item!r} is not a valid {what}")
    return items


def build(cfg):
    """The ordered rules Istio generates for `cfg`: {4: [Rule...], 6: [Rule...]}.

    The v6 list is empty unless cfg.enable_ipv6.
    """
    cfg.validate()
    b = _Builder(bool(cfg.enable_ipv6))
    proxy_port = str(cfg.proxy_port)
    capture_port = str(cfg.inbound_capture_port)
    tunnel_port = str(cfg.inbound_tunnel_port)
    mark = str(cfg.inbound_tproxy_mark)
    loopback4 = cfg.host_ipv4_loopback_cidr.strip()
    tproxy = cfg.inbound_interception_mode == "TPROXY"
    uids = _names(cfg.proxy_uid, "proxy_uid", _OWNER, "user id or name")
    gids = _names(cfg.proxy_gid, "proxy_gid", _OWNER, "group id or name")
    _names(cfg.owner_groups_include if cfg.owner_groups_include.strip() != WILDCARD else "",
           "owner_groups_include", _OWNER, "group id or name")
    _names(cfg.owner_groups_exclude, "owner_groups_exclude", _OWNER, "group id or name")

    resolved = cfg.resolved()
    v4_excl, v6_excl = _separate_v4_v6(resolved.outbound_exclude)
    if v4_excl.wildcard:
        raise UsageError("outbound_ip_ranges_exclude: '*' is not allowed (exclude everything by "
                         "setting outbound_ip_ranges_include to '')")
    v4_incl, v6_incl = _separate_v4_v6(resolved.outbound_include)

    redirect_dns = bool(cfg.redirect_dns)
    if redirect_dns and not cfg.capture_all_dns and not cfg.dns_servers_v4 and not cfg.dns_servers_v6:
        redirect_dns = False  # Istio: REDIRECT_DNS without servers or capture-all is a no-op

    # shortCircuitExcludeInterfaces
    excluded_ifaces = _names(cfg.exclude_interfaces, "exclude_interfaces", _IFNAME, "interface name")
    for iface in excluded_ifaces:
        b.append("PREROUTING", "nat", "-i", iface, "-j", "RETURN")
        b.append("OUTPUT", "nat", "-o", iface, "-j", "RETURN")
    if tproxy:
        for iface in excluded_ifaces:
            b.append("PREROUTING", "mangle", "-i", iface, "-j", "RETURN")
            b.append("OUTPUT", "mangle", "-o", iface, "-j", "RETURN")

    # shortCircuitKubeInternalInterface
    virt_ifaces = _names(cfg.reroute_virtual_interfaces, "reroute_virtual_interfaces", _IFNAME,
                         "interface name")
    for iface in virt_ifaces:
        b.insert("PREROUTING", "nat", 1, "-i", iface, "-j", "RETURN")

    if cfg.drop_invalid:
        b.append("PREROUTING", "mangle", "-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP)
        b.append(ISTIO_DROP, "mangle", "-j", "DROP")

    b.append(ISTIO_INBOUND, "nat", "-p", "tcp", "--dport", tunnel_port, "-j", "RETURN")
    b.append(ISTIO_REDIRECT, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", proxy_port)
    b.append(ISTIO_IN_REDIRECT, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", capture_port)

    # handleInboundPortsInclude
    inbound_include = list(resolved.inbound_include.given)
    if inbound_include:
        if tproxy:
            b.append(ISTIO_DIVERT, "mangle", "-j", "MARK", "--set-mark", mark)
            b.append(ISTIO_DIVERT, "mangle", "-j", "ACCEPT")
            b.append_versioned(loopback4, LOOPBACK_V6, ISTIO_TPROXY, "mangle", "!", "-d", _V,
                               "-p", "tcp", "-j", "TPROXY", "--tproxy-mark", mark + "/0xffffffff",
                               "--on-port", capture_port)
            table = "mangle"
        else:
            table = "nat"
        b.append("PREROUTING", table, "-p", "tcp", "-j", ISTIO_INBOUND)
        if inbound_include == [WILDCARD]:
            for port in resolved.inbound_exclude.given:
                b.append(ISTIO_INBOUND, table, "-p", "tcp", "--dport", port, "-j", "RETURN")
            if tproxy:
                b.append(ISTIO_INBOUND, "mangle", "-p", "tcp", "-m", "conntrack", "--ctstate",
                         "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT)
                b.append(ISTIO_INBOUND, "mangle", "-p", "tcp", "-j", ISTIO_TPROXY)
            else:
                b.append(ISTIO_INBOUND, "nat", "-p", "tcp", "-j", ISTIO_IN_REDIRECT)
        else:
            for port in inbound_include:
                if tproxy:
                    b.append(ISTIO_INBOUND, "mangle", "-p", "tcp", "--dport", port, "-m", "conntrack",
                             "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT)
                    b.append(ISTIO_INBOUND, "mangle", "-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY)
                else:
                    b.append(ISTIO_INBOUND, "nat", "-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT)

    b.append("OUTPUT", "nat", "-j", ISTIO_OUTPUT)

    for port in resolved.outbound_ports_exclude.given:
        b.append(ISTIO_OUTPUT, "nat", "-p", "tcp", "--dport", port, "-j", "RETURN")
        b.append(ISTIO_OUTPUT, "nat", "-p", "udp", "--dport", port, "-j", "RETURN")

    b.append_versioned(PASSTHROUGH_V4, PASSTHROUGH_V6, ISTIO_OUTPUT, "nat", "-o", "lo", "-s", _V,
                       "-j", "RETURN")

    loopback_included = v4_incl.has_loopback or v6_incl.has_loopback
    # Istio's order: every proxy uid, then every proxy gid. Only the uid rules know DNS
    # (with redirect_dns the proxy's own TCP DNS on lo is not sent to the inbound port).
    for flag, owners, dns_aware in (("--uid-owner", uids, True), ("--gid-owner", gids, False)):
        for owner in owners:
            dns = redirect_dns and dns_aware
            dports = (["-m", "multiport", "!", "--dports", "53," + tunnel_port] if dns
                      else ["!", "--dport", tunnel_port])
            b.append_versioned(loopback4, LOOPBACK_V6, ISTIO_OUTPUT, "nat", "-o", "lo", "!", "-d", _V,
                               "-p", "tcp", *dports,
                               "-m", "owner", flag, owner, "-j", ISTIO_IN_REDIRECT)
            if not loopback_included:
                tcp53 = ["-p", "tcp", "!", "--dport", "53"] if redirect_dns else []
                b.append(ISTIO_OUTPUT, "nat", "-o", "lo", *tcp53,
                         "-m", "owner", "!", flag, owner, "-j", "RETURN")
            b.append(ISTIO_OUTPUT, "nat", "-m", "owner", flag, owner, "-j", "RETURN")

    # handleCaptureByOwnerGroup
    groups, except_mode = list(resolved.owner_groups), resolved.owner_groups_except
    if except_mode:
        for group in groups:
            b.append(ISTIO_OUTPUT, "nat", "-m", "owner", "--gid-owner", group, "-j", "RETURN")
    else:
        matchers = []
        for group in groups:
            matchers += ["-m", "owner", "!", "--gid-owner", group]
        b.append(ISTIO_OUTPUT, "nat", *matchers, "-j", "RETURN")

    if redirect_dns:
        _dns_redirect(b, uids, gids, cfg.dns_servers_v4, cfg.dns_servers_v6, cfg.capture_all_dns)

    b.append_versioned(loopback4, LOOPBACK_V6, ISTIO_OUTPUT, "nat", "-d", _V, "-j", "RETURN")
    for cidr in v4_excl.cidrs:
        b.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", "RETURN", family=4)
    for cidr in v6_excl.cidrs:
        b.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", "RETURN", family=6)

    for port in resolved.outbound_ports_include.given:
        b.append(ISTIO_OUTPUT, "nat", "-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT)

    for fam, rng in ((4, v4_incl), (6, v6_incl)):
        if rng.wildcard:
            b.append(ISTIO_OUTPUT, "nat", "-j", ISTIO_REDIRECT, family=fam)
            for iface in virt_ifaces:
                b.insert("PREROUTING", "nat", 1, "-i", iface, "-j", ISTIO_REDIRECT, family=fam)
        else:
            for cidr in rng.cidrs:
                for iface in virt_ifaces:
                    b.insert("PREROUTING", "nat", 1, "-i", iface, "-d", cidr, "-j", ISTIO_REDIRECT,
                             family=fam)
                b.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", ISTIO_REDIRECT, family=fam)

    if tproxy:
        b.append("PREROUTING", "mangle", "-p", "tcp", "-m", "mark", "--mark", mark,
                 "-j", "CONNMARK", "--save-mark")
        b.append("OUTPUT", "mangle", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
        for uid in uids:
            b.append_versioned(loopback4, LOOPBACK_V6, "OUTPUT", "mangle", "!", "-d", _V, "-p", "tcp",
                               "-o", "lo", "-m", "owner", "--uid-owner", uid,
                               "-j", "MARK", "--set-mark", OUTBOUND_MARK)
        for gid in gids:
            b.append_versioned(loopback4, LOOPBACK_V6, "OUTPUT", "mangle", "!", "-d", _V, "-p", "tcp",
                               "-o", "lo", "-m", "owner", "--gid-owner", gid,
                               "-j", "MARK", "--set-mark", OUTBOUND_MARK)
        b.append("OUTPUT", "mangle", "-p", "tcp", "-m", "connmark", "--mark", mark,
                 "-j", "CONNMARK", "--restore-mark")
        b.insert(ISTIO_INBOUND, "mangle", 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
        b.insert(ISTIO_INBOUND, "mangle", 2, "-p", "tcp", "-s", PASSTHROUGH_V4, "-i", "lo", "-j", "RETURN",
                 family=4)
        b.insert(ISTIO_INBOUND, "mangle", 2, "-p", "tcp", "-s", PASSTHROUGH_V6, "-i", "lo", "-j", "RETURN",
                 family=6)
        b.insert(ISTIO_INBOUND, "mangle", 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark",
                 OUTBOUND_MARK, "-j", "RETURN")
    return b.rules


def _dns_redirect(b, uids, gids, servers4, servers6, capture_all):
    """Istio's SetupDNSRedir + addDNSConntrackZones."""
    b.append("OUTPUT", "raw", "-j", ISTIO_OUTPUT_DNS)
    if capture_all or servers4:
        b.append(ISTIO_OUTPUT, "nat", "-j", ISTIO_OUTPUT_DNS, family=4)
    if capture_all or servers6:
        b.append(ISTIO_OUTPUT, "nat", "-j", ISTIO_OUTPUT_DNS, family=6)
    if capture_all:
        b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "tcp", "--dport", "53", "-j", "REDIRECT",
                 "--to-ports", DNS_AGENT_PORT)
    else:
        for s in servers4:
            b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "tcp", "--dport", "53", "-d", s + "/32",
                     "-j", "REDIRECT", "--to-ports", DNS_AGENT_PORT, family=4)
        for s in servers6:
            b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "tcp", "--dport", "53", "-d", s + "/128",
                     "-j", "REDIRECT", "--to-ports", DNS_AGENT_PORT, family=6)
    if capture_all:
        b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "udp", "--dport", "53", "-j", "REDIRECT",
                 "--to-port", DNS_AGENT_PORT)
    else:
        for s in servers4:
            b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "udp", "--dport", "53", "-d", s + "/32",
                     "-j", "REDIRECT", "--to-port", DNS_AGENT_PORT, family=4)
        for s in servers6:
            b.append(ISTIO_OUTPUT_DNS, "nat", "-p", "udp", "--dport", "53", "-d", s + "/128",
                     "-j", "REDIRECT", "--to-port", DNS_AGENT_PORT, family=6)

    # Conntrack zones: proxy -> upstream resolvers in zone 1, proxy -> app replies in zone 2.
    for uid in uids:
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--dport", "53", "-m", "owner", "--uid-owner", uid,
                 "-j", "CT", "--zone", "1")
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--sport", DNS_AGENT_PORT, "-m", "owner",
                 "--uid-owner", uid, "-j", "CT", "--zone", "2")
    for gid in gids:
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--dport", "53", "-m", "owner", "--gid-owner", gid,
                 "-j", "CT", "--zone", "1")
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--sport", DNS_AGENT_PORT, "-m", "owner",
                 "--gid-owner", gid, "-j", "CT", "--zone", "2")
    if capture_all:
        b.append("PREROUTING", "raw", "-j", ISTIO_INBOUND)
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
        b.append(ISTIO_INBOUND, "raw", "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
    else:
        if servers4:
            b.append("PREROUTING", "raw", "-j", ISTIO_INBOUND, family=4)
        for s in servers4:
            b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--dport", "53", "-d", s + "/32",
                     "-j", "CT", "--zone", "2", family=4)
            b.append(ISTIO_INBOUND, "raw", "-p", "udp", "--sport", "53", "-s", s + "/32",
                     "-j", "CT", "--zone", "1", family=4)
        if servers6:
            b.append("PREROUTING", "raw", "-j", ISTIO_INBOUND, family=6)
        for s in servers6:
            b.append(ISTIO_OUTPUT_DNS, "raw", "-p", "udp", "--dport", "53", "-d", s + "/128",
                     "-j", "CT", "--zone", "2", family=6)
            b.append(ISTIO_INBOUND, "raw", "-p", "udp", "--sport", "53", "-s", s + "/128",
                     "-j", "CT", "--zone", "1", family=6)


def chains_of(rules):
    """{table: [user chain, ...]} in Istio's `-N` order: first use, then jump targets."""
    out = {}
    seen = set()
    for r in rules:
        if r.chain not in BUILTIN_CHAINS and (r.table, r.chain) not in seen:
            seen.add((r.table, r.chain))
            out.setdefault(r.table, []).append(r.chain)
    for r in rules:
        t = r.target
        if t and t.startswith(CHAIN_PREFIX) and (r.table, t) not in seen:
            seen.add((r.table, t))
            out.setdefault(r.table, []).append(t)
    return out


def to_restore(rules):
    """Istio's buildRestore: per table (sorted), `-N` lines then rule commands, then COMMIT."""
    chains = chains_of(rules)
    lines = []
    for table in sorted({r.table for r in rules}):
        lines.append(f"* {table}")
        lines += [f"-N {c}" for c in chains.get(table, [])]
        lines += [r.command() for r in rules if r.table == table]
        lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


def families(cfg):
    """The address families `cfg` produces rules for: (4,) or (4, 6)."""
    return (4, 6) if cfg.enable_ipv6 else (4,)


def render(cfg, family=4):
    """The `iptables-restore --noflush` payload for one family (4 or 6); '' if none."""
    family = int(family)
    if family not in FAMILIES:
        raise UsageError(f"family must be 4 or 6, got {family}")
    if family == 6 and not cfg.enable_ipv6:
        return ""
    return to_restore(build(cfg)[family])


def render_all(cfg):
    """{family: payload} for every family `cfg` enables."""
    rules = build(cfg)
    return {fam: to_restore(rules[fam]) for fam in families(cfg)}


def owner_group_names(cfg):
    """Owner-group entries that are names (not numbers): the ones the machine must resolve."""
    groups = list(cfg.resolved().owner_groups)
    return [g for g in groups if not g.isdigit()]
