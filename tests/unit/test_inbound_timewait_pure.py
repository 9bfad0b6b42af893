"""meshbpf.ebpf.inbound, the TIME_WAIT path's pure parts: map layouts against bpf/lib/,
the packing of its entries, and the /proc/net/tcp parser that finds existing listeners.
No root, no kernel."""

import ctypes
import ipaddress
import os
import re
import struct

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs
from meshbpf.ebpf.inbound import listeners, policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _section():
    return loader.header_text()


def _struct_size(section, name):
    body = re.search(r"struct " + name + r" \{(.*?)\};", section, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    sizes = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}
    off, align = 0, 1
    for ctype, _, n in re.findall(r"(__u\d+)\s+(\w+)(?:\[(\d+)\])?\s*;", body):
        sz = sizes[ctype]
        align = max(align, sz)
        off = (off + sz - 1) // sz * sz + sz * int(n or 1)
    return (off + align - 1) // align * align


def test_layouts_and_flags_match_the_c_header():
    section = _section()
    assert _struct_size(section, "inbound_tw_key") == ctypes.sizeof(structs.InboundTwKey) == 36
    assert _struct_size(section, "capture_listener_key") == ctypes.sizeof(structs.CaptureListenerKey) == 16
    assert re.search(r"BPF_HASH\(inbound_netns, struct inbound_pod_key, __u64,", section)
    assert re.search(r'BPF_TABLE\("lru_hash", struct inbound_tw_key, __u64, inbound_tw,', section)
    assert int(re.search(r"#define INBOUND_POD_SK_LOOKUP (\d+)", section).group(1)) == \
        structs.INBOUND_POD_SK_LOOKUP
    # the flag is a bit of its own
    assert structs.INBOUND_POD_SK_LOOKUP & (structs.INBOUND_POD_WILDCARD |
                                            structs.INBOUND_POD_CAPTURES) == 0


def test_sk_lookup_flag_only_when_asked():
    p = policy.inbound_policy(InterceptConfig())
    plain = structs.from_bytes(structs.InboundPodVal, policy.pod_value(p)).flags
    linked = structs.from_bytes(structs.InboundPodVal, policy.pod_value(p, sk_lookup=True)).flags
    assert not plain & structs.INBOUND_POD_SK_LOOKUP
    assert linked == plain | structs.INBOUND_POD_SK_LOOKUP
    e = policy.policy_entries(p, ["10.233.0.11", "fd00:6d62::11"], sk_lookup=True)
    assert all(structs.from_bytes(structs.InboundPodVal, v).flags & structs.INBOUND_POD_SK_LOOKUP
               for v in e[policy.MAP_PODS].values())
    # decoding ignores the flag (status shows the policy)
    assert policy.decode_pod_value(policy.pod_value(p, True)) == policy.decode_pod_value(
        policy.pod_value(p))


def test_netns_and_listener_entries():
    keys = [structs.inbound_pod_key("10.233.0.11"), structs.inbound_pod_key("fd00:6d62::11")]
    e = policy.netns_entries(keys, 0x1234)
    assert set(e) == set(keys)
    assert all(struct.unpack("=Q", v)[0] == 0x1234 for v in e.values())
    k = structs.capture_listener_key(77, 15006, structs.MB_AF_INET6)
    assert k[:8] == struct.pack("=Q", 77) and k[8:10] == b"\x3a\x9e"  # 15006, network order
    assert structs.decode_capture_listener_key(k) == (77, 15006, structs.MB_AF_INET6)


def test_listeners_the_pod_interfaces_reach_on_the_capture_port():
    v4, v6 = structs.MB_AF_INET, structs.MB_AF_INET6
    sockets = [(v4, "0.0.0.0", 15006, 222), (v4, "0.0.0.0", 15000, 111),
               (v4, "127.0.0.1", 15006, 333), (v4, "10.233.0.12", 15006, 444),
               (v6, "::", 15006, 666), (v6, "::1", 15006, 777),
               (v6, "::ffff:127.0.0.1", 15006, 888), (v6, "fd00::12", 15006, 0)]
    got = listeners.reachable_listeners(sockets, 15006)
    # 15000 is another port, loopback is unreachable from outside, inode 0 is no socket
    assert got == [(v4, ipaddress.ip_address("0.0.0.0"), 222),
                   (v4, ipaddress.ip_address("10.233.0.12"), 444),
                   (v6, ipaddress.ip_address("::"), 666)]
    assert listeners.reachable_listeners(sockets, 8080) == []


def test_loader_knows_the_sk_lookup_program():
    spec = {p.name: p for p in loader.PROGRAMS}["mb_sk_lookup"]
    assert (spec.source, spec.target, spec.feature) == ("sk_lookup.c", "netns", "sk_lookup")
    # a kernel without sk_lookup does not even compile it
    assert "int mb_sk_lookup(" in loader.render_source({"sk_lookup": True})
    assert "int mb_sk_lookup(" not in loader.render_source({"sk_lookup": False})
