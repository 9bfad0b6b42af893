"""The Reconciler against a stand-in service (no kernel): one failing pod backs off and
keeps its error while the others are served; a fixed entry is retried at once."""

import json

from meshbpf.agent import reconcile, source
from meshbpf.errors import ApplyError


class FakeStore:
    def __init__(self):
        self.recs = {}

    def all(self):
        return list(self.recs.values())

    def load(self, pod_id):
        return self.recs.get(pod_id)


class FakeService:
    def __init__(self, failing=()):
        self.store, self.failing, self.calls = FakeStore(), set(failing), []

    def attach(self, pod, config, pod_id):
        self.calls.append(("attach", pod_id))
        if pod_id in self.failing:
            raise ApplyError(f"{pod_id} cannot be attached")
        rec = {"id": pod_id, "name": pod.name, "netns": pod.netns, "cgroup": pod.cgroup,
               "netns_cookie": 7, "mode": "ebpf", "config": config.to_dict()}
        self.store.recs[pod_id] = rec
        return rec

    def detach(self, pod_id):
        self.calls.append(("detach", pod_id))
        self.store.recs.pop(pod_id)


class FakePod:
    netns_cookie = 7

    def __init__(self, want):
        self.name, self.netns, self.cgroup = want.name, want.netns, want.cgroup


def _desired(*names, cfg=None):
    doc = {"pods": [{"name": n, "netns": f"/run/netns/{n}", "cgroup": f"/cg/{n}",
                     "config": cfg or {}} for n in names]}
    return source.parse(json.dumps(doc))[0]


def test_one_failing_pod_backs_off_and_the_others_are_served(monkeypatch):
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    now = [0.0]
    svc = FakeService(failing={"bad"})
    r = reconcile.Reconciler(svc, None, clock=lambda: now[0])
    due = r.run(_desired("a", "bad", "c"))
    assert sorted(svc.store.recs) == ["a", "c"] and due == 0.5
    st = {p["id"]: p for p in r.report()}
    assert st["a"]["state"] == st["c"]["state"] == "attached"
    assert st["bad"]["state"] == "error" and "cannot be attached" in st["bad"]["last_error"]
    svc.calls.clear()
    now[0] = 0.2                                   # still backing off: not tried
    r.run(_desired("a", "bad", "c"))
    assert svc.calls == [] and r.report()[1]["state"] == "backoff"
    now[0] = 0.6                                   # due: tried, fails, waits twice as long
    assert r.run(_desired("a", "bad", "c")) == 1.0
    assert svc.calls == [("attach", "bad")]
    svc.failing.clear()                            # fixed: served on the next try
    now[0] = 1.7
    assert r.run(_desired("a", "bad", "c")) is None
    st = {p["id"]: p for p in r.report()}
    assert st["bad"]["state"] == "attached" and st["bad"]["last_error"] is None


def test_a_changed_entry_is_retried_at_once_and_removed_pods_detached(monkeypatch):
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    svc = FakeService(failing={"bad"})
    r = reconcile.Reconciler(svc, None, clock=lambda: 0.0)
    r.run(_desired("a", "bad"))
    svc.calls.clear()
    r.run(_desired("a", "bad", cfg={"outbound_ports_exclude": "22"}))
    assert ("attach", "bad") in svc.calls           # a new config ends the backoff
    svc.calls.clear()
    r.run(_desired("bad"))
    assert svc.calls == [("attach", "bad"), ("detach", "a")] or \
        svc.calls == [("detach", "a"), ("attach", "bad")]
    assert [p["id"] for p in r.report()] == ["bad"]


def test_an_unexpected_exception_is_that_pods_error_only(monkeypatch):
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    svc = FakeService()
    real = svc.attach

    def attach(pod, config, pod_id):
        if pod_id == "boom":
            raise RuntimeError("a bug")
        return real(pod, config, pod_id)

    svc.attach = attach
    r = reconcile.Reconciler(svc, None, clock=lambda: 0.0)
    r.run(_desired("a", "boom"))
    st = {p["id"]: p for p in r.report()}
    assert st["a"]["state"] == "attached"
    assert st["boom"]["state"] == "error" and "a bug" in st["boom"]["last_error"]
