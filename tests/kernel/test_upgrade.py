"""Upgrading the pinned BPF programs in place (issue 11, item 3): a program set of another
version replaces the pinned one while a pod's app connects in a loop through its Envoy
sidecar, keeping every map (and so every pod) as it is; a map whose layout changed is
refused with nothing changed."""

import json
import os
import threading
import time

import pytest

from meshbpf import bpfsys
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs, upgrade
from meshbpf.ebpf.inbound import tc
from meshbpf.ebpf.maps import Maps
from meshbpf.errors import UnsupportedError
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, pod_python
from meshbpf.testbed.traffic import CONNECT_LOOP as LOOP

pytestmark = pytest.mark.kernel

CFG = InterceptConfig(outbound_ip_ranges_exclude="10.250.0.0/16", outbound_ports_exclude="22")


def _prog_ids(pin_prefix):
    out = {}
    for name in loader.pinned(pin_prefix)["progs"]:
        fd = loader.prog_fd(pin_prefix, name)
        try:
            out[name] = bpfsys.prog_get_info(fd)["id"]
        finally:
            os.close(fd)
    return out


def _maps(pin_prefix):
    """{map: (map id, {key: value})} for every pinned map but the per-connection ones
    (connections of the loop come and go), the counters and the trace events (a ring
    buffer has no keys: its id is compared)."""
    out = {}
    skip = {"orig_dst", "pairs", "sock_hash", "dns_orig", "counters", "pod_conns",
            "splice_dirs", "inbound_tw", "capture_listeners"}
    d = loader.pin_dirs(pin_prefix)["maps"]
    for name in sorted(os.listdir(d)):
        fd = bpfsys.obj_get(os.path.join(d, name))
        try:
            info = bpfsys.map_get_info(fd)
            entries = {}
            if name not in skip and info["type"] != bpfsys.BPF_MAP_TYPE_RINGBUF:
                for k in bpfsys.map_keys(fd, info["key_size"]):
                    entries[k] = bpfsys.map_lookup_elem(fd, k, info["value_size"])
            out[name] = (info["id"], entries)
        finally:
            os.close(fd)
    return out


def _cgroup_ids(cgroup_root):
    fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {name: set(bpfsys.prog_query(fd, spec.attach_type)[1])
                for name, spec in ((p.name, p) for p in loader.PROGRAMS)
                if spec.target == "cgroup"}
    finally:
        os.close(fd)


def test_upgrade_while_the_app_connects_through_the_sidecar(monkeypatch):
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    with Sandbox(name="upgrade") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            rec = svc.attach(a.pod, CFG, pod_id="a")
            ebpf = svc.backend("ebpf")
            old_ids = _prog_ids(sb.pin_prefix)
            old_maps = _maps(sb.pin_prefix)
            old_meta = loader.read_meta(sb.pin_prefix)
            assert old_meta.get("version") and old_meta.get("maps", {}).get("pods")
            assert [h["prog_id"] for h in tc.list_hooks(a.pod)] == \
                [old_ids["tc_inbound_ingress"]] * len(rec["inbound"]["interfaces"])
            # the same code again is the same version: nothing is replaced
            same = upgrade.upgrade_programs(sb.pin_prefix, ebpf.root, ebpf.features,
                                            ebpf.splice, ebpf.repoint_tc)
            assert same is None
            assert _prog_ids(sb.pin_prefix) == old_ids

            before = env.stats().get("tcp.outbound.downstream_cx_total", 0)
            result = {}
            t = threading.Thread(target=lambda: result.update(r=a.exec(
                [pod_python(), "-c", LOOP, b.ip4, "8080", "12"], uid=1000, timeout=90)))
            t.start()
            time.sleep(1.5)              # the loop is connecting
            monkeypatch.setenv(loader.EXTRA_CFLAGS_ENV, "-DMB_UPGRADE_TEST=1")
            res = upgrade.upgrade_programs(sb.pin_prefix, ebpf.root, ebpf.features,
                                           ebpf.splice, ebpf.repoint_tc)
            upgraded_during_loop = t.is_alive()
            t.join()
            r = result["r"]
            ok, fail = map(int, r.stdout.split())
            assert upgraded_during_loop, "the upgrade outlasted the client loop: prove nothing"
            assert fail == 0, r.stderr[-2000:]
            assert ok >= 30, ok
            after = env.stats().get("tcp.outbound.downstream_cx_total", 0)
            assert after - before == ok          # every connection went through the sidecar

            up = res
            assert up and up["from"] == old_meta["version"] and up["to"] != up["from"]
            assert loader.read_meta(sb.pin_prefix)["version"] == up["to"]
            new_ids = _prog_ids(sb.pin_prefix)
            assert set(new_ids) == set(old_ids)
            assert all(new_ids[n] != old_ids[n] for n in old_ids), (old_ids, new_ids)
            replaced = {x["program"]: x for x in up["replaced"]}
            assert set(replaced) == set(old_ids)
            # where each runs now: the new programs only
            for name, ids in _cgroup_ids(ebpf.root).items():
                if name in old_ids:
                    assert new_ids[name] in ids and old_ids[name] not in ids, (name, ids)
                    assert replaced[name]["how"] in ("link_update", "prog_attach(REPLACE)",
                                                     "attach-then-detach")
            assert [h["prog_id"] for h in tc.list_hooks(a.pod)] == \
                [new_ids["tc_inbound_ingress"]] * len(rec["inbound"]["interfaces"])
            # every pinned link (cgroup hooks, the pod's sk_lookup) runs a new program
            links = loader.pin_dirs(sb.pin_prefix)["links"]
            linked = {}
            for name in os.listdir(links):
                fd = bpfsys.obj_get(os.path.join(links, name))
                try:
                    linked[name] = bpfsys.link_get_info(fd)["prog_id"]
                finally:
                    os.close(fd)
            assert linked and set(linked.values()) <= set(new_ids.values()), linked
            if rec["inbound"]["sk_lookup"]["enabled"]:
                assert linked[f"sk_lookup-{a.pod.netns_cookie}"] == new_ids["mb_sk_lookup"]
                assert replaced["mb_sk_lookup"]["how"] == "link_update (1 pod sk_lookup links)"
            # the same maps (ids) with the pod's entries as they were
            new_maps = _maps(sb.pin_prefix)
            assert set(new_maps) == set(old_maps)
            for name, (mid, entries) in old_maps.items():
                assert new_maps[name][0] == mid, name
                assert new_maps[name][1] == entries, name
            # and the pod keeps working after the upgrade: a new connection via Envoy
            r2 = a.exec([pod_python(), "-c", LOOP, b.ip4, "8080", "1"], uid=1000, timeout=30)
            ok2, fail2 = map(int, r2.stdout.split())
            assert fail2 == 0 and ok2 > 0
            assert env.stats().get("tcp.outbound.downstream_cx_total", 0) - after == ok2
            # the upgraded set is this code's version now: a second call changes nothing
            again = upgrade.upgrade_programs(sb.pin_prefix, ebpf.root, ebpf.features,
                                             ebpf.splice, ebpf.repoint_tc)
            assert again is None and _prog_ids(sb.pin_prefix) == new_ids
        finally:
            svc.cleanup()


def _state(pin_prefix):
    return (_prog_ids(pin_prefix), {n: m[0] for n, m in _maps(pin_prefix).items()},
            loader.read_meta(pin_prefix), loader.pinned(pin_prefix))


def test_a_changed_map_layout_is_refused_with_nothing_changed(monkeypatch):
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    monkeypatch.setenv(loader.MAX_CONNS_ENV, "4096")
    with Sandbox(name="upglayout") as sb:
        a = sb.add_pod("a")
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            svc.attach(a.pod, CFG, pod_id="a")
            ebpf = svc.backend("ebpf")
            state = _state(sb.pin_prefix)
            cg = _cgroup_ids(ebpf.root)

            def upgrade_now():
                return upgrade.upgrade_programs(sb.pin_prefix, ebpf.root, ebpf.features,
                                                ebpf.splice, ebpf.repoint_tc)

            # 1. the connection maps grew: cannot be resized, refused
            monkeypatch.setenv(loader.MAX_CONNS_ENV, "8192")
            with pytest.raises(UnsupportedError) as ei:
                upgrade_now()
            assert ei.value.exit_code == 4
            assert "map orig_dst: max_entries 4096 -> 8192" in str(ei.value)
            assert "nothing changed" in str(ei.value)
            assert _state(sb.pin_prefix) == state and _cgroup_ids(ebpf.root) == cg

            # 2. a struct whose layout changed (simulated: the pinned set says its pods map
            # had another C layout), sizes all equal
            monkeypatch.setenv(loader.MAX_CONNS_ENV, "4096")
            monkeypatch.setenv(loader.EXTRA_CFLAGS_ENV, "-DMB_UPGRADE_TEST=1")
            meta = loader.read_meta(sb.pin_prefix)
            meta["maps"]["pods"]["layout"] = "0" * 16
            loader.write_meta(sb.pin_prefix, meta)
            state = _state(sb.pin_prefix)
            with pytest.raises(UnsupportedError, match=r"map pods: its key or value C struct"):
                upgrade_now()
            assert _state(sb.pin_prefix) == state and _cgroup_ids(ebpf.root) == cg
            # the pod is still enrolled in the maps it had
            with Maps(sb.pin_prefix) as m:
                assert m["pods"].lookup(structs.U64(a.pod.netns_cookie)) is not None
        finally:
            svc.cleanup()


def test_a_new_service_with_upgrade_replaces_the_programs_and_one_without_adopts(monkeypatch):
    """The agent's path: a new process (NodeService) finds the pins of another version;
    with upgrade it replaces them on its first attach and records the version in node.json;
    without it (the default) it adopts them as before."""
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    with Sandbox(name="upgsvc") as sb:
        a, b, c = sb.add_pod("a"), sb.add_pod("b"), sb.add_pod("c")
        node = {"mode": "ebpf", "pin_prefix": sb.pin_prefix, "cgroup_root": sb.cgroup_root}
        svc = NodeService(**node)
        try:
            svc.attach(a.pod, CFG, pod_id="a")
            old_ids = _prog_ids(sb.pin_prefix)
            monkeypatch.setenv(loader.EXTRA_CFLAGS_ENV, "-DMB_UPGRADE_TEST=2")
            adopting = NodeService(**node)
            adopting.attach(b.pod, CFG, pod_id="b")
            assert _prog_ids(sb.pin_prefix) == old_ids          # default: adopt as before
            upgrading = NodeService(upgrade=True, **node)
            rec = upgrading.attach(c.pod, CFG, pod_id="c")
            new_ids = _prog_ids(sb.pin_prefix)
            assert rec["programs"] == new_ids
            assert all(new_ids[n] != old_ids[n] for n in old_ids)
            version = loader.read_meta(sb.pin_prefix)["version"]
            with open(upgrading.backend("ebpf").node_file) as f:
                assert json.load(f)["version"] == version
            with Maps(sb.pin_prefix) as m:
                for p in (a, b, c):
                    assert m["pods"].lookup(structs.U64(p.pod.netns_cookie)) is not None
        finally:
            svc.cleanup()
