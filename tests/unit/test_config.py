"""InterceptConfig: Istio names, parsing, validation."""

import ipaddress
import json

import pytest

from meshbpf.config import InterceptConfig, parse_cidrs, parse_ports, split_list
from meshbpf.errors import UsageError


def test_defaults_are_istio_injector_defaults():
    c = InterceptConfig().validate()
    assert (c.proxy_port, c.inbound_capture_port, c.inbound_tunnel_port) == (15001, 15006, 15008)
    assert c.proxy_uids() == [1337] and c.proxy_gids() == [1337]
    assert c.inbound_ports() == ("*", [15020, 15021, 15090])
    assert c.outbound_cidrs() == ("*", [])


def test_field_names_match_conformance_cases(shared_dir):
    with open(f"{shared_dir}/conformance/istio-iptables/cases.json") as f:
        base = json.load(f)["base"]
    cfg = InterceptConfig.from_dict(base)
    assert set(cfg.to_dict()) == set(base)
    assert cfg.to_dict() == base


@pytest.mark.parametrize("field,value,needle", [
    ("outbound_ip_ranges_exclude", "10.0.0.0/33", "not a valid CIDR"),
    ("outbound_ip_ranges_include", "10.0.0.0/8,*", "cannot be combined"),
    ("inbound_ports_include", "80,70000", "out of range"),
    ("outbound_ports_exclude", "http", "not a port number"),
    ("proxy_uid", "no-such-user-xyz", "neither a number nor a known name"),
    ("proxy_port", "0", "out of range"),
    ("inbound_interception_mode", "DNAT", "REDIRECT or TPROXY"),
    ("dns_servers_v4", "::1", "not an IPv4 address"),
])
def test_invalid_values_are_named(field, value, needle):
    with pytest.raises(UsageError) as e:
        InterceptConfig().replace(**{field: value})
    assert field in str(e.value) and needle in str(e.value)


def test_unknown_field_is_rejected():
    with pytest.raises(UsageError, match="unknown config field"):
        InterceptConfig.from_dict({"proxy_prot": 1})


def test_json_roundtrip_and_coercion():
    c = InterceptConfig.from_dict({"proxy_port": "15002", "redirect_dns": "true",
                                   "dns_servers_v4": "10.0.0.10, 10.0.0.11",
                                   "outbound_ports_exclude": [22, 53]})
    assert c.proxy_port == 15002 and c.redirect_dns is True
    assert c.dns_servers_v4 == ["10.0.0.10", "10.0.0.11"]
    assert c.outbound_ports() == ([], [22, 53])
    assert InterceptConfig.from_json(c.to_json()) == c


def test_parsers():
    assert split_list(" a, ,b ") == ["a", "b"]
    assert parse_ports("") == [] and parse_ports("*") == "*"
    assert parse_cidrs("10.1.2.3,fd00::/8") == [ipaddress.ip_network("10.1.2.3/32"),
                                                ipaddress.ip_network("fd00::/8")]


def test_bad_json_is_a_usage_error():
    with pytest.raises(UsageError, match="not valid JSON"):
        InterceptConfig.from_json("{")


def test_a_config_is_parsed_once_for_both_backends(monkeypatch):
    """Both generators (eBPF map packing, Istio's rules) read one resolved form: the list
    fields are split and parsed once, not at every step."""
    import meshbpf.config as config
    from meshbpf.ebpf import structs
    from meshbpf.iptables import rules
    calls = []
    real = config._resolve
    monkeypatch.setattr(config, "_resolve", lambda cfg: calls.append(1) or real(cfg))
    cfg = config.InterceptConfig(outbound_ip_ranges_exclude="10.0.0.0/8,fd00::/8",
                                 outbound_ports_exclude="22,23", owner_groups_exclude="0",
                                 inbound_ports_include="8080", enable_ipv6=True)
    structs.pod_struct(cfg, 1)
    structs.pod_rules(cfg)
    rules.render_all(cfg)
    cfg.inbound_ports(), cfg.outbound_cidrs(), cfg.proxy_uids()
    assert calls == [1]
    r = cfg.resolved()
    assert [str(i) for i in r.outbound_exclude.family(6)] == ["fd00::/8"]
    assert r.outbound_ports_exclude.numbers == (22, 23) and r.inbound_include.numbers == (8080,)
    cfg.outbound_ports_exclude = "24"              # a changed field is resolved again
    assert cfg.outbound_ports() == ([], [24]) and calls == [1, 1]
