"""The agent's scheduling without a kernel (stand-in service, slow stand-in drift check):
a pods-file change is handled while a drift check is still running, not after it; a
change touches only the entries that changed; the drift check still covers every pod."""

import json
import time

from meshbpf.agent import reconcile

from .test_agent_daemon import _run, _wait, _write
from .test_agent_reconciler import FakePod

N = 60
PER_POD = 0.005             # the stand-in drift check's cost per pod: 0.3 s for N


def _entry(i):
    return {"name": f"p{i}", "netns": f"/run/netns/p{i}", "cgroup": f"/cg/p{i}"}


def _slow_observe(seen):
    def observe(svc, records, pods):
        out = {}
        for pod_id in records:
            time.sleep(PER_POD)
            seen.append(pod_id)
            out[pod_id] = {"cookie": 7, "drift": []}
        return out
    return observe


def test_a_file_change_is_handled_while_a_drift_check_runs(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(reconcile, "observe", _slow_observe(checked))
    seen = {}

    def script(svc, path, d):
        _write(path, [_entry(i) for i in range(N)])
        assert _wait(lambda: len(svc.store.recs) == N, 5)
        real = svc.attach

        def attach(pod, config, pod_id):
            seen.setdefault("checked_at_attach", len(checked))
            return real(pod, config, pod_id)

        svc.attach = attach
        base = len(checked)
        assert _wait(lambda: len(checked) > base, 5)          # a drift check has begun
        seen["base"] = base
        _write(path, [_entry(i) for i in range(N)] + [_entry(N)])
        assert _wait(lambda: f"p{N}" in svc.attached_at, 5)
        assert _wait(lambda: len(checked) >= base + N, 5)     # and it still covers all

    svc, d = _run(tmp_path, monkeypatch, script, resync=0.3)
    # the change was acted on with most of the drift check still to do
    assert seen["checked_at_attach"] - seen["base"] < N / 2, seen
    assert sorted(svc.store.recs) == sorted(f"p{i}" for i in range(N + 1))


def test_a_change_resolves_only_the_entries_that_changed(tmp_path, monkeypatch):
    resolved = []

    def resolve(want):
        resolved.append(want.id)
        return FakePod(want)

    seen = {}

    def script(svc, path, d):
        monkeypatch.setattr(reconcile, "resolve", resolve)
        _write(path, [_entry(i) for i in range(N)])
        assert _wait(lambda: len(svc.store.recs) == N, 5)
        resolved.clear()
        _write(path, [_entry(i) for i in range(1, N)] + [_entry(N)])   # p0 out, pN in
        assert _wait(lambda: f"p{N}" in svc.store.recs and "p0" not in svc.store.recs, 5)
        seen["resolved"] = sorted(resolved)

        def reported():                 # agent.json is written when the pass has ended
            try:
                return sorted(p["name"] for p in json.load(open(d.state_path))["pods"])
            except (OSError, ValueError):
                return None
        want = sorted(f"p{i}" for i in range(1, N + 1))
        _wait(lambda: reported() == want, 5)
        seen["reported"] = reported()

    svc, d = _run(tmp_path, monkeypatch, script)
    assert seen["resolved"] == [f"p{N}"], seen["resolved"][:10]
    assert seen["reported"] == sorted(f"p{i}" for i in range(1, N + 1))
    assert ("detach", "p0") in svc.calls


def test_drift_ids_cover_desired_and_owned_pods():
    r = reconcile.Reconciler(None, None)
    r.owned = {"gone", "a"}
    assert r.drift_ids({"a": 1, "b": 2}) == ["a", "b", "gone"]
