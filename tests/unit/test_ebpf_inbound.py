"""meshbpf.ebpf.inbound, pure part: Istio's inbound port semantics and map entry packing.

No root, no kernel: the struct layouts are checked against bpf/lib/'s inbound
section by parsing it.
"""

import ctypes
import ipaddress
import re
import struct

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs
from meshbpf.ebpf.inbound import attach, policy, tc
from meshbpf.errors import ApplyError, UnsupportedError, UsageError

ALWAYS = {15008}                            # Istio's `--dport 15008 -j RETURN`
DEFAULT_EXCLUDE = {15020, 15021, 15090}     # Istio's injector's inbound_ports_exclude


def cfg(**kw):
    return InterceptConfig().replace(**kw)


# ---- policy -----------------------------------------------------------------------------

def test_default_config_captures_everything_but_the_sidecars_ports():
    p = policy.inbound_policy(InterceptConfig())
    assert p.wildcard and p.capture == () and p.capture_port == 15006
    assert set(p.bypass) == ALWAYS | DEFAULT_EXCLUDE
    assert policy.steers(p, 8080) and policy.steers(p, 1)
    for port in ALWAYS | DEFAULT_EXCLUDE:
        assert not policy.steers(p, port)
    # the sidecar's own listeners are captured like any port, as in Istio's ISTIO_INBOUND
    assert policy.steers(p, 15001) and policy.steers(p, 15006)


def test_wildcard_with_user_excludes():
    p = policy.inbound_policy(cfg(inbound_ports_include="*", inbound_ports_exclude="22,9000"))
    assert set(p.bypass) == ALWAYS | {22, 9000}
    assert not policy.steers(p, 22) and not policy.steers(p, 9000)
    assert policy.steers(p, 8080)


def test_port_list_captures_only_listed_ports_and_ignores_excludes_like_istio():
    # Istio's generator only honours inbound_ports_exclude with '*'.
    p = policy.inbound_policy(cfg(inbound_ports_include="8080,9090,15021,15008",
                                   inbound_ports_exclude="9090"))
    assert not p.wildcard and p.bypass == ()
    assert p.capture == (8080, 9090, 15021)   # listed: captured, as Istio; 15008 never
    assert policy.steers(p, 8080) and policy.steers(p, 9090) and policy.steers(p, 15021)
    assert not policy.steers(p, 15008) and not policy.steers(p, 80)


def test_empty_include_captures_nothing():
    p = policy.inbound_policy(cfg(inbound_ports_include=""))
    assert not p.wildcard and p.capture == ()
    assert not any(policy.steers(p, port) for port in (80, 8080, 15006))


def test_custom_capture_and_tunnel_ports_follow_the_config():
    p = policy.inbound_policy(cfg(inbound_capture_port=16006, inbound_tunnel_port=16008,
                                   proxy_port=16001))
    assert p.capture_port == 16006
    assert set(p.bypass) == {16008} | DEFAULT_EXCLUDE
    assert policy.steers(p, 15006) and policy.steers(p, 15008) and policy.steers(p, 16001)


# ---- packing ----------------------------------------------------------------------------

def _header_structs():
    """{struct name: [(c type, field, array len)]} of bpf/lib/'s headers."""
    section = loader.header_text()
    out = {}
    for m in re.finditer(r"struct (\w+) \{(.*?)\};", section, re.S):
        fields = []
        body = re.sub(r"/\*.*?\*/", "", m.group(2), flags=re.S)
        for decl in body.split(";"):
            d = re.match(r"\s*(__u8|__u16|__u32|__u64)\s+(\w+)(?:\[(\d+)\])?\s*$", decl)
            if d:
                fields.append((d.group(1), d.group(2), int(d.group(3) or 1)))
        out[m.group(1)] = fields
    return out, section


def _c_size(fields):
    sizes = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}
    off, align = 0, 1
    for ctype, _, n in fields:
        sz = sizes[ctype]
        align = max(align, sz)
        off = (off + sz - 1) // sz * sz + sz * n
    return (off + align - 1) // align * align


def test_python_layouts_match_the_c_header():
    cstructs, section = _header_structs()
    assert _c_size(cstructs["inbound_pod_key"]) == ctypes.sizeof(structs.InboundPodKey) == 16
    assert _c_size(cstructs["inbound_pod_val"]) == ctypes.sizeof(structs.InboundPodVal) == 16
    assert _c_size(cstructs["inbound_port_key"]) == ctypes.sizeof(structs.InboundPortKey) == 20
    assert _c_size(cstructs["inbound_iface_val"]) == ctypes.sizeof(structs.InboundIfaceVal) == 24
    assert re.search(r"BPF_HASH\(inbound_ifaces, __u32, struct inbound_iface_val,", section)
    assert [f[1] for f in cstructs["inbound_pod_val"]][:2] == ["capture_port", "flags"]
    assert [f[1] for f in cstructs["inbound_port_key"]][:2] == ["ip", "port"]
    assert re.search(r"BPF_HASH\(inbound_ports, struct inbound_port_key, __u32,", section)
    for name in ("INBOUND_POD_WILDCARD", "INBOUND_POD_CAPTURES", "INBOUND_PORT_CAPTURE",
                 "INBOUND_PORT_BYPASS"):
        value = int(re.search(rf"#define {name} (\d+)", section).group(1))
        assert getattr(structs, name) == value


def test_ip_keys_are_v4_mapped_or_plain_v6():
    assert structs.ip16("10.233.0.11") == bytes(10) + b"\xff\xff" + bytes([10, 233, 0, 11])
    assert structs.ip16("fd00:6d62::11") == ipaddress.IPv6Address("fd00:6d62::11").packed
    assert structs.ip16(ipaddress.ip_address("1.2.3.4"))[-4:] == b"\x01\x02\x03\x04"


def test_ports_are_network_order():
    key = structs.inbound_port_key("10.0.0.1", 8080)
    assert key[16:18] == b"\x1f\x90" and key[18:] == b"\0\0"
    val = policy.pod_value(policy.inbound_policy(InterceptConfig()))
    assert val[:2] == b"\x3a\x9e"                                  # 15006
    assert policy.decode_pod_value(val) == {"capture_port": 15006, "wildcard": True,
                                             "captures": True}
    assert structs.decode_inbound_port_key(key) == (ipaddress.ip_address("10.0.0.1"), 8080)
    assert structs.decode_inbound_port_key(structs.inbound_port_key("fd00::1", 443)) == \
        (ipaddress.ip_address("fd00::1"), 443)


def test_entries_for_a_dual_stack_pod():
    p = policy.inbound_policy(cfg(inbound_ports_include="8080,9090"))
    e = policy.policy_entries(p, ["10.233.0.11", "fd00:6d62::11", "fe80::1", "127.0.0.1"])
    assert set(e[policy.MAP_PODS]) == {structs.inbound_pod_key("10.233.0.11"),
                                         structs.inbound_pod_key("fd00:6d62::11")}
    assert all(policy.decode_pod_value(v) == {"capture_port": 15006, "wildcard": False,
                                               "captures": True}
               for v in e[policy.MAP_PODS].values())
    ports = {structs.decode_inbound_port_key(k): struct.unpack("=I", v)[0]
             for k, v in e[policy.MAP_PORTS].items()}
    ip4, ip6 = ipaddress.ip_address("10.233.0.11"), ipaddress.ip_address("fd00:6d62::11")
    assert ports == {(ip4, 8080): structs.INBOUND_PORT_CAPTURE,
                     (ip6, 8080): structs.INBOUND_PORT_CAPTURE,
                     (ip4, 9090): structs.INBOUND_PORT_CAPTURE,
                     (ip6, 9090): structs.INBOUND_PORT_CAPTURE}


def test_entries_for_wildcard_are_bypass_entries():
    p = policy.inbound_policy(cfg(inbound_ports_exclude="22"))
    e = policy.policy_entries(p, ["10.1.2.3"])
    actions = {structs.decode_inbound_port_key(k)[1]: struct.unpack("=I", v)[0]
               for k, v in e[policy.MAP_PORTS].items()}
    assert actions == {port: structs.INBOUND_PORT_BYPASS for port in ALWAYS | {22}}
    assert policy.decode_pod_value(e[policy.MAP_PODS][structs.inbound_pod_key("10.1.2.3")])["wildcard"]


def test_a_pod_capturing_nothing_is_marked_so():
    e = policy.policy_entries(policy.inbound_policy(cfg(inbound_ports_include="")), ["10.0.0.9"])
    assert policy.decode_pod_value(e[policy.MAP_PODS][structs.inbound_pod_key("10.0.0.9")]) == \
        {"capture_port": 15006, "wildcard": False, "captures": False}
    assert e[policy.MAP_PORTS] == {}


def test_no_pod_ip_no_entries():
    e = policy.policy_entries(policy.inbound_policy(InterceptConfig()), ["fe80::2", "::1"])
    assert e == {policy.MAP_PODS: {}, policy.MAP_PORTS: {}}


# ---- hook choice --------------------------------------------------------------------------

def test_hook_is_tc_everywhere_and_xdp_is_refused_with_the_reason():
    assert tc.select_hook("auto", "veth") == "tc"
    assert tc.select_hook("auto", None) == "tc"
    assert tc.select_hook("tc", "macvlan") == "tc"
    with pytest.raises(UnsupportedError, match="bpf_sk_assign"):
        tc.select_hook("xdp", "veth")
    with pytest.raises(UsageError):
        tc.select_hook("ebpf", "veth")


def test_fd_arguments_accept_ints_and_objects():
    class Table:
        map_fd = 7

    class Pinned:
        fd = 9

    assert attach._map_fds({"inbound_pods": Table(), "inbound_ports": 5}) == \
        {"inbound_pods": 7, "inbound_ports": 5}
    assert attach._map_fds({"inbound_pods": Pinned(), "inbound_ports": Pinned()}) == \
        {"inbound_pods": 9, "inbound_ports": 9}
    with pytest.raises(UsageError, match="inbound_ports"):
        attach._map_fds({"inbound_pods": 3})
    with pytest.raises(UsageError, match="tc_inbound_ingress"):
        attach._prog_fd({})


def test_interface_ids_are_reused_per_netns_and_never_shared():
    """A pod's filters carry classid 4d42:<id>; a re-attach keeps its id, another pod gets
    the lowest free one (minors 0xfff2/0xfff3 are clsact's own)."""
    assert policy.iface_id({}, 5) == 1
    assert policy.iface_id({1: 5, 2: 6}, 6) == 2
    assert policy.iface_id({1: 5, 3: 6}, 7) == 2
    assert policy.IFACE_MAX_ID < 0xfff2
    with pytest.raises(ApplyError):
        policy.iface_id({n: n for n in range(1, policy.IFACE_MAX_ID + 1)}, 0)
    keys = {structs.inbound_pod_key("fd00::11"), structs.inbound_pod_key("10.233.0.11")}
    v = structs.from_bytes(structs.InboundIfaceVal, policy.iface_value(keys, 9))
    ip16, cookie = bytes(v.ip), v.netns
    assert ip16 == structs.ip16("10.233.0.11") and cookie == 9
