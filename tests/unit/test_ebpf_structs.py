"""meshbpf/ebpf/structs.py mirrors bpf/lib/types.h, and its packing functions follow Istio's
semantics. No root, no bcc: the header is parsed here and its layout computed with the C
rules (natural alignment), then compared with the ctypes mirror."""

import ctypes
import ipaddress
import re

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs
from meshbpf.errors import UsageError

SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__be16": 2, "__be32": 4}


def _header():
    text = loader.header_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _defines(text):
    out = {}
    for m in re.finditer(r"^#define[ \t]+(\w+)[ \t]+(.+)$", text, flags=re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def _eval(expr, defines):
    expr = expr.strip()
    if expr in defines:
        return _eval(defines[expr], defines)
    expr = re.sub(r"(\d+)u\b", r"\1", expr)
    return eval(expr, {})  # noqa: S307 - our own header's integer constants


def c_layout(name):
    """[(field, offset, size)] and total size of `struct name` per the C rules."""
    text = _header()
    defines = _defines(text)
    m = re.search(r"struct\s+" + name + r"\s*\{(.*?)\};", text, flags=re.S)
    assert m, f"struct {name} not in bpf/lib/"
    fields, off, align_max = [], 0, 1
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        fm = re.match(r"(\w+)\s+(\w+)(?:\[(\w+)\])?$", decl)
        assert fm, f"cannot parse {decl!r} in struct {name}"
        ctype, fname, count = fm.groups()
        size = SIZES[ctype]
        n = _eval(count, defines) if count else 1
        off = (off + size - 1) // size * size
        fields.append((fname, off, size * n))
        off += size * n
        align_max = max(align_max, size)
    total = (off + align_max - 1) // align_max * align_max
    return fields, total


@pytest.mark.parametrize("cname", sorted(structs.MIRRORS))
def test_struct_mirror_matches_header(cname):
    mirror = structs.MIRRORS[cname]
    fields, total = c_layout(cname)
    assert ctypes.sizeof(mirror) == total
    got = [(f, getattr(mirror, f).offset, getattr(mirror, f).size) for f, *_ in mirror._fields_]
    assert got == fields


def test_counter_enum_matches_header():
    text = _header()
    enum = re.search(r"enum\s+mb_counter\s*\{(.*?)\};", text, flags=re.S).group(1)
    entries = dict((k, int(v)) for k, v in re.findall(r"(COUNTER_\w+)\s*=\s*(\d+)", enum))
    assert entries.pop("COUNTER_MAX") == structs.COUNTER_MAX
    names = [n[len("COUNTER_"):].lower() for n, _ in sorted(entries.items(), key=lambda kv: kv[1])]
    assert names == structs.COUNTERS
    assert sorted(entries.values()) == list(range(len(entries)))


def test_flag_constants_match_header():
    defines = _defines(_header())
    for name in ("POD_F_OUTBOUND_ALL", "POD_F_IPV6", "POD_F_OWNER_INCLUDE",
                 "POD_F_OWNER_EXCLUDE", "POD_F_DNS", "POD_F_DNS_ALL",
                 "POD_F_LOOPBACK_INCLUDED", "POD_F_TPROXY", "MB_DNS_SCOPE", "MB_IPV6_SCOPE", "RULE_INCLUDE",
                 "RULE_EXCLUDE", "NODE_F_SPLICE", "ORIG_F_ANSWERED", "ORIG_F_CONNECTED",
                 "MB_MAX_IDS", "MB_MAX_PODS", "INBOUND_POD_WILDCARD", "INBOUND_POD_CAPTURES",
                 "INBOUND_POD_SK_LOOKUP", "INBOUND_PORT_CAPTURE", "INBOUND_PORT_BYPASS",
                 "MB_AF_INET", "MB_AF_INET6"):
        assert _eval(name, defines) == getattr(structs, name), name


def test_map_key_types_match_the_header_declarations():
    from meshbpf.ebpf.maps import MAP_TYPES
    text = _header()
    decl = {}
    for m in re.finditer(r"BPF_(HASH|LPM_TRIE|ARRAY|PERCPU_ARRAY)\((\w+),\s*([\w ]+?),\s*([\w ]+?),", text):
        decl[m.group(2)] = (m.group(3).strip(), m.group(4).strip())
    sizes = {"__u64": 8, "__u32": 4}
    for name, (k, v) in decl.items():
        if name not in MAP_TYPES:
            continue
        kt, vt = MAP_TYPES[name]
        ks = sizes.get(k) or ctypes.sizeof(structs.MIRRORS[k.replace("struct ", "")])
        vs = sizes.get(v) or ctypes.sizeof(structs.MIRRORS[v.replace("struct ", "")])
        assert (ctypes.sizeof(kt), ctypes.sizeof(vt)) == (ks, vs), name
    # ARRAY / PERCPU_ARRAY keys are u32 implicitly; the declared type is the value
    assert "counters" in MAP_TYPES and "node_cfg" in MAP_TYPES


# ---- packing --------------------------------------------------------------------------------

def test_ip16_maps_ipv4_and_roundtrips():
    assert structs.ip16("10.1.2.3") == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert structs.ip16("fd00::1") == ipaddress.ip_address("fd00::1").packed
    assert structs.ip_from16(structs.ip16("10.1.2.3")) == ipaddress.ip_address("10.1.2.3")
    assert structs.ip_from16(structs.ip16("fd00::1")) == ipaddress.ip_address("fd00::1")


def test_pod_struct_defaults():
    pc = structs.pod_struct(InterceptConfig(), 7)
    assert structs.ntohs(pc.proxy_port) == 15001
    assert structs.ntohs(pc.inbound_port) == 15006
    assert pc.pod_index == 7
    assert list(pc.uids[:pc.n_uids]) == [1337] and list(pc.gids[:pc.n_gids]) == [1337]
    assert pc.flags & structs.POD_F_OUTBOUND_ALL
    assert not pc.flags & structs.POD_F_IPV6
    assert not pc.flags & (structs.POD_F_OWNER_INCLUDE | structs.POD_F_OWNER_EXCLUDE)
    # network byte order on the wire: 15001 = 0x3a99 -> bytes 3a 99
    assert bytes(pc)[:2] == b"\x3a\x99"


def test_pod_struct_options():
    cfg = InterceptConfig(proxy_port=16001, proxy_uid="3,4", proxy_gid="5",
                          outbound_ip_ranges_include="10.0.0.0/8", enable_ipv6=True,
                          owner_groups_exclude="1001,1002")
    pc = structs.pod_struct(cfg, 1)
    assert structs.ntohs(pc.proxy_port) == 16001
    assert list(pc.uids[:pc.n_uids]) == [3, 4] and list(pc.gids[:pc.n_gids]) == [5]
    assert not pc.flags & structs.POD_F_OUTBOUND_ALL
    assert pc.flags & structs.POD_F_IPV6
    assert pc.flags & structs.POD_F_OWNER_EXCLUDE
    assert list(pc.owner_gids[:pc.n_owner_gids]) == [1001, 1002]
    inc = structs.pod_struct(InterceptConfig(owner_groups_include="1001"), 1)
    assert inc.flags & structs.POD_F_OWNER_INCLUDE


def test_too_many_proxy_uids_is_a_usage_error():
    cfg = InterceptConfig(proxy_uid=",".join(str(i) for i in range(1, 11)))
    with pytest.raises(UsageError):
        structs.pod_struct(cfg, 1)


def test_cidr_key_prefix_lengths():
    k4 = structs.cidr_key(3, ipaddress.ip_network("10.1.0.0/16"))
    assert k4.prefixlen == 32 + 96 + 16 and k4.pod_index == 3
    assert bytes(k4.ip) == structs.ip16("10.1.0.0")
    k6 = structs.cidr_key(3, ipaddress.ip_network("fd00::/8"))
    assert k6.prefixlen == 32 + 8 and k6.pod_index == 3 | structs.MB_IPV6_SCOPE
    host = structs.cidr_key(1, ipaddress.ip_network("127.0.0.1/32"))
    assert host.prefixlen == 32 + 128
    assert ctypes.sizeof(k4) == 24


def trie_lookup(entries, key):
    """What the kernel's LPM trie answers for lookup `key` among `entries` [(key, value)]:
    the value of the longest stored prefix whose first prefixlen bits of data (everything
    after the prefixlen field) equal the lookup key's, compared bit by bit."""
    def bits(k, n):
        data = int.from_bytes(bytes(k)[4:], "big")
        total = (ctypes.sizeof(k) - 4) * 8
        return data >> (total - n) if n else 0
    best = None
    for k, v in entries:
        if k.prefixlen <= key.prefixlen and bits(k, k.prefixlen) == bits(key, k.prefixlen):
            if best is None or k.prefixlen > best[0]:
                best = (k.prefixlen, v)
    return best[1] if best else 0


@pytest.mark.parametrize("change,addr,istio", [
    # Istio renders IPv4 ranges into iptables and IPv6 ranges into ip6tables only.
    ({"outbound_ip_ranges_exclude": "::/0"}, "10.233.0.12", 0),
    ({"outbound_ip_ranges_exclude": "::/0"}, "::ffff:10.233.0.12", 0),
    ({"outbound_ip_ranges_exclude": "::/0"}, "fd00:6d62::12", structs.RULE_EXCLUDE),
    ({"outbound_ip_ranges_exclude": "::/96"}, "10.233.0.12", 0),
    ({"outbound_ip_ranges_exclude": "::ffff:0:0/96"}, "10.233.0.12", 0),
    ({"outbound_ip_ranges_exclude": "0.0.0.0/0"}, "fd00:6d62::12", 0),
    ({"outbound_ip_ranges_exclude": "0.0.0.0/0"}, "::a00:1", 0),   # IPv4-compatible form
    ({"outbound_ip_ranges_exclude": "0.0.0.0/0"}, "10.233.0.12", structs.RULE_EXCLUDE),
    ({"outbound_ip_ranges_include": "::/0"}, "10.233.0.12", 0),
    ({"outbound_ip_ranges_include": "::/0"}, "fd00:6d62::12", structs.RULE_INCLUDE),
    ({"outbound_ip_ranges_include": "0.0.0.0/0"}, "fd00:6d62::12", 0),
    ({"outbound_ip_ranges_include": "0.0.0.0/0", "outbound_ip_ranges_exclude": "::/0"},
     "10.233.0.12", structs.RULE_INCLUDE),
])
def test_cidr_keys_keep_the_address_families_apart(change, addr, istio):
    """Packed keys as the kernel's trie compares them: an IPv6 range never matches an IPv4
    destination (nor the other way round), as in Istio's per-family rules."""
    cfg = InterceptConfig(enable_ipv6=True).replace(**change)
    entries = [(structs.cidr_key(4, net), rule) for net, rule in structs.cidr_rules(cfg)]
    assert trie_lookup(entries, structs.cidr_lookup_key(4, addr)) == istio
    # another pod's rules are never consulted
    assert trie_lookup(entries, structs.cidr_lookup_key(5, addr)) == 0


def test_cidr_key_describe_round_trips():
    for net in ("10.1.0.0/16", "0.0.0.0/0", "::/0", "::ffff:0:0/96", "fd00::/8", "::6/128"):
        n = ipaddress.ip_network(net)
        for scope, dns in ((7, False), (7 | structs.MB_DNS_SCOPE, True)):
            assert structs.describe_cidr_key(structs.cidr_key(scope, n)) == (7, dns, n)


def _rules(cfg, extra=()):
    return {str(n): r for n, r in structs.cidr_rules(cfg, extra)}


def test_cidr_rules_wildcard_only_excludes_loopback_and_own_addresses():
    rules = _rules(InterceptConfig(), [ipaddress.ip_network("10.233.0.5/32")])
    assert rules == {"127.0.0.1/32": structs.RULE_EXCLUDE, "10.233.0.5/32": structs.RULE_EXCLUDE}


def test_cidr_rules_exclude_wins_over_a_narrower_include():
    cfg = InterceptConfig(outbound_ip_ranges_include="10.1.0.0/16,192.168.0.0/16,fd00::/8",
                          outbound_ip_ranges_exclude="10.0.0.0/8,fd00:1::/32")
    rules = _rules(cfg)
    assert rules["10.0.0.0/8"] == structs.RULE_EXCLUDE
    # Istio checks every exclude first: an include inside an exclude is excluded
    assert rules["10.1.0.0/16"] == structs.RULE_EXCLUDE
    assert rules["192.168.0.0/16"] == structs.RULE_INCLUDE
    assert rules["fd00::/8"] == structs.RULE_INCLUDE
    assert rules["fd00:1::/32"] == structs.RULE_EXCLUDE


def test_cidr_rules_same_range_in_both_is_excluded():
    cfg = InterceptConfig(outbound_ip_ranges_include="10.0.0.0/8",
                          outbound_ip_ranges_exclude="10.0.0.0/8")
    assert _rules(cfg)["10.0.0.0/8"] == structs.RULE_EXCLUDE


def lpm(rules, addr):
    """What the kernel's LPM trie answers for `addr` given `rules`."""
    ip = ipaddress.ip_address(addr)
    best = None
    for net, rule in rules:
        if net.version == ip.version and ip in net:
            if best is None or net.prefixlen > best[0].prefixlen:
                best = (net, rule)
    return best[1] if best else 0


@pytest.mark.parametrize("addr", ["10.1.2.3", "10.2.0.1", "192.168.1.1", "172.16.0.1",
                                  "127.0.0.1", "fd00::1", "fd00:1::1"])
def test_lpm_answer_equals_istio_order(addr):
    cfg = InterceptConfig(outbound_ip_ranges_include="10.1.0.0/16,192.168.0.0/16,fd00::/8",
                          outbound_ip_ranges_exclude="10.0.0.0/8,fd00:1::/32")
    inc, exc = cfg.outbound_cidrs()
    ip = ipaddress.ip_address(addr)
    loop = ipaddress.ip_network(cfg.host_ipv4_loopback_cidr)
    istio_excluded = any(ip.version == n.version and ip in n for n in list(exc) + [loop])
    istio_included = any(ip.version == n.version and ip in n for n in inc)
    got = lpm(structs.cidr_rules(cfg), addr)
    if istio_excluded:
        assert got == structs.RULE_EXCLUDE
    elif istio_included:
        assert got == structs.RULE_INCLUDE
    else:
        assert got == 0


def test_port_rules_exclude_wins():
    cfg = InterceptConfig(outbound_ports_include="80,443", outbound_ports_exclude="443,22")
    assert structs.port_rules(cfg) == [(22, structs.RULE_EXCLUDE), (80, structs.RULE_INCLUDE),
                                       (443, structs.RULE_EXCLUDE)]
    k = structs.port_key(2, 443)
    assert k.pod_index == 2 and structs.ntohs(k.port) == 443 and ctypes.sizeof(k) == 8


# ---- loader (pure parts) ------------------------------------------------------------------

def test_render_source_is_one_module(monkeypatch):
    monkeypatch.setattr(loader, "splice_defines", lambda: ["-DMB_TCP_COPIED_SEQ_OFF=8",
                                                           "-DMB_TCP_WRITE_SEQ_OFF=12"])
    text = loader.render_source(splice=True)
    assert not re.search(r'^\s*#include "', text, flags=re.M)
    assert text.count("#ifndef MESHBPF_LIB_TYPES_H") == 1
    for fn in ("mb_connect4", "mb_connect6", "mb_getsockopt", "mb_sockops", "mb_sk_msg",
               "mb_getpeername4", "mb_getpeername6"):
        assert re.search(r"\bint\s+" + fn + r"\s*\(", text), fn
    assert "#define MB_TCP_COPIED_SEQ_OFF 8" in text


def test_missing_getpeername_drops_those_programs():
    feats = {"cgroup_getpeername4": False, "cgroup_getpeername6": True}
    text = loader.render_source(feats)
    assert "mb_getpeername4" not in text and "HAVE_GETPEERNAME" not in text
    names = {p.name for p in loader.wanted_programs(text, feats)}
    assert "mb_getpeername4" not in names and "mb_connect4" in names
    # a probe report shape works as well
    report = {"features": {"cgroup_getpeername4": {"ok": False}}}
    assert "mb_getpeername4" not in loader.render_source(report)


def test_splice_off_leaves_sk_msg_out(monkeypatch):
    monkeypatch.setattr(loader, "splice_defines", lambda: [])
    text = loader.render_source(splice=True)
    assert "mb_sk_msg" in {p.name for p in loader.wanted_programs(text, splice=True)}
    assert "mb_sk_msg" not in {p.name for p in loader.wanted_programs(text, splice=False)}


def test_pin_prefix_must_be_on_bpffs():
    with pytest.raises(UsageError):
        loader.ensure_loaded("/tmp/meshbpf-not-bpffs", "/sys/fs/cgroup")


def test_dns_flags_and_servers():
    pc = structs.pod_struct(InterceptConfig(), 1)
    assert not pc.flags & (structs.POD_F_DNS | structs.POD_F_DNS_ALL)
    assert structs.ntohs(pc.dns_port) == 15053
    cfg = InterceptConfig(redirect_dns=True, dns_servers_v4=["10.96.0.10", "10.96.0.10"],
                          dns_servers_v6=["fd00::a"])
    pc = structs.pod_struct(cfg, 1)
    assert pc.flags & structs.POD_F_DNS and not pc.flags & structs.POD_F_DNS_ALL
    assert [(str(n), r) for n, r in structs.dns_rules(cfg)] == [
        ("10.96.0.10/32", structs.RULE_INCLUDE), ("fd00::a/128", structs.RULE_INCLUDE)]
    every = cfg.replace(capture_all_dns=True)
    assert structs.pod_struct(every, 1).flags & structs.POD_F_DNS_ALL
    assert structs.dns_rules(every) == []            # every server: no list needed
    assert structs.dns_rules(InterceptConfig(dns_servers_v4=["10.96.0.10"])) == []
    d, v6 = structs.MB_DNS_SCOPE, structs.MB_IPV6_SCOPE
    assert structs.scopes(3) == {3, 3 | d, 3 | v6, 3 | d | v6}


def test_dns_programs_follow_the_features():
    text = loader.render_source({"cgroup_sendmsg4": False})
    assert "mb_sendmsg4" not in text and "mb_recvmsg4" not in text
    assert "mb_sendmsg4" in loader.render_source()


def test_dns_flag_only_when_istio_would_redirect_dns():
    """Istio turns redirect_dns off without a server or capture_all_dns; its lo rules then
    take the plain shape, so eBPF mode must not see DNS either."""
    assert not structs.pod_struct(InterceptConfig(redirect_dns=True), 1).flags & structs.POD_F_DNS
    for extra in ({"capture_all_dns": True}, {"dns_servers_v6": ["fd00::a"]}):
        cfg = InterceptConfig(redirect_dns=True, **extra)
        assert structs.pod_struct(cfg, 1).flags & structs.POD_F_DNS


@pytest.mark.parametrize("include,expected", [
    ("*", False), ("", False), ("10.0.0.0/8", False), ("127.0.0.1/8", True),
    ("10.0.0.0/8,::1/128", True), ("127.0.0.0/8", True),
])
def test_loopback_included_follows_istio(include, expected):
    """Istio's loopback_included: an include range whose address (as written) is loopback."""
    cfg = InterceptConfig(outbound_ip_ranges_include=include)
    assert structs.loopback_included(cfg) is expected
    flag = structs.pod_struct(cfg, 1).flags & structs.POD_F_LOOPBACK_INCLUDED
    assert bool(flag) is expected


def test_tproxy_mode_is_a_pod_flag():
    """TPROXY inbound changes the proxy's connects over lo (Istio's mangle OUTPUT mark)."""
    tp = structs.pod_struct(InterceptConfig(inbound_interception_mode="TPROXY"), 1)
    assert tp.flags & structs.POD_F_TPROXY
    assert not structs.pod_struct(InterceptConfig(), 1).flags & structs.POD_F_TPROXY


def test_own_addresses_are_not_excluded_by_range():
    """The app dialling its own addresses is left alone by the `-o lo` rule
    (mb_should_capture), not by an exclude range: Istio writes none."""
    assert structs.cidr_rules(InterceptConfig()) == [
        (ipaddress.ip_network("127.0.0.1/32"), structs.RULE_EXCLUDE)]


def test_netns_addr_keys_and_source_addresses():
    k = structs.netns_addr_key(77, "fe80::1")
    assert k.netns == 77 and bytes(k.ip) == ipaddress.ip_address("fe80::1").packed
    src = structs.netns_src(["fe80::1", "127.0.0.1", "10.233.0.11", "fd00::11", "10.233.0.99"])
    assert bytes(src.v4) == structs.ip16("10.233.0.11")
    assert bytes(src.v6) == structs.ip16("fd00::11")
    assert not any(src.ll4)
    empty = structs.netns_src(["fe80::1"])
    assert not any(empty.v4) and not any(empty.v6) and not any(empty.ll4)
    # the kernel sources a 169.254/16 destination from the pod's own link-local address,
    # which only the netns's full address list (pod.local_addresses()) has
    ll = structs.netns_src(["10.233.0.11"], ["127.0.0.1", "169.254.20.1", "fe80::a1",
                                             "10.233.0.11"])
    assert bytes(ll.v4) == structs.ip16("10.233.0.11")
    assert bytes(ll.ll4) == structs.ip16("169.254.20.1")


def test_getsockname_programs_follow_getpeername():
    names = {p.name: p for p in loader.PROGRAMS}
    assert names["mb_getsockname4"].feature == names["mb_getpeername4"].feature
    text = loader.render_source({"cgroup_getpeername4": False})
    assert "mb_getsockname4" not in text and "mb_getsockname6" not in text
    assert "int mb_getsockname6(" in loader.render_source()


def test_trace_constants_match_header():
    """The trace event's codes (lib/trace.h) and rule names (MB_WHY_*, lib/policy.h) are the
    C ones: a renumbered rule would make `meshbpf trace` name the wrong rule."""
    defines = _defines(_header())
    for name in ("MB_TRACE_OUT", "MB_TRACE_IN", "MB_TRACE_REDIRECTED", "MB_TRACE_BYPASSED",
                 "MB_TRACE_REFUSED"):
        assert _eval(name, defines) == getattr(structs, name), name
    why = {int(_eval(k, defines)): k[len("MB_WHY_"):].lower()
           for k in defines if k.startswith("MB_WHY_")}
    assert why == {code: name for code, (name, _) in structs.TRACE_RULES.items()}
