"""The agent's loop without a kernel (a stand-in service): a pods-file change is acted on
within 100 ms, a half-written file is not, SIGTERM stops it leaving the pods attached,
and agent.json says what it did."""

import contextlib
import json
import os
import signal
import threading
import time

from meshbpf.agent import daemon, reconcile

from .test_agent_reconciler import FakePod, FakeService


class LoopService(FakeService):
    def __init__(self, instance_dir):
        super().__init__()
        self.store.instance_dir = instance_dir
        self.store.ids = lambda: sorted(self.store.recs)
        self.store.locked = contextlib.nullcontext
        self.attached_at = {}
        self.cleaned = False

    def probe(self):
        return {"mode": "iptables", "features": {}}

    def choose_mode(self):
        return "iptables", "stand-in"

    def adopt(self):
        return {"pods": list(self.store.recs), "stale": []}

    def attach(self, pod, config, pod_id):
        self.attached_at[pod_id] = time.monotonic()
        return super().attach(pod, config, pod_id)

    def cleanup(self):
        self.cleaned = True


def _write(path, pods):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pods": pods}, f)
    os.replace(tmp, path)


def _run(tmp_path, monkeypatch, script, **kw):
    """Run the daemon in this (main) thread while `script(svc, path, d)` acts from another;
    the script ends the daemon with SIGTERM."""
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    path = str(tmp_path / "pods.json")
    _write(path, [])
    svc = LoopService(str(tmp_path / "state"))
    kw.setdefault("resync", 30)
    d = daemon.Daemon(svc, path, **kw)
    errors = []

    def body():
        try:
            script(svc, path, d)
        except BaseException as e:      # noqa: BLE001 - reported by the test below
            errors.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=body)
    t.start()
    d.run()
    t.join()
    if errors:
        raise errors[0]
    return svc, d


def _wait(pred, timeout=2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return False


def test_a_change_is_acted_on_within_100_ms_and_garbage_is_not(tmp_path, monkeypatch):
    seen = {}

    def script(svc, path, d):
        assert _wait(lambda: os.path.exists(d.state_path))          # first reconcile done
        t0 = time.monotonic()
        _write(path, [{"name": "a", "netns": "/run/netns/a", "cgroup": "/cg/a"}])
        assert _wait(lambda: "a" in svc.attached_at)
        seen["latency"] = svc.attached_at["a"] - t0
        with open(path, "w") as f:                                  # written in place, cut short
            f.write('{"pods": [')
        assert _wait(lambda: json.load(open(d.state_path)).get("file_error"))
        seen["recs"] = sorted(svc.store.recs)

    svc, d = _run(tmp_path, monkeypatch, script)
    # Acted on by the file watch, not by the next resync (30 s away). The 100 ms target is
    # measured by `meshbpf bench agent`, not asserted here (a busy machine is no bug).
    assert seen["latency"] < 5, seen
    assert seen["recs"] == ["a"] and svc.calls == [("attach", "a")]
    doc = json.load(open(d.state_path))
    assert doc["running"] is False and doc["owned"] == ["a"]
    assert [(p["name"], p["state"], p["source"]) for p in doc["pods"]] == \
        [("a", "attached", "pods-file")]
    assert not svc.cleaned and sorted(svc.store.recs) == ["a"]     # SIGTERM leaves it


def test_polling_fallback_and_cleanup_on_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "watch", daemon.StatWatch)
    seen = {}

    def script(svc, path, d):
        assert _wait(lambda: os.path.exists(d.state_path))
        t0 = time.monotonic()
        _write(path, [{"name": "b", "pid": 4242}])
        assert _wait(lambda: "b" in svc.attached_at)
        seen["latency"] = svc.attached_at["b"] - t0

    svc, d = _run(tmp_path, monkeypatch, script, cleanup_on_exit=True)
    assert seen["latency"] < 5                                      # polled, not the resync
    assert svc.cleaned and not os.path.exists(d.state_path)


def test_a_pending_entry_waits_for_its_cni_add_and_del_detaches_it(tmp_path, monkeypatch):
    from meshbpf.cni import plugin
    sock = str(tmp_path / "run" / "cni.sock")
    netns = tmp_path / "netns-cni-1"          # a binding whose netns is gone is dropped
    netns.write_text("")
    seen = {}

    def req(op, cid="c1"):
        return {"op": op, "container_id": cid, "netns": str(netns) if op != "del" else None,
                "ifname": "eth0", "namespace": "shop", "name": "web-0", "uid": "u1", "network": "n"}

    def script(svc, path, d):
        assert _wait(lambda: os.path.exists(d.state_path))
        _write(path, [{"name": "shop/web-0"}])

        def pending():
            with contextlib.suppress(OSError, ValueError):
                return any(p["state"] == "pending" for p in json.load(open(d.state_path))["pods"])
        assert _wait(pending)
        assert _wait(lambda: os.path.exists(sock))
        assert svc.calls == []                                     # nothing to attach yet
        seen["add"] = plugin.call_agent(sock, req("add"), 5)
        seen["recs_after_add"] = sorted(svc.store.recs)
        seen["state"] = {p["name"]: p["state"] for p in json.load(open(d.state_path))["pods"]}
        seen["del_other"] = plugin.call_agent(sock, req("del", cid="older"), 5)
        seen["del"] = plugin.call_agent(sock, req("del"), 5)
        seen["recs_after_del"] = sorted(svc.store.recs)

    svc, d = _run(tmp_path, monkeypatch, script, cni_socket=sock)
    assert seen["add"]["ok"] and seen["add"]["meshed"] and seen["add"]["id"] == "shop:web-0", seen
    assert seen["recs_after_add"] == ["shop:web-0"]                # attached before the answer
    assert svc.store.recs == {} and seen["recs_after_del"] == []
    assert seen["state"] == {"shop/web-0": "attached"}
    assert seen["del_other"]["message"] == "nothing bound to this container"
    assert seen["del"]["ok"] and svc.calls == [("attach", "shop:web-0"), ("detach", "shop:web-0")]
    assert not os.path.exists(sock)                                # removed on stop
