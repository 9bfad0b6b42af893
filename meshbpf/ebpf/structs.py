"""The one Python mirror of bpf/lib/types.h, plus pure packing functions.

ctypes structures with the C layout of the header's structs (the core maps and the
inbound ones), the counter index enum, the flag constants, and pure functions that turn
an InterceptConfig or an inbound policy's fields into map keys and values (pod struct,
CIDR LPM keys, port keys, inbound_pods/inbound_ports/capture_listeners entries). No side
effects: nothing here touches the kernel, so tests/unit/test_ebpf_structs.py checks it
without root (and parses the header to make sure this mirror and the C agree).
"""

import ctypes
import ipaddress
import socket

from ..config import WILDCARD, parse_ids
from ..errors import UsageError
from ..istio import DNS_PORT

MB_MAX_IDS = 8
MB_MAX_PODS = 16384

POD_F_OUTBOUND_ALL = 1 << 0
POD_F_IPV6 = 1 << 1
POD_F_OWNER_INCLUDE = 1 << 2
POD_F_OWNER_EXCLUDE = 1 << 3
POD_F_DNS = 1 << 5
POD_F_DNS_ALL = 1 << 6
POD_F_LOOPBACK_INCLUDED = 1 << 7
POD_F_TPROXY = 1 << 8
POD_F_CGROUP_SCOPED = 1 << 9
MB_DNS_SCOPE = 0x80000000
MB_IPV6_SCOPE = 0x40000000      # IPv6 ranges apart from IPv4 ones (see bpf/lib/types.h)

RULE_INCLUDE = 1
RULE_EXCLUDE = 2

NODE_F_SPLICE = 1 << 0
NODE_F_INBOUND_SK_LOOKUP = 1 << 1
ORIG_F_ANSWERED = 1
ORIG_F_CONNECTED = 2

# enum mb_counter, in order (index = position); COUNTER_MAX slots in the per-CPU array.
COUNTERS = [
    "redirect_out",       # COUNTER_REDIRECT_OUT
    "redirect_in",        # COUNTER_REDIRECT_IN
    "orig_dst_answered",  # COUNTER_ORIG_DST_ANSWERED
    "orig_dst_miss",      # COUNTER_ORIG_DST_MISS
    "peername",           # COUNTER_PEERNAME
    "splice_msgs",        # COUNTER_SPLICE_MSGS
    "splice_bytes",       # COUNTER_SPLICE_BYTES
    "splice_miss",        # COUNTER_SPLICE_MISS
    "sockhash_add",       # COUNTER_SOCKHASH_ADD
    "bypass_proxy",       # COUNTER_BYPASS_PROXY
    "bypass_rule",        # COUNTER_BYPASS_RULE
    "closed",             # COUNTER_CLOSED
    "inbound_no_listener",  # COUNTER_INBOUND_NO_LISTENER
    "inbound_unsteerable",  # COUNTER_INBOUND_UNSTEERABLE
    "inbound_bypass",     # COUNTER_INBOUND_BYPASS
    "dns_redirect",       # COUNTER_DNS_REDIRECT
    "dns_reply",          # COUNTER_DNS_REPLY
    "redirect_self",      # COUNTER_REDIRECT_SELF
    "conn_refused",       # COUNTER_CONN_REFUSED
    "pairs_full",         # COUNTER_PAIRS_FULL
    "inbound_sk_lookup",  # COUNTER_INBOUND_SK_LOOKUP
    "splice_exit",        # COUNTER_SPLICE_EXIT
    "splice_reenter",     # COUNTER_SPLICE_REENTER
    "splice_tcp_bytes",   # COUNTER_SPLICE_TCP_BYTES
]
COUNTER_MAX = 32

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class PodConfig(ctypes.Structure):
    _fields_ = [
        ("proxy_port", u16),       # network order
        ("inbound_port", u16),     # network order
        ("flags", u32),
        ("pod_index", u32),
        ("n_uids", u32),
        ("n_gids", u32),
        ("n_owner_gids", u32),
        ("uids", u32 * MB_MAX_IDS),
        ("gids", u32 * MB_MAX_IDS),
        ("owner_gids", u32 * MB_MAX_IDS),
        ("dns_port", u16),         # network order
        ("tunnel_port", u16),      # network order
    ]


class CidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("pod_index", u32), ("ip", u8 * 16)]


class PortKey(ctypes.Structure):
    _fields_ = [("pod_index", u32), ("port", u16), ("pad", u16)]


class IpKey(ctypes.Structure):
    _fields_ = [("ip", u8 * 16)]


class NetnsAddrKey(ctypes.Structure):
    _fields_ = [("netns", u64), ("ip", u8 * 16)]


class NetnsSrc(ctypes.Structure):
    _fields_ = [("v4", u8 * 16), ("v6", u8 * 16), ("ll4", u8 * 16)]


class PodCgroup(ctypes.Structure):
    _fields_ = [("id", u64), ("level", u32), ("pad", u32)]


class NodeConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("splice_limit", u32), ("pod_conn_limit", u32), ("pad", u32)]


# Bytes one direction of a spliced pair may queue unread before it leaves the splice for
# TCP (docs/splice.md): of the order of one TCP receive buffer (tcp_rmem's max is 6 MiB).
SPLICE_LIMIT = 4 << 20


def node_config(splice, pod_conn_limit=0, inbound_sk_lookup=False,
                splice_limit=SPLICE_LIMIT):
    flags = ((NODE_F_SPLICE if splice else 0)
             | (NODE_F_INBOUND_SK_LOOKUP if inbound_sk_lookup else 0))
    return NodeConfig(flags=flags, splice_limit=splice_limit, pod_conn_limit=pod_conn_limit)


class OrigDst(ctypes.Structure):
    _fields_ = [("ip", u8 * 16), ("port", u16), ("family", u16), ("flags", u32)]


class SockKey(ctypes.Structure):
    _fields_ = [("netns", u64), ("local_ip", u8 * 16), ("remote_ip", u8 * 16),
                ("local_port", u16), ("remote_port", u16), ("pad", u32)]


class SpliceDir(ctypes.Structure):
    _fields_ = [("copied_seq", u32), ("spliced", u32), ("mode", u32), ("pad", u32)]


# ---- inbound (tc_inbound.c, sk_lookup.c): keyed by pod IP, node-unique ----------------------

INBOUND_POD_WILDCARD = 1        # ports without an inbound_ports entry are captured ('*')
INBOUND_POD_CAPTURES = 2        # the policy captures at least one port
INBOUND_POD_SK_LOOKUP = 4       # mb_sk_lookup is linked in this pod IP's netns
INBOUND_PORT_CAPTURE = 1
INBOUND_PORT_BYPASS = 2
MB_AF_INET = 2
MB_AF_INET6 = 10


class InboundPodKey(ctypes.Structure):
    _fields_ = [("ip", u8 * 16)]


class InboundPodVal(ctypes.Structure):
    _fields_ = [("capture_port", u16),  # network order
                ("flags", u16), ("pad", u32),
                ("owner", u64)]         # netns cookie of the pod that wrote it


class InboundPortKey(ctypes.Structure):
    _fields_ = [("ip", u8 * 16), ("port", u16), ("pad", u16)]   # port: network order


class InboundIfaceVal(ctypes.Structure):
    _fields_ = [("ip", u8 * 16), ("netns", u64)]


class InboundTwKey(ctypes.Structure):
    _fields_ = [("local_ip", u8 * 16), ("remote_ip", u8 * 16),
                ("local_port", u16), ("remote_port", u16)]      # network order


class CaptureListenerKey(ctypes.Structure):
    _fields_ = [("netns", u64), ("port", u16),  # port: network order
                ("family", u16), ("pad", u32)]


# ---- trace events (bpf/lib/trace.h; rule codes MB_WHY_* in bpf/lib/policy.h) ------------
MB_TRACE_OUT = 1
MB_TRACE_IN = 2
MB_TRACE_REDIRECTED = 1
MB_TRACE_BYPASSED = 2
MB_TRACE_REFUSED = 3
MB_TRACE_DROPPED = 4
TRACE_DIRECTIONS = {MB_TRACE_OUT: "out", MB_TRACE_IN: "in"}
TRACE_VERDICTS = {MB_TRACE_REDIRECTED: "redirected", MB_TRACE_BYPASSED: "bypassed",
                  MB_TRACE_REFUSED: "refused", MB_TRACE_DROPPED: "dropped"}
# MB_WHY_* code -> (name, what it means); the name is the C one without MB_WHY_, lowercased
TRACE_RULES = {
    1: ("excluded_port", "outbound_ports_exclude"),
    2: ("passthrough", "from 127.0.0.6 / ::6 over lo (inbound passthrough)"),
    3: ("proxy_id", "the proxy's own uid/gid"),
    4: ("lo_other_id", "another uid/gid over lo (Istio's `! --uid-owner` RETURN)"),
    5: ("owner_group", "owner_groups_include / owner_groups_exclude"),
    6: ("dns", "port 53 to a captured DNS server"),
    7: ("udp", "UDP other than captured DNS"),
    8: ("loopback_dst", "destination 127.0.0.1 / ::1"),
    9: ("excluded_cidr", "outbound_ip_ranges_exclude"),
    10: ("included_port", "outbound_ports_include"),
    11: ("included_cidr", "outbound_ip_ranges_include"),
    12: ("include_all", "outbound_ip_ranges_include '*'"),
    13: ("not_included", "no include range or port matched"),
    14: ("proxy_to_pod", "the proxy dialling its own pod: inbound listener"),
    15: ("tproxy_inbound", "TPROXY: a proxy connect to a captured inbound port"),
    16: ("ipv6_off", "IPv6 destination without enable_ipv6"),
    17: ("map_full", "no room to record the connection: refused"),
    # inbound (bpf/lib/inbound.h)
    18: ("in_included_port", "inbound_ports_include"),
    19: ("in_include_all", "inbound_ports_include '*'"),
    20: ("in_excluded_port", "inbound_ports_exclude (or a port Istio always excludes)"),
    21: ("in_not_included", "not in inbound_ports_include"),
    22: ("not_meshed", "the destination is no enrolled pod's"),
    23: ("no_listener", "the sidecar's inbound listener is not up: SYN dropped"),
}


class TraceEvent(ctypes.Structure):
    _fields_ = [("netns", u64), ("time_ns", u64), ("pod_index", u32), ("uid", u32),
                ("gid", u32), ("ip", u32 * 4),
                ("port", u16), ("family", u16), ("to_port", u16),   # ports: network order
                ("direction", ctypes.c_uint8), ("verdict", ctypes.c_uint8),
                ("rule", ctypes.c_uint8), ("proto", ctypes.c_uint8), ("pad", u16)]


# C struct name -> ctypes mirror (checked against the header by the unit tests)
MIRRORS = {
    "pod_config": PodConfig,
    "cidr_key": CidrKey,
    "port_key": PortKey,
    "ip_key": IpKey,
    "netns_addr_key": NetnsAddrKey,
    "netns_src": NetnsSrc,
    "pod_cgroup": PodCgroup,
    "node_config": NodeConfig,
    "orig_dst": OrigDst,
    "splice_dir": SpliceDir,
    "sock_key": SockKey,
    "inbound_pod_key": InboundPodKey,
    "inbound_pod_val": InboundPodVal,
    "inbound_port_key": InboundPortKey,
    "inbound_iface_val": InboundIfaceVal,
    "inbound_tw_key": InboundTwKey,
    "capture_listener_key": CaptureListenerKey,
    "trace_event": TraceEvent,
}

U32 = u32
U64 = u64


# ---- pure packing -------------------------------------------------------------------------

def htons(port):
    return socket.htons(int(port))


def ntohs(port):
    return socket.ntohs(int(port))


def ip16(addr):
    """16 bytes of an address, IPv4 as v4-mapped (what every map key holds)."""
    ip = ipaddress.ip_address(addr) if not isinstance(addr, (ipaddress.IPv4Address,
                                                             ipaddress.IPv6Address)) else addr
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def ip_from16(raw):
    """Inverse of ip16: an IPv4Address for v4-mapped bytes, else IPv6Address."""
    ip = ipaddress.IPv6Address(bytes(raw))
    return ip.ipv4_mapped or ip


def _fill(arr, values):
    for i, v in enumerate(values):
        arr[i] = v


def _ids(values, field):
    if len(values) > MB_MAX_IDS:
        raise UsageError(f"{field}: at most {MB_MAX_IDS} ids are supported in eBPF mode, "
                         f"got {len(values)}")
    return values


def owner_groups(config):
    """(flag, gids) for Istio's owner_groups_include / owner_groups_exclude."""
    r = config.resolved()
    if not r.owner_groups:
        return 0, []
    field = "owner_groups_exclude" if r.owner_groups_except else "owner_groups_include"
    flag = POD_F_OWNER_EXCLUDE if r.owner_groups_except else POD_F_OWNER_INCLUDE
    return flag, _ids(parse_ids(list(r.owner_groups), f"{field}_gid"), field)


def loopback_included(config):
    """Istio's loopback_included: an outbound include range written as a loopback address
    (the address as given, e.g. 127.0.0.1/8); Istio then omits its `-o lo` RETURN rules."""
    inc = config.resolved().outbound_include
    return not inc.wildcard and any(i.ip.is_loopback for i in inc.given)


def netns_addr_key(netns_cookie, addr):
    k = NetnsAddrKey(netns=netns_cookie)
    k.ip[:] = list(ip16(addr))
    return k


def netns_src(addresses, local=()):
    """The pod's source address per family (the first non-link-local, non-loopback one of
    `addresses`), and the first IPv4 link-local address of `addresses` + `local` (all of
    the netns's addresses): the kernel's source for a 169.254/16 destination."""
    v = NetnsSrc()
    for a in addresses:
        a = ipaddress.ip_address(a)
        if a.is_link_local or a.is_loopback:
            continue
        field = v.v4 if a.version == 4 else v.v6
        if not any(field):
            field[:] = list(ip16(a))
    for a in list(addresses) + list(local):
        a = ipaddress.ip_address(a)
        if a.version == 4 and a.is_link_local and not any(v.ll4):
            v.ll4[:] = list(ip16(a))
    return v


def pod_struct(config, pod_index, idmap=None):
    """The pods-map value for `config` (an InterceptConfig). `idmap` (meshbpf.userns.IdMap):
    the pod's user namespace; its proxy uid/gid and owner groups are stored as the host ids
    they map to, which is what bpf_get_current_uid_gid() answers."""
    uids = _ids(config.proxy_uids(), "proxy_uid")
    gids = _ids(config.proxy_gids(), "proxy_gid")
    flags = 0
    inc, _ = config.outbound_cidrs()
    if inc == WILDCARD:
        flags |= POD_F_OUTBOUND_ALL
    if config.enable_ipv6:
        flags |= POD_F_IPV6
    oflag, ogids = owner_groups(config)
    flags |= oflag
    if idmap is not None:
        uids, gids, ogids = idmap.host_uids(uids), idmap.host_gids(gids), idmap.host_gids(ogids)
    if loopback_included(config):
        flags |= POD_F_LOOPBACK_INCLUDED
    if config.inbound_interception_mode == "TPROXY":
        flags |= POD_F_TPROXY
    # Istio turns redirect_dns off when there is nothing to capture (no server, not all):
    # its lo rules then take no DNS shape either.
    if config.redirect_dns and (config.capture_all_dns or config.dns_servers_v4 or
                                config.dns_servers_v6):
        flags |= POD_F_DNS
        if config.capture_all_dns:
            flags |= POD_F_DNS_ALL
    pc = PodConfig(proxy_port=htons(config.proxy_port),
                   inbound_port=htons(config.inbound_capture_port),
                   flags=flags, pod_index=pod_index, n_uids=len(uids), n_gids=len(gids),
                   n_owner_gids=len(ogids), dns_port=htons(DNS_PORT),
                   tunnel_port=htons(config.inbound_tunnel_port))
    _fill(pc.uids, uids)
    _fill(pc.gids, gids)
    _fill(pc.owner_gids, ogids)
    return pc


def cidr_key(pod_index, network):
    """LPM key for `network` (ip_network) in pod `pod_index`'s scope; an IPv6 range goes to
    the scope's IPv6 half (| MB_IPV6_SCOPE), so that it never contains an IPv4 address."""
    net = ipaddress.ip_network(network, strict=False)
    plen = net.prefixlen + (96 if net.version == 4 else 0)
    scope = pod_index if net.version == 4 else pod_index | MB_IPV6_SCOPE
    key = CidrKey(prefixlen=32 + plen, pod_index=scope)
    key.ip[:] = list(ip16(net.network_address))
    return key


def cidr_lookup_key(pod_index, addr):
    """The key connect4/6 and sendmsg4/6 look a destination up with (mb_cidr_scope): the
    full 32 + 128 bits, IPv4 as v4-mapped in the plain scope, IPv6 in the IPv6 scope."""
    ip = ipaddress.ip_address(addr)
    mapped = ip.version == 4 or ip.ipv4_mapped is not None
    key = CidrKey(prefixlen=32 + 128, pod_index=pod_index if mapped else pod_index | MB_IPV6_SCOPE)
    key.ip[:] = list(ip16(ip))
    return key


def describe_cidr_key(key):
    """(pod_index, dns_server, ip_network) of a cidr_rules key (inverse of cidr_key)."""
    plen = key.prefixlen - 32
    if key.pod_index & MB_IPV6_SCOPE:
        net = ipaddress.IPv6Network((bytes(key.ip), plen))
    else:
        net = ipaddress.IPv4Network((bytes(key.ip)[12:], plen - 96))
    return key.pod_index & ~(MB_DNS_SCOPE | MB_IPV6_SCOPE), bool(key.pod_index & MB_DNS_SCOPE), net


def _contains(outer, inner):
    return outer.version == inner.version and inner.subnet_of(outer)


def cidr_rules(config, extra_excludes=()):
    """[(ip_network, RULE_*)] for the pod's cidr_rules, Istio's "exclude wins" resolved.

    The LPM trie answers with the longest matching prefix; Istio checks every exclude before
    any include. They agree once an include range lying inside an exclude range is stored
    as an exclude (if a longer include matched, any exclude containing the address contains
    that include too). `extra_excludes`: the pod's own addresses (host_ipv4_loopback_cidr
    is always excluded, as Istio's `-d 127.0.0.1/32 -j RETURN`).
    """
    inc, exc = config.outbound_cidrs()
    excludes = list(exc) + [ipaddress.ip_network(config.host_ipv4_loopback_cidr, strict=False)]
    excludes += [ipaddress.ip_network(e, strict=False) for e in extra_excludes]
    rules = {}
    for net in excludes:
        rules[net] = RULE_EXCLUDE
    if inc != WILDCARD:
        for net in inc:
            if net in rules:
                continue
            rules[net] = RULE_EXCLUDE if any(_contains(e, net) for e in excludes) else RULE_INCLUDE
    return sorted(rules.items(), key=lambda kv: (kv[0].version, kv[0]))


def dns_rules(config):
    """[(ip_network, RULE_INCLUDE)] of the DNS servers whose port-53 traffic is captured
    (scope pod_index | MB_DNS_SCOPE); empty unless redirect_dns without capture_all_dns."""
    if not config.redirect_dns or config.capture_all_dns:
        return []
    r = config.resolved()
    out = {(ipaddress.ip_network(ip), RULE_INCLUDE) for ip in r.dns_v4 + r.dns_v6}
    return sorted(out, key=lambda kv: (kv[0].version, kv[0]))


def scopes(pod_index):
    """The cidr_rules scopes a pod owns: its outbound rules and its DNS servers, each with
    an IPv4 and an IPv6 half."""
    return {pod_index | dns | v6 for dns in (0, MB_DNS_SCOPE) for v6 in (0, MB_IPV6_SCOPE)}


def port_rules(config):
    """[(port, RULE_*)]: outbound_ports_exclude wins over outbound_ports_include."""
    inc, exc = config.outbound_ports()
    rules = {}
    if inc != WILDCARD:
        for p in inc:
            rules[p] = RULE_INCLUDE
    if exc != WILDCARD:
        for p in exc:
            rules[p] = RULE_EXCLUDE
    return sorted(rules.items())


def port_key(pod_index, port):
    return PortKey(pod_index=pod_index, port=htons(port))


def ip_key(addr):
    k = IpKey()
    k.ip[:] = list(ip16(addr))
    return k


def u32_bytes(v):
    return bytes(U32(v))


def u64_bytes(v):
    return bytes(U64(v))


def from_bytes(cls, raw):
    """A ctypes struct of type `cls` from (at least) its size of raw bytes."""
    return cls.from_buffer_copy(bytes(raw)[:ctypes.sizeof(cls)])


def describe_pod_struct(pc):
    """A JSON-able view of a PodConfig (status)."""
    return {
        "proxy_port": ntohs(pc.proxy_port), "inbound_port": ntohs(pc.inbound_port),
        "flags": pc.flags, "pod_index": pc.pod_index,
        "uids": list(pc.uids[:pc.n_uids]), "gids": list(pc.gids[:pc.n_gids]),
        "owner_gids": list(pc.owner_gids[:pc.n_owner_gids]),
        "dns_port": ntohs(pc.dns_port), "tunnel_port": ntohs(pc.tunnel_port),
    }


# ---- inbound packing (map keys and values as bytes, as bpfsys takes them) -------------------

def inbound_pod_key(addr):
    k = InboundPodKey()
    k.ip[:] = list(ip16(addr))
    return bytes(k)


def inbound_pod_val(capture_port, flags, owner=0):
    return bytes(InboundPodVal(capture_port=htons(capture_port), flags=flags, owner=owner))


def inbound_port_key(addr, port):
    k = InboundPortKey(port=htons(port))
    k.ip[:] = list(ip16(addr))
    return bytes(k)


def decode_inbound_port_key(raw):
    """(address, port) of an inbound_ports key."""
    k = from_bytes(InboundPortKey, raw)
    return ip_from16(k.ip), ntohs(k.port)


def inbound_iface_val(pod_key, netns_cookie):
    """inbound_ifaces value: one of the pod's inbound_pods keys (16 bytes) and its netns."""
    v = InboundIfaceVal(netns=netns_cookie)
    v.ip[:] = list(bytes(pod_key))
    return bytes(v)


def capture_listener_key(netns_cookie, port, family):
    return bytes(CaptureListenerKey(netns=netns_cookie, port=htons(port), family=family))


def decode_capture_listener_key(raw):
    """(netns cookie, port, family) of a capture_listeners key."""
    k = from_bytes(CaptureListenerKey, raw)
    return k.netns, ntohs(k.port), k.family


# ---- a pod's entries, as the eBPF backend writes and records them ----------------------

# The maps a pod's enrollment writes, in write order: rules (scoped by pod index, unread
# until the `pods` entry points at the index) first, the `pods` entry last.
ENTRY_MAPS = ("cidr_rules", "port_rules", "local_ips", "netns_addrs", "netns_src", "pod_cgroups",
              "netns_ino", "pods")
RULE_MAPS = ("cidr_rules", "port_rules")
# Keys not scoped by the pod index: an update overwrites them in place, so their old
# values are kept to roll back.
SHARED_ENTRY_MAPS = ("local_ips", "netns_addrs", "netns_src", "pod_cgroups", "netns_ino", "pods")


def pod_rules(config):
    """The rules a config gives, whatever the pod index: (CIDR, DNS, port) rules. Two
    configs with equal rules need no new rule generation."""
    return tuple(cidr_rules(config)), tuple(dns_rules(config)), tuple(port_rules(config))


def pod_entries(netns_cookie, pod_index, pc, rules, addresses, local, cgroup=None,
                netns_ino=None):
    """{map name: {key bytes: value bytes}}: every entry a pod with `rules` (pod_rules),
    pods value `pc`, own `addresses` and netns addresses `local` has under `pod_index`;
    a host workload's `cgroup` ((id, level), see pod_cgroup) scopes it (POD_F_CGROUP_SCOPED);
    with `netns_ino` (its netns's inode number) the netns_ino entry sock_ops and sk_msg find
    the cookie by on kernels without bpf_get_netns_cookie there."""
    cidrs, dns, ports = rules
    out = {name: {} for name in ENTRY_MAPS}
    for net, rule in cidrs:
        out["cidr_rules"][bytes(cidr_key(pod_index, net))] = u32_bytes(rule)
    for net, rule in dns:
        out["cidr_rules"][bytes(cidr_key(pod_index | MB_DNS_SCOPE, net))] = u32_bytes(rule)
    for port, rule in ports:
        out["port_rules"][bytes(port_key(pod_index, port))] = u32_bytes(rule)
    for a in addresses:
        out["local_ips"][bytes(ip_key(a))] = u32_bytes(pod_index)
    for a in local:
        out["netns_addrs"][bytes(netns_addr_key(netns_cookie, a))] = u32_bytes(pod_index)
    out["netns_src"][u64_bytes(netns_cookie)] = bytes(netns_src(addresses, local))
    if cgroup is not None:
        pc.flags |= POD_F_CGROUP_SCOPED
        out["pod_cgroups"][u64_bytes(netns_cookie)] = bytes(PodCgroup(id=cgroup[0],
                                                                      level=cgroup[1]))
    if netns_ino is not None:
        out["netns_ino"][u32_bytes(netns_ino)] = u64_bytes(netns_cookie)
    out["pods"][u64_bytes(netns_cookie)] = bytes(pc)
    return out


def cgroup_level(path, mount):
    """Pure: the depth of cgroup directory `path` below the cgroup2 `mount` (0: the root),
    what bpf_get_current_ancestor_cgroup_id takes."""
    root, path = mount.rstrip("/"), path.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        raise UsageError(f"{path} is not under the cgroup2 mount {mount}")
    rel = path[len(root):].strip("/")
    return len(rel.split("/")) if rel else 0
