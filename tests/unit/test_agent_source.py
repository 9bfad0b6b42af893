"""The pods file (meshbpf.agent.source): per-entry errors, whole-file errors, host entries."""

import json

import pytest

from meshbpf.agent import source
from meshbpf.config import InterceptConfig


def _parse(doc):
    return source.parse(json.dumps(doc) if not isinstance(doc, str) else doc)


def test_json_and_yaml_give_the_same_pods():
    doc = {"pods": [{"name": "web", "pid": 4242},
                    {"name": "db", "id": "uid-1", "netns": "db", "cgroup": "/sys/fs/cgroup/db",
                     "config": {"outbound_ip_ranges_exclude": "10.96.0.0/12",
                                "outbound_ports_exclude": "22"}}]}
    yaml_text = """
pods:
  - {name: web, pid: 4242}
  - name: db
    id: uid-1
    netns: db
    cgroup: /sys/fs/cgroup/db
    config:
      outbound_ip_ranges_exclude: 10.96.0.0/12
      outbound_ports_exclude: "22"
"""
    a, errs_a = _parse(doc)
    b, errs_b = _parse(yaml_text)
    assert errs_a == errs_b == []
    assert a == b
    assert sorted(a) == ["uid-1", "web"]                  # the id defaults to the name
    assert a["web"].pid == 4242 and a["web"].netns is None
    assert a["uid-1"].netns == "/run/netns/db" and a["uid-1"].cgroup == "/sys/fs/cgroup/db"
    assert a["uid-1"].config == InterceptConfig.from_dict(doc["pods"][1]["config"])
    assert a["web"].config == InterceptConfig()


@pytest.mark.parametrize("entry, words", [
    ({"pid": 1}, "name"),
    ({"name": "x", "host": True}, "host workload"),
    ({"name": "ns/x", "cgroup": "relative"}, "cgroup"),
    ({"name": "x", "pid": 5, "netns": "/run/netns/x", "cgroup": "/c"}, "exactly one"),
    ({"name": "x", "pid": "5"}, "positive integer"),
    ({"name": "x", "pid": True}, "positive integer"),
    ({"name": "x", "pid": 5, "cgroup": "/c"}, "cgroup"),
    ({"name": "x", "netns": "/run/netns/x"}, "cgroup"),
    ({"name": "x", "netns": "/run/netns/x", "cgroup": "relative"}, "cgroup"),
    ({"name": "bad name"}, "id"),
    ({"name": "x", "pid": 5, "config": {"no_such_field": 1}}, "no_such_field"),
    ({"name": "x", "pid": 5, "config": {"outbound_ip_ranges_exclude": "10.0.0.300/8"}}, "config"),
    ({"name": "x", "pid": 5, "config": "nope"}, "config"),
    ({"name": "x", "pid": 5, "colour": "red"}, "colour"),
    ({"name": "x", "pid": 5, "host": "yes"}, "host"),
    ("just a string", "object"),
])
def test_a_bad_entry_is_an_error_for_it_alone(entry, words):
    pods, errors = _parse({"pods": [{"name": "good", "pid": 10}, entry, {"name": "ok2", "pid": 11}]})
    assert sorted(pods) == ["good", "ok2"]
    assert len(errors) == 1 and errors[0].index == 1
    assert words in errors[0].reason, errors[0].reason
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        assert errors[0].name == entry["name"]


@pytest.mark.parametrize("text", ["", "   \n", '{"pods": [{"name": "a", "pid": 1', "pods: [ {name: a",
                                  "[1, 2]", '{"pods": {}}', '{"pods": [], "extra": 1}', "hello"])
def test_a_file_that_does_not_parse_as_a_whole_is_refused(text):
    with pytest.raises(source.PodsFileError):
        source.parse(text)


def test_an_empty_pod_list_is_valid():
    assert source.parse('{"pods": []}') == ({}, [])


def test_duplicate_ids_and_names_are_errors_for_every_entry_concerned():
    pods, errors = _parse({"pods": [
        {"name": "a", "pid": 10}, {"name": "b", "id": "a", "pid": 11},     # id a twice
        {"name": "c", "pid": 12}, {"name": "c", "id": "c2", "pid": 13},    # name c twice
        {"name": "d", "pid": 14}]})
    assert sorted(pods) == ["d"]
    assert [e.index for e in errors] == [0, 1, 2, 3]
    assert all("duplicate" in e.reason for e in errors)
    assert "id 'a'" in errors[0].reason and "name 'c'" in errors[3].reason


@pytest.mark.parametrize("entry", [
    {"name": "vm", "netns": "/proc/1/ns/net", "cgroup": "/sys/fs/cgroup/app.slice"},
    {"name": "vm", "netns": "/proc/self/ns/net", "cgroup": "/sys/fs/cgroup/app.slice"},
    {"name": "vm", "pid": 1},
])
def test_the_host_netns_needs_host_true(entry):
    pods, errors = _parse({"pods": [entry]})
    assert pods == {} and "host" in errors[0].reason
    pods, errors = _parse({"pods": [dict(entry, host=True, inbound_interfaces=["eth0"])]})
    assert errors == [] and pods["vm"].host is True
    assert pods["vm"].inbound_interfaces == ("eth0",)


@pytest.mark.parametrize("extra, reason", [
    ({}, "must say where its inbound traffic is captured"),
    ({"inbound_interfaces": []}, "non-empty list"),
    ({"inbound_interfaces": "eth0"}, "non-empty list"),
    ({"inbound_interfaces": ["lo"]}, "not an interface name"),
    ({"inbound_interfaces": ["a" * 16]}, "not an interface name"),
    ({"inbound_interfaces": ["eth0", "eth0"]}, "twice"),
    ({"inbound_interfaces": [3]}, "not an interface name"),
])
def test_a_host_entry_names_where_inbound_is_captured(extra, reason):
    """Inbound capture on the host is the whole machine's: never a default."""
    entry = dict({"name": "vm", "netns": "/proc/1/ns/net", "cgroup": "/sys/fs/cgroup/app.slice",
                  "host": True}, **extra)
    pods, errors = _parse({"pods": [entry]})
    assert pods == {} and reason in errors[0].reason
    pods, errors = _parse({"pods": [dict(entry, inbound_interfaces="*")]})
    assert errors == [] and pods["vm"].inbound_interfaces == "*"


def test_inbound_interfaces_only_with_host():
    pods, errors = _parse({"pods": [{"name": "p", "netns": "p", "cgroup": "/c",
                                     "inbound_interfaces": ["eth0"]}]})
    assert pods == {} and "for host entries" in errors[0].reason


def test_changed_inbound_interfaces_change_the_spec():
    e = {"name": "vm", "pid": 1, "host": True}
    a, _ = _parse({"pods": [dict(e, inbound_interfaces=["eth0"])]})
    b, _ = _parse({"pods": [dict(e, inbound_interfaces="*")]})
    assert a["vm"].spec() != b["vm"].spec()


def test_spec_and_config_identify_what_changed():
    a, _ = _parse({"pods": [{"name": "x", "netns": "/run/netns/x", "cgroup": "/c"}]})
    b, _ = _parse({"pods": [{"name": "x", "netns": "/run/netns/x", "cgroup": "/c",
                             "config": {"outbound_ports_exclude": "22"}}]})
    assert a["x"].spec() == b["x"].spec()
    assert a["x"].config_dict() != b["x"].config_dict()


def test_a_pending_entry_is_completed_by_its_cni_binding_only():
    pods, errors = _parse({"pods": [{"name": "shop/web-0"},
                                    {"name": "shop/db-0", "cgroup": "/sys/fs/cgroup/db"},
                                    {"name": "web", "pid": 42}]})
    assert errors == []
    assert sorted(pods) == ["shop:db-0", "shop:web-0", "web"]   # "/" becomes ":" in the id
    assert pods["shop:web-0"].pending and not pods["web"].pending
    served, waiting = source.complete(pods, {})
    assert sorted(served) == ["web"] and sorted(p.name for p in waiting) == ["shop/db-0", "shop/web-0"]
    bind = {"shop/web-0": {"netns": "/run/netns/cni-1", "cgroup": "/sys/fs/cgroup/k/pod1"},
            "shop/db-0": {"netns": "/run/netns/cni-2", "cgroup": "/sys/fs/cgroup/k/pod2"},
            "other/x": {"netns": "/run/netns/cni-3"}}
    served, waiting = source.complete(pods, bind)
    assert waiting == [] and sorted(served) == ["shop:db-0", "shop:web-0", "web"]
    assert served["shop:web-0"].netns == "/run/netns/cni-1"
    assert served["shop:web-0"].cgroup == "/sys/fs/cgroup/k/pod1"
    assert served["shop:db-0"].cgroup == "/sys/fs/cgroup/db"     # the entry's own cgroup wins
    assert served["web"] is pods["web"]


def test_lookup_by_namespace_name_or_uid():
    pods, _ = _parse({"pods": [{"name": "shop/web-0"}, {"name": "api", "id": "uid-7", "pid": 3}]})
    assert source.lookup(pods, "shop", "web-0", "u1").id == "shop:web-0"
    assert source.lookup(pods, "shop", "api", "uid-7").id == "uid-7"
    assert source.lookup(pods, "shop", "nope", "u2") is None
    assert source.lookup(pods, None, "web-0") is None
    assert source.lookup(None, "shop", "web-0") is None
