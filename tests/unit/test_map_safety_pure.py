"""Pure parts of node-wide map safety: who holds an address,
inbound entry owners, the map-size override and the counters/flags mirrored from C."""

import re

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs
from meshbpf.ebpf.inbound import attach, policy
from meshbpf.ebpf.interceptor import address_conflicts
from meshbpf.errors import UsageError


def test_only_a_live_other_owner_conflicts():
    holders = {"10.0.0.1": 7, "10.0.0.2": 9, "10.0.0.3": None, "10.0.0.4": 5}
    alive = {7: True, 9: False}.get
    got = address_conflicts(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
                            holders, me=5, alive=alive)
    # 10.0.0.1: a live pod's; .2: a dead pod's (taken over); .3: nobody's; .4: ours
    assert got == [("10.0.0.1", 7)]


def test_inbound_entries_carry_their_owner():
    pol = policy.inbound_policy(InterceptConfig())
    e = policy.policy_entries(pol, ["10.0.0.9", "fd00::9"], owner=0x1234567890)
    assert {policy.pod_owner(v) for v in e[policy.MAP_PODS].values()} == {0x1234567890}
    # the owner does not change what tc reads
    assert policy.decode_pod_value(policy.pod_value(pol, owner=42)) == \
        policy.decode_pod_value(policy.pod_value(pol))


class _Ops:
    def __init__(self, table):
        self.table = table

    def map_lookup_elem(self, fd, key, size):
        return self.table.get(key)


def test_detach_takes_only_its_own_or_ownerless_entries():
    pol = policy.inbound_policy(InterceptConfig())
    ops = _Ops({structs.inbound_pod_key("10.0.0.1"): policy.pod_value(pol, owner=7),
                structs.inbound_pod_key("10.0.0.2"): policy.pod_value(pol, owner=0)})
    assert attach._owned(ops, 0, "10.0.0.1", 7)
    assert not attach._owned(ops, 0, "10.0.0.1", 8)
    assert attach._owned(ops, 0, "10.0.0.2", 8)          # written before owners existed
    assert attach._owned(ops, 0, "10.0.0.3", 8)          # no entry: nothing to spare


@pytest.mark.parametrize("raw,want", [("", None), ("16", 16), (" 200000 ", 200000)])
def test_max_conns_override(raw, want):
    assert loader.max_conns({loader.MAX_CONNS_ENV: raw}) == want


@pytest.mark.parametrize("raw", ["0", "1", "-5", "many", str(1 << 30)])
def test_max_conns_override_rejects_nonsense(raw):
    with pytest.raises(UsageError):
        loader.max_conns({loader.MAX_CONNS_ENV: raw})


def test_override_becomes_a_define_before_the_header(monkeypatch):
    monkeypatch.setenv(loader.MAX_CONNS_ENV, "64")
    text = loader.render_source(None)
    assert text.index("#define MB_MAX_CONNS 64") < text.index("==== lib/types.h")
    monkeypatch.delenv(loader.MAX_CONNS_ENV)
    assert "MB_MAX_CONNS 64" not in loader.render_source(None)
    # without sock_release nothing would empty dns_orig: it stays LRU there only
    assert "MB_NO_SOCK_RELEASE" in " ".join(loader.cflags({"cgroup_sock_release": False}))


def test_header_sizes_for_100k_connections_without_lru_where_it_answers_wrong():
    text = loader.header_text()
    assert int(re.search(r"#define MB_MAX_CONNS (\d+)", text).group(1)) >= 100000
    for name in ("orig_dst", "pairs"):
        decl = next(l for l in text.splitlines() if re.search(rf"\b{name}\b, ", l) and "BPF_" in l)
        assert "lru" not in decl, decl
    assert "pod_conns" in loader.MAP_NAMES
    assert structs.COUNTERS.index("conn_refused") == 18
    assert structs.NodeConfig(pod_conn_limit=5).pod_conn_limit == 5
