"""The differential suite's pure part: verdicts from raw probe results, and the rules that
say which issue-9 item explains a difference."""

from tests import differential as D

ADDR = {"a4": "10.233.0.11", "a6": "fd00:6d62::11", "b4": "10.233.0.12", "b6": "fd00:6d62::12",
        "m4": "10.233.0.14", "m6": "fd00:6d62::14", "lo4": "127.0.0.1", "lo6": "::1",
        "all4": "169.254.20.1", "all6": "fe80::a1", "bll4": "169.254.20.2", "bll6": "fe80::b1",
        "late4": D.LATE[0], "late6": D.LATE[1]}
NAMES = {v: k for k, v in ADDR.items()}


def t(tid):
    return next(x for x in D.TRAFFIC if x.id == tid)


def test_verdict_symbolizes_and_drops_ephemeral_ports():
    raw = {"outcome": "ok", "app_peer": ["10.233.0.12", 8080], "app_local": ["10.233.0.11", 40000],
           "rec": {"outcome": "ok", "pod": "a", "port": 15001, "peer": ["::ffff:10.233.0.11", 40000],
                   "local": ["::ffff:127.0.0.1", 15001], "orig": ["10.233.0.12", 8080],
                   "up": {"outcome": "ok", "pod": "b", "port": 8080,
                          "peer": ["fe80::a1%eth0", 1], "orig": "error:ENOENT"}}}
    assert D.verdict(raw, NAMES) == {
        "outcome": "ok", "app_peer": "b4:8080", "app_local": "a4", "seen": "a:15001",
        "orig": "b4:8080", "lpeer": "a4", "up.outcome": "ok", "up.seen": "b:8080",
        "up.orig": "error:ENOENT", "up.lpeer": "all6"}
    refused = D.verdict({"outcome": "ECONNREFUSED", "rec": None}, NAMES)
    assert refused == {"outcome": "ECONNREFUSED", "app_peer": None, "app_local": None, "seen": None}
    assert D.differing_fields(refused, dict(refused, seen="a:15001")) == ["seen"]


def test_every_config_is_valid_and_the_matrix_is_complete():
    from meshbpf.config import InterceptConfig
    for name in D.CONFIGS:
        InterceptConfig.from_dict(D.resolve_config(name, ADDR))
    ids = [x.id for x in D.TRAFFIC]
    assert len(ids) == len(set(ids))
    kinds = {(x.src, x.proto, x.family) for x in D.TRAFFIC}
    assert {("a", "tcp", 4), ("a", "tcp", 6), ("a", "udp", 4), ("a", "udpc", 6),
            ("c", "tcp", 4), ("m", "tcp", 6)} <= kinds
    assert {x.who for x in D.TRAFFIC} == set(D.IDENTITIES)


def test_known_rules_follow_the_oracle_not_the_ebpf_result(monkeypatch):
    # the rules of every item, including those fixed since (their model stays testable)
    monkeypatch.setattr(D, "OPEN", D.OPEN | {D.ITEM1, D.ITEM2, D.ITEM3, D.ITEM8,
                                             D.ITEM10_PROXY_LOCAL, D.ITEM10_DNS,
                                             D.ITEM10_SOCKNAME, D.NEW_LISTENER_PEER})
    cfg = D.resolve_config("default", ADDR)
    captured = {"outcome": "ok", "seen": "a:15001", "app_local": "a4"}
    got = D.known_differences(cfg, t("a.app-tcp-b4-8080"), captured, ADDR)
    assert got == [D.ITEM10_SOCKNAME, D.NEW_LISTENER_PEER]
    assert D.ITEM10_SOCKNAME.covers("app_local") and not D.ITEM10_SOCKNAME.covers("seen")
    # the proxy's own connects are not redirected by either mode: nothing known
    assert D.known_differences(cfg, t("a.proxy-tcp-b4-8080"), {"seen": "b:8080"}, ADDR) == []
    # connected UDP DNS the oracle captured
    dns = D.resolve_config("dns-all", ADDR)
    assert D.ITEM3 in D.known_differences(dns, t("a.app-udpc-b4-53"), {"seen": "a:15053"}, ADDR)
    assert D.ITEM3 not in D.known_differences(cfg, t("a.app-udpc-b4-53"), {"seen": "b:53"}, ADDR)


def test_item2_only_where_an_ipv6_range_covers_ipv4(monkeypatch):
    monkeypatch.setattr(D, "OPEN", D.OPEN | {D.ITEM2})    # the model while item 2 was open
    direct = {"outcome": "ok", "seen": "b:8080"}
    captured = {"outcome": "ok", "seen": "a:15001"}
    excl = D.resolve_config("exclude-v6-all", ADDR)
    assert D.ITEM2 in D.known_differences(excl, t("a.app-tcp-b4-8080"), captured, ADDR)
    assert D.ITEM2 not in D.known_differences(excl, t("a.app-tcp-b6-8080"), direct, ADDR)
    incl = D.resolve_config("include-v6-all", ADDR)
    assert D.ITEM2 in D.known_differences(incl, t("a.app-tcp-b4-8080"), direct, ADDR)
    pods = D.resolve_config("include-v6-pods", ADDR)     # fd00:6d62::/64 holds no IPv4
    assert D.ITEM2 not in D.known_differences(pods, t("a.app-tcp-b4-8080"), direct, ADDR)
    # the model of today's eBPF decision: loopback, own addresses and excludes are left alone
    assert not D._ebpf_captures(D.resolve_config("default", ADDR), t("a.app-tcp-lo4-8080"), ADDR)
    assert D._ebpf_captures(incl, t("a.app-tcp-lo6-8080"), ADDR)
    assert not D._ebpf_captures(D.resolve_config("exclude-b4", ADDR), t("a.app-tcp-b4-8080"), ADDR)
    assert D._ebpf_captures(D.resolve_config("default", ADDR), t("a.app-tcp-all4-8080"), ADDR)


def test_envoy_item1_only_without_the_v6_bind_address(monkeypatch):
    monkeypatch.setattr(D, "OPEN", D.OPEN | {D.ITEM1})    # the model while item 1 was open
    c6 = next(x for x in D.ENVOY_TRAFFIC if x.id == "c-tcp-e6-8080")
    assert D.envoy_known_differences(c6, mode_has_v6_bind=False) == [D.ITEM1]
    assert D.envoy_known_differences(c6, mode_has_v6_bind=True) == []


def test_dropping_a_fixed_item_from_open_stops_expecting_it(monkeypatch):
    monkeypatch.setattr(D, "OPEN", D.OPEN | {D.ITEM2})
    incl = D.resolve_config("include-v6-all", ADDR)
    direct = {"outcome": "ok", "seen": "b:8080"}
    assert D._ebpf_captures(incl, t("a.app-tcp-b4-8080"), ADDR)       # today: ::/0 holds IPv4
    monkeypatch.setattr(D, "OPEN", D.OPEN - {D.ITEM2})
    assert not D._ebpf_captures(incl, t("a.app-tcp-b4-8080"), ADDR)   # fixed: families apart
    assert D._ebpf_captures(incl, t("a.app-tcp-b6-8080"), ADDR)
    assert D.known_differences(incl, t("a.app-tcp-b4-8080"), direct, ADDR) == []


def test_addresses_added_after_attach(monkeypatch):
    # one rule at a time: the TCP listener-peer rule would also name these cases
    monkeypatch.setattr(D, "OPEN", D.OPEN - {D.NEW_LISTENER_PEER})
    cfg = D.resolve_config("default", ADDR)
    # Istio's source for b6 was the later address: only app_local/lpeer may differ
    late_src = {"outcome": "ok", "seen": "a:15001", "app_local": "late6", "lpeer": "late6"}
    got = D.known_differences(cfg, t("a.app-tcp-b6-8080"), late_src, ADDR)
    assert got == [D.NEW_LATE_SOURCE]
    assert D.NEW_LATE_SOURCE.covers("lpeer") and not D.NEW_LATE_SOURCE.covers("seen")
    # the pod's own source (or the late address dialled itself): nothing known
    own = dict(late_src, app_local="a6", lpeer="a6")
    assert D.known_differences(cfg, t("a.app-tcp-b6-8080"), own, ADDR) == []
    # the proxy dialling the later address: Istio's inbound listener, eBPF direct
    inbound = {"outcome": "ok", "seen": "a:15006", "app_local": "late4", "lpeer": "late4"}
    assert D.known_differences(cfg, t("a.proxy-tcp-late4-8080"), inbound, ADDR) == [
        D.NEW_LATE_LOCAL]
    assert D.known_differences(D.resolve_config("proxy-gid-1000", ADDR),
                               t("a.gid1337-tcp-late6-8080"), dict(inbound, seen="a:15006"),
                               ADDR) == []      # gid 1337 is no proxy id there
    assert D.known_differences(cfg, t("a.gid1337-tcp-late6-8080"), inbound, ADDR) == [
        D.NEW_LATE_LOCAL]
    # the app dialling it: Istio direct (-o lo RETURN), eBPF's model captures it
    direct = {"outcome": "ok", "seen": "a:8080", "app_local": "a4", "lpeer": "a4"}
    assert D.known_differences(cfg, t("a.app-tcp-late4-8080"), direct, ADDR) == [
        D.NEW_LATE_LOCAL]
    # ... unless no eBPF rule would capture it either (include-none): nothing known
    assert D.known_differences(D.resolve_config("include-none", ADDR),
                               t("a.app-tcp-late4-8080"), direct, ADDR) == []
    # a connected UDP query whose Istio source was the later address
    dns = D.resolve_config("dns-servers", ADDR)
    got = D.known_differences(dns, t("a.app-udpc-b6-53"),
                              {"outcome": "ok", "seen": "a:15053", "app_local": "late6",
                               "lpeer": "late6"}, ADDR)
    assert got == [D.NEW_LATE_SOURCE]


def test_proxy_to_own_ipv6_link_local_peer(monkeypatch):
    monkeypatch.setattr(D, "OPEN", D.OPEN - {D.NEW_LISTENER_PEER})
    tp = D.resolve_config("inbound-tproxy", ADDR)
    inbound = {"outcome": "ok", "seen": "a:15006", "app_local": "all6", "lpeer": "all6"}
    assert D.known_differences(tp, t("a.gid1337-tcp-all6-8080"), inbound, ADDR) == [
        D.NEW_LINK_LOCAL6_PEER]
    assert D.NEW_LINK_LOCAL6_PEER.covers("lpeer") and not D.NEW_LINK_LOCAL6_PEER.covers("seen")
    # IPv4 link-local: bound like any own address, nothing known
    assert D.known_differences(tp, t("a.gid1337-tcp-all4-8080"), dict(inbound, lpeer="all4"),
                               ADDR) == []
    # REDIRECT mode: Istio times out (its own failure), another rule
    assert D.known_differences(D.resolve_config("default", ADDR), t("a.proxy-tcp-all6-8080"),
                               {"outcome": "timeout", "seen": None}, ADDR) == [D.NEW_LINK_LOCAL6]


def test_the_listener_peer_is_known_for_tcp_only():
    """TCP sockets keep their loopback source (binding them costs new connections); UDP DNS
    sockets are bound, so their listener sees the pod address as under Istio."""
    assert D.NEW_LISTENER_PEER in D.OPEN
    cfg = D.resolve_config("default", ADDR)
    oracle = {"outcome": "ok", "seen": "a:15001", "app_local": "a4", "lpeer": "a4"}
    assert D.NEW_LISTENER_PEER in D.known_differences(cfg, t("a.app-tcp-b4-8080"), oracle, ADDR)
