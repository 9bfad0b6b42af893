"""meshbpf.ebpf.inbound, the TIME_WAIT path's pure parts: map layouts against bpf/lib/,
the packing of its entries, and the /proc/net/tcp parser that finds existing listeners.
No root, no kernel."""

import ipaddress
import os
import re
import struct

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import inbound, loader

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
    assert _struct_size(section, "inbound_tw_key") == inbound.TW_KEY.size == 36
    assert _struct_size(section, "capture_listener_key") == inbound.LISTENER_KEY.size == 16
    assert re.search(r"BPF_HASH\(inbound_netns, struct inbound_pod_key, __u64,", section)
    assert re.search(r'BPF_TABLE\("lru_hash", struct inbound_tw_key, __u64, inbound_tw,', section)
    assert int(re.search(r"#define INBOUND_POD_SK_LOOKUP (\d+)", section).group(1)) == \
        inbound.INBOUND_POD_SK_LOOKUP
    # the flag is a bit of its own
    assert inbound.INBOUND_POD_SK_LOOKUP & (inbound.INBOUND_POD_WILDCARD |
                                            inbound.INBOUND_POD_CAPTURES) == 0


def test_sk_lookup_flag_only_when_asked():
    p = inbound.inbound_policy(InterceptConfig())
    plain = inbound.POD_VAL.unpack(inbound.pod_value(p))[1]
    linked = inbound.POD_VAL.unpack(inbound.pod_value(p, sk_lookup=True))[1]
    assert not plain & inbound.INBOUND_POD_SK_LOOKUP
    assert linked == plain | inbound.INBOUND_POD_SK_LOOKUP
    e = inbound.policy_entries(p, ["10.233.0.11", "fd00:6d62::11"], sk_lookup=True)
    assert all(inbound.POD_VAL.unpack(v)[1] & inbound.INBOUND_POD_SK_LOOKUP
               for v in e[inbound.MAP_PODS].values())
    # decoding ignores the flag (status shows the policy)
    assert inbound.decode_pod_value(inbound.pod_value(p, True)) == inbound.decode_pod_value(
        inbound.pod_value(p))


def test_netns_and_listener_entries():
    keys = [inbound.pod_key("10.233.0.11"), inbound.pod_key("fd00:6d62::11")]
    e = inbound.netns_entries(keys, 0x1234)
    assert set(e) == set(keys)
    assert all(struct.unpack("=Q", v)[0] == 0x1234 for v in e.values())
    k = inbound.listener_key(77, 15006, inbound.AF_INET6)
    assert k[:8] == struct.pack("=Q", 77) and k[8:10] == b"\x3a\x9e"  # 15006, network order
    assert inbound.decode_listener_key(k) == (77, 15006, inbound.AF_INET6)


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 111 1 0
   1: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 222 1 0
   2: 0C00E90A:3A9E 0B00E90A:9C40 01 00000000:00000000 00:00000000 00000000  1337        0 333 1 0
   3: 0C00E90A:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 444 1 0
   4: 0100007F:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 555 1 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 666 1 0
   1: 00000000000000000000000001000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 777 1 0
   2: 0000000000000000FFFF00000100007F:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 888 1 0
   3: 00006DFD00000000000000001200000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 999 1 0
"""


def test_proc_net_tcp_parser_finds_reachable_listeners_on_the_port():
    got = inbound.parse_proc_net_tcp(TCP, 15006)
    # 15000 is another port, 333 is not listening, 127.0.0.1 is unreachable from outside
    assert got == [(ipaddress.ip_address("0.0.0.0"), 222),
                   (ipaddress.ip_address("10.233.0.12"), 444)]
    got6 = inbound.parse_proc_net_tcp(TCP6, 15006)
    # ::1 and ::ffff:127.0.0.1 are loopback; the malformed last line is skipped
    assert [ino for _, ino in got6] == [666]
    assert got6[0][0] == ipaddress.ip_address("::")
    assert inbound.parse_proc_net_tcp(TCP, 8080) == []


def test_loader_knows_the_sk_lookup_program():
    spec = {p.name: p for p in loader.PROGRAMS}["mb_sk_lookup"]
    assert (spec.source, spec.target, spec.feature) == ("sk_lookup.c", "netns", "sk_lookup")
    # a kernel without sk_lookup does not even compile it
    assert "int mb_sk_lookup(" in loader.render_source({"sk_lookup": True})
    assert "int mb_sk_lookup(" not in loader.render_source({"sk_lookup": False})
