"""The agent's plan (meshbpf.agent.reconcile.plan) and per-pod backoff: pure."""

from meshbpf.agent import source
from meshbpf.agent.reconcile import Action, Backoff, plan


def _desired(*entries):
    pods, errors = source.parse(__import__("json").dumps({"pods": list(entries)}))
    assert errors == []
    return pods


def _record(want, cookie=100, mode="ebpf", **kw):
    return dict({"id": want.id, "name": want.name, "netns": want.netns or f"/proc/{want.pid}/ns/net",
                 "cgroup": want.cgroup, "netns_cookie": cookie, "mode": mode,
                 "config": want.config_dict()}, **kw)


A = {"name": "a", "netns": "/run/netns/a", "cgroup": "/sys/fs/cgroup/a"}
B = {"name": "b", "pid": 42}


def test_new_pods_are_attached_and_nothing_else_happens():
    d = _desired(A, B)
    assert plan(d, {}) == [Action("attach", "a", "new pod"), Action("attach", "b", "new pod")]


def test_in_sync_pods_need_nothing():
    d = _desired(A, B)
    recs = {i: _record(w) for i, w in d.items()}
    live = {i: {"cookie": 100, "drift": []} for i in d}
    assert plan(d, recs, owned={"a", "b"}, live=live) == []


def test_a_changed_config_is_an_update():
    old = _desired(A)
    new = _desired(dict(A, config={"outbound_ports_exclude": "22"}))
    recs = {"a": _record(old["a"])}
    assert plan(new, recs, live={"a": {"cookie": 100}}) == [Action("update", "a", "config changed")]


def test_a_removed_pod_is_detached_only_if_the_agent_owns_it():
    d = _desired(A)
    b = _desired(B)["b"]
    recs = {"a": _record(d["a"]), "b": _record(b), "by-hand": dict(_record(b), id="by-hand")}
    assert plan(d, recs, owned={"a", "b"}) == [Action("detach", "b", "removed from the pods file")]
    assert plan({}, recs, owned={"a"}) == [Action("detach", "a", "removed from the pods file")]


def test_drift_is_repaired_and_a_recreated_netns_attached_again():
    d = _desired(A, B)
    recs = {i: _record(w) for i, w in d.items()}
    live = {"a": {"cookie": 100, "drift": ["tc filter missing on eth0"]},
            "b": {"cookie": 555, "drift": ["pods map entry missing"]}}
    acts = plan(d, recs, owned=set(d), live=live)
    assert acts == [Action("repair", "a", "drift: tc filter missing on eth0"),
                    Action("attach", "b", "its network namespace was recreated")]


def test_a_pod_moved_to_another_netns_path_is_attached_again():
    d = _desired(A)
    rec = _record(d["a"], netns="/run/netns/old")
    assert [a.kind for a in plan(d, {"a": rec}, live={"a": {"cookie": 100}})] == ["attach"]


def test_unknown_cookie_is_not_taken_for_a_recreated_netns():
    d = _desired(A)
    assert plan(d, {"a": _record(d["a"])}, live={"a": {"cookie": None, "drift": []}}) == []


def test_backoff_doubles_to_the_cap_and_resets():
    b = Backoff(first=0.5, cap=30)
    delays = [b.failed("p", now=0) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.waiting("p", now=10) == 20 and b.waiting("q", now=10) == 0
    assert b.next_due(now=10) == 20
    b.succeeded("p")
    assert b.waiting("p", now=10) == 0 and b.next_due(now=10) is None
    assert b.failed("p", now=0) == 0.5


def test_a_changed_desired_pod_ends_its_backoff():
    b = Backoff()
    b.failed("p", now=0, key="v1")
    b.failed("p", now=0, key="v1")
    assert b.waiting("p", now=0, key="v1") == 1.0
    assert b.waiting("p", now=0, key="v2") == 0
    assert b.failed("p", now=0, key="v2") == 0.5      # a new want starts from the first delay
    b.forget(keep=set())
    assert b.next_due(now=0) is None


def test_ipv6_turned_on_by_the_backend_for_a_dual_stack_pod_is_not_a_change():
    d = _desired(A)
    rec = _record(d["a"])
    rec["config"] = dict(rec["config"], enable_ipv6=True)
    assert plan(d, {"a": rec}, live={"a": {"cookie": 100}}) == []
    d6 = _desired(dict(A, config={"enable_ipv6": True}))
    rec6 = _record(d6["a"])
    assert [a.kind for a in plan(d, {"a": rec6}, live={"a": {"cookie": 100}})] == []
    assert [a.kind for a in plan(d6, {"a": _record(d["a"])}, live={"a": {"cookie": 100}})] \
        == ["update"]


def test_a_host_entry_resolves_to_the_agents_own_netns_scoped_by_its_cgroup(tmp_path):
    """resolve() only reads /proc and the cgroup mount: "host": true means the agent's own
    netns (here: this process's); a host entry on the cgroup root, on another netns, or the
    machine's netns without "host": true are refused, nothing changed."""
    import dataclasses
    import os
    import pytest
    from meshbpf import system
    from meshbpf.agent.reconcile import resolve
    from meshbpf.errors import UsageError
    mine = tmp_path / "app.slice"         # Pod checks only that cgroup.procs is there
    mine.mkdir()
    (mine / "cgroup.procs").write_text("")
    mine = str(mine)
    entry = {"name": "vm", "netns": "/proc/self/ns/net", "cgroup": mine, "host": True,
             "inbound_interfaces": ["eth0"]}
    want = _desired(entry)["vm"]
    pod = resolve(want)
    assert pod.host is True and pod.inbound_interfaces == ["eth0"]
    assert pod.host_fields() == {"host": True, "inbound_interfaces": ["eth0"]}
    with pytest.raises(UsageError, match="cgroup of its own"):
        resolve(dataclasses.replace(want, cgroup=system.cgroup2_mount()))
    with pytest.raises(UsageError, match="host"):
        resolve(dataclasses.replace(want, host=False, inbound_interfaces=None,
                                    netns=f"/proc/{os.getpid()}/ns/net"))
    other = tmp_path / "ns"        # any file that is not our netns
    other.write_text("")
    with pytest.raises(UsageError, match="another one"):
        resolve(dataclasses.replace(want, netns=str(other)))


def test_changed_host_interfaces_attach_again():
    e = {"name": "vm", "pid": 1, "host": True, "inbound_interfaces": ["eth0"]}
    old = _desired(e)["vm"]
    rec = _record(old, host=True, inbound_interfaces=["eth0"])
    assert plan({"vm": old}, {"vm": rec}, live={"vm": {"cookie": 100}}) == []
    new = _desired(dict(e, inbound_interfaces="*"))
    assert [a.kind for a in plan(new, {"vm": rec}, live={"vm": {"cookie": 100}})] == ["attach"]
    assert [a.kind for a in plan({"vm": old}, {"vm": _record(old)},
                                 live={"vm": {"cookie": 100}})] == ["attach"]
