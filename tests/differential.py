"""The differential suite's pure part (no root, no kernel): what is run and how it is judged.

eBPF mode must capture exactly what Istio's rules capture; iptables mode (Istio's rules
byte for byte) is the oracle. tests/kernel/test_differential.py runs every TRAFFIC item
under every CONFIGS entry in both modes on the same sandbox pods and compares the two
verdicts built here:

    outcome    ok, ECONNREFUSED, timeout, ...
    seen       which listener accepted it: "a:15001" (pod a's outbound listener),
               "a:15006", "a:15053", "b:8080" (the real destination), ...
    orig       what SO_ORIGINAL_DST answered on the listener's accepted socket
    lpeer      the peer address the listener's accepted socket shows (port dropped)
    app_peer   what the app's getpeername() (recvfrom() for unconnected UDP) showed
    app_local  the address of the app's getsockname() (port dropped: ephemeral)
    up.*       the same for the hop a probe 15001 listener dials (the sidecar's upstream)

Addresses are written as the sandbox's symbols (a4 = pod a's IPv4, bll6 = pod b's IPv6
link-local, lo4 = 127.0.0.1, lox4 = 127.0.0.2, ...), so a verdict reads the same in every run.

`known_differences` names the differences that remain today (issue 9 items other work is
fixing, and NEW ones this suite found): a case they explain is marked xfail(strict) with
the item, and only a difference confined to that item's verdict fields counts as the
expected failure; any other difference fails the case. docs/differences.md is the table.
"""

import dataclasses
import ipaddress

APP_PORT = 8080
OTHER_PORT = 9090
EXCLUDED_INBOUND_PORT = 15021     # in Istio's default inbound_ports_exclude
DNS_PORT = 53
OUTBOUND, INBOUND, DNS_LISTENER = 15001, 15006, 15053
TCP_PORTS = (APP_PORT, OTHER_PORT, DNS_PORT, EXCLUDED_INBOUND_PORT, OUTBOUND, INBOUND, DNS_LISTENER)
UDP_PORTS = (DNS_PORT, DNS_LISTENER)
FORWARD_PORTS = (OUTBOUND,)

# Who runs the probes: (uid, gid). gid1337 is not the proxy uid but has the proxy gid.
IDENTITIES = {
    "app": (0, 0),
    "app1000": (1000, 1000),
    "proxy": (1337, 1337),
    "gid1337": (2000, 1337),
}

# Addresses the sandbox adds for the link-local and later-added cases.
LINK_LOCAL = {"a": ("169.254.20.1", "fe80::a1"), "b": ("169.254.20.2", "fe80::b1"),
              "c": ("169.254.20.3", "fe80::c1")}
LATE = ("10.233.250.1", "fd00:6d62::250")   # added to pod a after attach, removed before detach


@dataclasses.dataclass(frozen=True)
class Traffic:
    src: str            # pod the client runs in: a (under test), c (unmeshed), m (meshed)
    who: str            # IDENTITIES key
    proto: str          # tcp, udp (unconnected sendto), udpc (connect + send)
    dst: str            # address symbol
    port: int

    @property
    def id(self):
        return f"{self.src}.{self.who}-{self.proto}-{self.dst}-{self.port}"

    @property
    def family(self):
        return 6 if self.dst.endswith("6") else 4


def _traffic():
    out = []
    for who in IDENTITIES:
        for fam in ("4", "6"):
            for dst, port in (("b", APP_PORT), ("b", OTHER_PORT), ("b", DNS_PORT),
                              ("a", APP_PORT), ("lo", APP_PORT), ("bll", APP_PORT),
                              ("all", APP_PORT), ("late", APP_PORT), ("m", APP_PORT)):
                out.append(Traffic("a", who, "tcp", dst + fam, port))
            for proto in ("udp", "udpc"):
                out.append(Traffic("a", who, proto, "b" + fam, DNS_PORT))
        out.append(Traffic("a", who, "tcp", "lox4", APP_PORT))   # loopback, not 127.0.0.1
    for fam in ("4", "6"):
        for dst, port in (("a", APP_PORT), ("a", OTHER_PORT), ("a", EXCLUDED_INBOUND_PORT),
                          ("a", OUTBOUND), ("all", APP_PORT), ("late", APP_PORT)):
            out.append(Traffic("c", "app", "tcp", dst + fam, port))
        for who in ("app", "proxy"):            # meshed: through m's sidecar, or as it
            out.append(Traffic("m", who, "tcp", "a" + fam, APP_PORT))
    return out


TRAFFIC = _traffic()

# Configs of pod a, as InterceptConfig fields; "{b4}" etc. are filled from the sandbox.
# Pod m (the meshed peer) always has the default config.
CONFIGS = {
    "default": {},
    "exclude-b4": {"outbound_ip_ranges_exclude": "{b4}/32"},
    "exclude-b6": {"outbound_ip_ranges_exclude": "{b6}/128"},
    "exclude-v4-all": {"outbound_ip_ranges_exclude": "0.0.0.0/0"},
    "exclude-v6-all": {"outbound_ip_ranges_exclude": "::/0"},
    "include-b4": {"outbound_ip_ranges_include": "{b4}/32"},
    "include-v4-all": {"outbound_ip_ranges_include": "0.0.0.0/0"},
    "include-v6-all": {"outbound_ip_ranges_include": "::/0"},
    "include-v6-pods": {"outbound_ip_ranges_include": "fd00:6d62::/64"},
    "include-none": {"outbound_ip_ranges_include": ""},
    "out-ports-exclude": {"outbound_ports_exclude": str(APP_PORT)},
    "out-ports-include": {"outbound_ip_ranges_include": "", "outbound_ports_include": str(OTHER_PORT)},
    "in-ports-include": {"inbound_ports_include": str(APP_PORT)},
    "in-ports-exclude": {"inbound_ports_exclude": str(APP_PORT)},
    "in-ports-none": {"inbound_ports_include": ""},
    "inbound-tproxy": {"inbound_interception_mode": "TPROXY"},
    "proxy-ids-1000": {"proxy_uid": "1000", "proxy_gid": "1000"},
    "proxy-gid-1000": {"proxy_uid": "1337", "proxy_gid": "1000"},
    "owner-exclude": {"owner_groups_exclude": "1000"},
    "owner-include": {"owner_groups_include": "1000"},
    "include-loopback": {"outbound_ip_ranges_include": "127.0.0.0/8,10.233.0.0/16"},
    "include-pods": {"outbound_ip_ranges_include": "10.233.0.0/16,fd00:6d62::/64"},
    "exclude-link-local": {"outbound_ip_ranges_exclude": "169.254.0.0/16,fe80::/10"},
    "proxy-uids-two": {"proxy_uid": "1337,1000", "proxy_gid": "1337"},
    "dns-servers": {"redirect_dns": True, "dns_servers_v4": "{b4}", "dns_servers_v6": "{b6}"},
    "dns-servers-v6": {"redirect_dns": True, "dns_servers_v6": "{b6}"},
    "dns-all": {"redirect_dns": True, "capture_all_dns": True},
    "dns-all-ports-exclude": {"redirect_dns": True, "capture_all_dns": True,
                              "outbound_ports_exclude": str(DNS_PORT)},
    "dns-all-owner-exclude": {"redirect_dns": True, "capture_all_dns": True,
                              "owner_groups_exclude": "1000"},
    "dns-all-include-none": {"redirect_dns": True, "capture_all_dns": True,
                             "outbound_ip_ranges_include": ""},
}


def resolve_config(name, symbols):
    """CONFIGS[name] with "{b4}"-style placeholders replaced by the sandbox's addresses."""
    return {k: v.format(**symbols) if isinstance(v, str) else v
            for k, v in CONFIGS[name].items()}


def probe_host(traffic, addresses):
    """The address a client dials for `traffic` (link-local IPv6 with its interface)."""
    host = addresses[traffic.dst]
    if traffic.family == 6 and ipaddress.ip_address(host).is_link_local:
        host += "%eth0"
    return host


# ---- verdicts ------------------------------------------------------------------------------

def _plain(addr):
    """An address as written in a verdict's comparison: v4-mapped and scope id dropped."""
    addr = str(addr).split("%", 1)[0]
    if addr.lower().startswith("::ffff:") and "." in addr:
        addr = addr[7:]
    return addr


def symbolize(addr, names):
    """`names` maps plain address -> symbol; unknown addresses stay as they are."""
    plain = _plain(addr)
    return names.get(plain, plain)


def _endpoint(value, names, port=True):
    if not isinstance(value, list):
        return value            # None, or "error:ENOENT"
    sym = symbolize(value[0], names)
    return f"{sym}:{value[1]}" if port else sym


def _hop(rec, names, prefix=""):
    out = {}
    if not rec:
        out[prefix + "seen"] = None
        return out
    out[prefix + "outcome"] = rec.get("outcome")
    out[prefix + "seen"] = f"{rec['pod']}:{rec['port']}" if "pod" in rec else None
    if rec.get("outcome") != "ok":
        return out
    out[prefix + "orig"] = _endpoint(rec.get("orig"), names)
    out[prefix + "lpeer"] = _endpoint(rec.get("peer"), names, port=False)
    if "up" in rec:
        out.update(_hop(rec["up"], names, prefix + "up."))
    return out


def verdict(raw, names):
    """A probe client's raw result as a flat verdict dict (see the module docstring)."""
    out = {"outcome": raw["outcome"],
           "app_peer": _endpoint(raw.get("app_peer"), names),
           "app_local": _endpoint(raw.get("app_local"), names, port=False)}
    rec = raw.get("rec")
    out.update(_hop(rec, names))
    if rec:
        out["outcome"] = raw["outcome"] if rec.get("outcome") == "ok" else rec.get("outcome")
    return out


def differing_fields(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def render(v):
    return ", ".join(f"{k}={v[k]}" for k in sorted(v))


# ---- known differences (issue 9), each fixed by other work ----------------------------------
#
# Each rule names the cases it explains from the config, the traffic and the ORACLE's verdict
# (what Istio's rules did), never from the eBPF verdict; and the verdict fields the
# difference may touch. Where a rule needs to know whether today's eBPF programs redirect a
# connect, `_ebpf_captures` models their outbound decision (bpf/lib/policy.h
# mb_should_capture) as it is today, item 2 included. When a fix merges, its rule goes (the
# cases then pass, or XPASS strictly, which says to drop the rule).

ALL_FIELDS = "*"


@dataclasses.dataclass(frozen=True)
class Known:
    item: str           # "issue 9 item N" or "NEW"
    reason: str
    fields: object      # tuple of verdict fields it may change, or ALL_FIELDS

    def covers(self, field):
        return self.fields == ALL_FIELDS or field in self.fields

    @property
    def label(self):
        return f"{self.item}: {self.reason}"


ITEM1 = Known("issue 9 item 1", "eBPF mode does not add ::6 to the pod's lo: Envoy's IPv6 "
              "inbound passthrough cannot bind it and loops back into 15006", ALL_FIELDS)
ITEM2 = Known("issue 9 item 2", "an IPv6 range of prefix <= 96 (::/0) also matches IPv4 "
              "destinations in eBPF mode", ALL_FIELDS)
ITEM3 = Known("issue 9 item 3", "DNS on a connected UDP socket (connect + send) is not "
              "redirected in eBPF mode", ALL_FIELDS)
ITEM8 = Known("issue 9 item 8", "inbound to a link-local address or one added after attach "
              "reaches the app directly in eBPF mode", ALL_FIELDS)
ITEM10_PROXY_LOCAL = Known("issue 9 item 10", "the proxy's connects to a local address that is "
                           "not a pod address (link-local, added after attach, 127.0.0.2) are "
                           "not sent to the inbound listener in eBPF mode", ALL_FIELDS)
ITEM10_DNS = Known("issue 9 item 10", "DNS redirection ignores outbound port excludes and owner "
                   "groups in eBPF mode", ALL_FIELDS)
ITEM10_SOCKNAME = Known("issue 9 item 10", "a redirected app's getsockname() shows 127.0.0.1/::1, "
                        "not its pod address", ("app_local",))
NEW_LISTENER_PEER = Known("NEW", "the sidecar's accepted socket shows a redirected app at "
                          "127.0.0.1/::1, not at its pod address (Envoy's downstream remote "
                          "address)", ("lpeer",))
NEW_APP_LOCAL_DEST = Known("NEW", "the app's connects to its own pod's other local addresses "
                           "(link-local, added after attach) are redirected to 15001 in eBPF "
                           "mode; Istio leaves every non-proxy connection over lo alone",
                           ALL_FIELDS)
NEW_LOOPBACK = Known("NEW", "an included range that merely contains a loopback address "
                     "(0.0.0.0/0, ::/0) captures the app's connects to it (127.0.0.2, ::1) in "
                     "eBPF mode; Istio counts an include as loopback only when its address is "
                     "one (has_loopback), else `-o lo ! --uid-owner RETURN` and "
                     "`-d ::1/128 RETURN` leave them alone", ALL_FIELDS)
NEW_PROXY_SELF = Known("NEW", "a proxy id other than the first proxy uid (a second uid, or "
                       "a proxy gid only) dialling its own pod address: Istio sends it direct "
                       "(the first uid's `-o lo -m owner ! --uid-owner <first> -j RETURN` comes "
                       "first), eBPF mode to the inbound listener", ALL_FIELDS)
NEW_OWN_POD_INCLUDED = Known("NEW", "with an include range whose address is loopback "
                             "(127.0.0.0/8), Istio drops `-o lo ! --uid-owner RETURN`: the app's "
                             "connects to its own pod address go to 15001 when an include covers "
                             "it; eBPF mode always leaves the pod's own addresses alone",
                             ALL_FIELDS)
NEW_INBOUND_OWN_PORTS = Known("NEW", "eBPF mode never captures inbound connections to the "
                              "sidecar's own ports (15001, 15006, 15020, 15021, 15090) unless "
                              "listed; Istio captures every port not in "
                              "inbound_ports_exclude (and 15008)", ALL_FIELDS)
NEW_LINK_LOCAL6 = Known("NEW", "TCP to an IPv6 link-local address: Istio's REDIRECT (to ::1) "
                        "never connects (timeout); eBPF mode connects", ALL_FIELDS)

LATE_SYMBOLS = ("late4", "late6")
NEW_LATE_SOURCE = Known("NEW", "the kernel's source selection picked an address added to the pod "
                        "after attach (the IPv6 one, on the pod's prefix, wins RFC 6724's tie): "
                        "Istio's REDIRECT keeps that source; eBPF mode binds the redirected "
                        "socket to the address recorded at attach (a cgroup hook has no route "
                        "lookup)", ("app_local", "lpeer"))
NEW_LATE_LOCAL = Known("NEW", "a connect to an address added to the pod after attach: it "
                       "leaves through lo, so Istio sends the proxy to the inbound listener and "
                       "leaves the app alone (`-o lo ! --uid-owner RETURN`); eBPF mode treats "
                       "it as remote (the pod's own addresses are recorded at attach; a cgroup "
                       "hook has no locality test): the proxy direct, the app to 15001",
                       ALL_FIELDS)

NEW_LINK_LOCAL6_PEER = Known("NEW", "a proxy id's connect to its pod's own IPv6 link-local "
                             "address that reaches the inbound listener (TPROXY keeps the "
                             "destination): the listener sees it at ::1 in eBPF mode; binding "
                             "fe80:: needs its interface and would tie the socket to it, which "
                             "the redirect to ::1 cannot leave through", ("lpeer",))

# The differences that remain today. When a fix merges, remove its item here: its cases
# must then pass (a strict xfail that passes fails, saying exactly this), and the model of
# today's eBPF decision below stops reproducing it (item 2).
OPEN = {NEW_LISTENER_PEER, NEW_LINK_LOCAL6, NEW_LATE_SOURCE, NEW_LATE_LOCAL, NEW_LINK_LOCAL6_PEER}

OWN_NON_POD = ("all4", "all6", "late4", "late6")   # pod a's local addresses that are not pod IPs
OWN_POD = ("a4", "a6")
LOOPBACK = ("lo4", "lo6", "lox4")
SIDECAR_PORTS = (15001, 15006, 15008, 15020, 15021, 15090)


def _split(value):
    return [x.strip() for x in str(value or "").split(",") if x.strip()]


def _nets(value):
    return [ipaddress.ip_network(x, strict=False) for x in _split(value) if x != "*"]


def _v6_nets(value):
    return [n for n in _nets(value) if n.version == 6]


def _covers_v4(net):
    """An IPv6 range the eBPF key form also matches IPv4 destinations with (::ffff:0:0/96)."""
    return net.prefixlen <= 96 and ipaddress.ip_address("::ffff:0:0") in net


def _mapped(net):
    """`net` in the eBPF maps' key space. While item 2 is open both families share one
    16-byte space (IPv4 as ::ffff:a.b.c.d/96+n), so an IPv6 range can hold IPv4 keys;
    without it the families stay apart."""
    if net.version == 6:
        return net if ITEM2 in OPEN else ("6", net)
    return ipaddress.ip_network(f"::ffff:{net.network_address}/{96 + net.prefixlen}")


def _key(addr):
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return ipaddress.ip_address(f"::ffff:{ip}")
    return ip if ITEM2 in OPEN else ("6", ip)


def _in(key, net):
    if isinstance(net, tuple) or isinstance(key, tuple):
        return isinstance(net, tuple) and isinstance(key, tuple) and key[1] in net[1]
    return key in net


def _plen(net):
    return net[1].prefixlen if isinstance(net, tuple) else net.prefixlen


def _subnet(inner, outer):
    if isinstance(inner, tuple) or isinstance(outer, tuple):
        return isinstance(inner, tuple) and isinstance(outer, tuple) and inner[1].subnet_of(outer[1])
    return inner.version == outer.version and inner.subnet_of(outer)


def _identity(config, who):
    uid, gid = IDENTITIES[who]
    uids = [int(x) for x in _split(config.get("proxy_uid", "1337"))]
    gids = [int(x) for x in _split(config.get("proxy_gid", "1337"))]
    return uid in uids, gid in gids


def _owner_bypass(config, who):
    gid = IDENTITIES[who][1]
    inc = _split(config.get("owner_groups_include", "*"))
    exc = _split(config.get("owner_groups_exclude", ""))
    if inc and inc != ["*"] and str(gid) not in inc:
        return True
    return str(gid) in exc


def _ebpf_captures(config, traffic, addresses):
    """Would today's connect4/6 send this app (non-proxy) TCP connect to 15001? A model of
    mb_should_capture and structs.cidr_rules, item 2 included (IPv6 ranges share the
    IPv4-mapped key space)."""
    if traffic.port in [int(p) for p in _split(config.get("outbound_ports_exclude"))]:
        return False
    if _owner_bypass(config, traffic.who):
        return False
    dst = _key(addresses[traffic.dst])
    include = str(config.get("outbound_ip_ranges_include", "*")).strip()
    excludes = _nets(config.get("outbound_ip_ranges_exclude")) + [
        ipaddress.ip_network("127.0.0.1/32")] + [
        ipaddress.ip_network(addresses[p]) for p in ("a4", "a6")]
    rules = [(_mapped(n), "exclude") for n in excludes]
    for n in _nets(include):
        m = _mapped(n)
        inside = any(_subnet(m, e) for e, _ in rules)
        rules.append((m, "exclude" if inside else "include"))
    hits = sorted((_plen(n), r) for n, r in rules if _in(dst, n))
    rule = hits[-1][1] if hits else None
    if rule == "exclude":
        return False
    ip = dst[1] if isinstance(dst, tuple) else dst
    loopback = ip.is_loopback or (ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
    if loopback and rule != "include":
        return False
    if traffic.port in [int(p) for p in _split(config.get("outbound_ports_include"))]:
        return True
    return rule == "include" or include == "*"


def known_differences(config, traffic, oracle, addresses):
    """The open Known items that explain how eBPF mode differs from `oracle` (the iptables
    verdict) for (`config` (resolved InterceptConfig fields), `traffic`)."""
    return [k for k in _known(config, traffic, oracle, addresses) if k in OPEN]


def _known(config, traffic, oracle, addresses):
    out = []
    seen = oracle.get("seen")
    captured_here = seen in (f"{traffic.src}:{OUTBOUND}", f"{traffic.src}:{INBOUND}",
                             f"{traffic.src}:{DNS_LISTENER}")
    uid_proxy, gid_proxy = _identity(config, traffic.who)
    proxy = (uid_proxy or gid_proxy) and traffic.src == "a"
    if traffic.src in ("a", "m") and captured_here and traffic.proto in ("tcp", "udp"):
        # (where Istio's own source is loopback, eBPF's 127.0.0.1 is no difference)
        if traffic.proto == "tcp" and oracle.get("app_local") not in LOOPBACK:
            out.append(ITEM10_SOCKNAME)
        if traffic.proto == "tcp" and oracle.get("lpeer") not in LOOPBACK:
            out.append(NEW_LISTENER_PEER)
    if traffic.src == "a" and captured_here and traffic.dst not in LATE_SYMBOLS and (
            oracle.get("app_local") in LATE_SYMBOLS or oracle.get("lpeer") in LATE_SYMBOLS):
        out.append(NEW_LATE_SOURCE)
    if traffic.src == "c":
        if traffic.dst in OWN_NON_POD and seen == f"a:{INBOUND}":
            out.append(ITEM8)
        if traffic.port in SIDECAR_PORTS and seen == f"a:{INBOUND}":
            out.append(NEW_INBOUND_OWN_PORTS)
        return out
    if traffic.src != "a":
        return out
    if traffic.proto == "udpc" and seen == f"a:{DNS_LISTENER}":
        out.append(ITEM3)
    if traffic.proto == "udp" and seen != f"a:{DNS_LISTENER}" and config.get("redirect_dns") \
            and not proxy and (config.get("capture_all_dns") or addresses[traffic.dst] in (
                _split(config.get("dns_servers_v4")) + _split(config.get("dns_servers_v6")))):
        if str(DNS_PORT) in _split(config.get("outbound_ports_exclude")) or \
                _owner_bypass(config, traffic.who):
            out.append(ITEM10_DNS)
    if traffic.proto != "tcp":
        return out
    if oracle.get("outcome") == "timeout" and traffic.dst in ("bll6", "all6"):
        out.append(NEW_LINK_LOCAL6)
        return out
    if proxy and traffic.dst == "all6" and seen == f"a:{INBOUND}":
        out.append(NEW_LINK_LOCAL6_PEER)
    if proxy and traffic.dst in OWN_NON_POD + ("lox4",) and seen == f"a:{INBOUND}":
        out.append(ITEM10_PROXY_LOCAL)
    if traffic.dst in LATE_SYMBOLS and (
            (proxy and seen == f"a:{INBOUND}") or
            (not proxy and seen == f"a:{APP_PORT}" and _ebpf_captures(config, traffic, addresses))):
        out.append(NEW_LATE_LOCAL)
    if traffic.dst in OWN_NON_POD:
        if not proxy and seen == f"a:{APP_PORT}" and _ebpf_captures(config, traffic, addresses):
            out.append(NEW_APP_LOCAL_DEST)
    first_uid = int(_split(config.get("proxy_uid", "1337"))[0])
    if traffic.dst in OWN_POD and (uid_proxy or gid_proxy) and IDENTITIES[traffic.who][0] != \
            first_uid and seen == f"a:{APP_PORT}" and \
            str(traffic.port) not in _split(config.get("outbound_ports_exclude")):
        out.append(NEW_PROXY_SELF)
    if traffic.dst in OWN_POD and not proxy and seen == f"a:{OUTBOUND}":
        out.append(NEW_OWN_POD_INCLUDED)
    if proxy or traffic.dst in OWN_POD + OWN_NON_POD:
        return out
    v6_over_v4 = any(_covers_v4(n) for n in _v6_nets(config.get("outbound_ip_ranges_include"))
                     + _v6_nets(config.get("outbound_ip_ranges_exclude")))
    if traffic.family == 4 and v6_over_v4 and traffic.dst != "lo4" and \
            captured_here != _ebpf_captures(config, traffic, addresses):
        out.append(ITEM2)
    if traffic.dst in ("lo6", "lox4") and _ebpf_captures(config, traffic, addresses) \
            and not captured_here:
        out.append(NEW_LOOPBACK)
    return out


# ---- the Envoy group: real Envoy as Istio's sidecar, a real app behind it ----------------

@dataclasses.dataclass(frozen=True)
class EnvoyTraffic:
    src: str            # "c" (unmeshed client) or "e" (the app in the Envoy pod)
    dst: str            # address symbol
    uid: int = 0

    @property
    def id(self):
        return f"{self.src}-tcp-{self.dst}-{APP_PORT}"

    @property
    def family(self):
        return 6 if self.dst.endswith("6") else 4


ENVOY_TRAFFIC = [EnvoyTraffic("c", "e4"), EnvoyTraffic("c", "e6"),
                 EnvoyTraffic("e", "s4", uid=1000), EnvoyTraffic("e", "s6", uid=1000),
                 EnvoyTraffic("e", "e4", uid=1000), EnvoyTraffic("e", "e6", uid=1000)]


def envoy_verdict(raw, listeners, names):
    """A GET through the Envoy pod: what the client saw, what the app answered (its peer
    and local address) and which of Envoy's listeners (outbound, inbound) counted it."""
    rec = raw.get("rec") or {}
    return {"outcome": raw["outcome"],
            "app_peer": _endpoint(raw.get("app_peer"), names),
            "app_local": _endpoint(raw.get("app_local"), names, port=False),
            "server": rec.get("pod"),
            "server_peer": _endpoint(rec.get("peer"), names, port=False) if rec else None,
            "server_local": _endpoint(rec.get("local"), names) if rec else None,
            "envoy": ",".join(sorted(listeners)) or None}


def envoy_known_differences(traffic, mode_has_v6_bind):
    """Known items for the Envoy group; `mode_has_v6_bind`: ::6 was on lo in eBPF mode."""
    out = []
    if traffic.src == "c" and traffic.family == 6 and not mode_has_v6_bind:
        out.append(ITEM1)
    if traffic.src == "e" and traffic.dst.startswith("s"):
        out.append(ITEM10_SOCKNAME)
    return [k for k in out if k in OPEN]
