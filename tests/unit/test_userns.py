"""A pod's user namespace maps its proxy ids to the host ids eBPF sees (pure)."""

import os

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import structs
from meshbpf.errors import UsageError
from meshbpf.pod import Pod
from meshbpf.userns import IdMap, parse_map, to_host

HOST_USERS_FALSE = "         0     100000      65536\n"


def test_parse_and_map():
    ranges = parse_map(HOST_USERS_FALSE)
    assert ranges == [(0, 100000, 65536)]
    assert to_host(1337, ranges) == 101337
    assert to_host(0, ranges) == 100000
    assert to_host(65535, ranges) == 165535
    assert to_host(65536, ranges) is None
    split = parse_map("0 1000 1\n1 200000 9999\n")
    assert to_host(0, split) == 1000 and to_host(1337, split) == 201336
    assert parse_map("") == []


def test_bad_map_is_a_usage_error():
    for bad in ("0 100000\n", "a b c\n", "0 -1 5\n"):
        with pytest.raises(UsageError):
            parse_map(bad)


def test_idmap_identity_and_unmapped_ids():
    assert IdMap().identity
    assert IdMap.from_text("0 0 4294967295\n", "0 0 4294967295\n").identity
    m = IdMap.from_text(HOST_USERS_FALSE, "0 300000 65536\n")
    assert not m.identity
    assert m.host_uids([1337, 0]) == [101337, 100000]
    assert m.host_gids([1337]) == [301337]
    assert m.host_uids([70000]) == [70000]        # outside the map: no process can have it
    assert m.to_dict() == {"uid_map": [[0, 100000, 65536]], "gid_map": [[0, 300000, 65536]]}


def test_pod_struct_stores_host_ids():
    cfg = InterceptConfig(proxy_uid="1337", proxy_gid="1337", owner_groups_exclude="1001,1002")
    m = IdMap.from_text(HOST_USERS_FALSE, "0 300000 65536\n")
    pc = structs.pod_struct(cfg, 1, m)
    assert list(pc.uids[:pc.n_uids]) == [101337]
    assert list(pc.gids[:pc.n_gids]) == [301337]
    assert list(pc.owner_gids[:pc.n_owner_gids]) == [301001, 301002]
    plain = structs.pod_struct(cfg, 1)
    assert list(plain.uids[:plain.n_uids]) == [1337]
    assert bytes(structs.pod_struct(cfg, 1, IdMap())) == bytes(plain)


def test_a_pod_in_our_own_user_namespace_has_none():
    pod = Pod(netns="/proc/self/ns/net", pid=os.getpid(), name="self")
    assert pod.user_namespace() is None
