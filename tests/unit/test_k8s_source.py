"""The Kubernetes pod source (meshbpf.k8s.source) with the real `kubernetes` client against
the local API server (meshbpf.testbed.kubeapi): list then watch of this node's pods only,
add/modify/delete, a dropped watch resumed from its resourceVersion (bookmarks included),
410 Gone listed again, 500s backed off, half-known pods not acted on; and the daemon
serving the union of the pods file and the Kubernetes source."""

import copy
import dataclasses
import json
import os
import select
import time

import pytest
import yaml

from meshbpf.agent import reconcile
from meshbpf.config import InterceptConfig
from meshbpf.errors import MeshbpfError, PodNotFoundError
from meshbpf.k8s import source as ks
from meshbpf.testbed.kubeapi import KubeAPIServer

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "k8s")
NODE = "node-a"
EXCLUDE_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"


# ---- stand-ins for meshbpf.k8s.mesh.classify / locate.find_pod (the k8smap branch) ---------
@dataclasses.dataclass(frozen=True)
class Meshing:
    meshed: bool
    mesh: str = None
    config: object = None
    reason: str = ""
    left_alone: bool = False


def classify(pod):
    spec, ann = pod.get("spec") or {}, (pod["metadata"].get("annotations") or {})
    if any(c["name"] == "istio-init" for c in spec.get("initContainers") or []):
        return Meshing(False, "istio", None, "istio-init installs its own rules", True)
    if not any(c["name"] == "istio-proxy" for c in spec.get("containers") or []):
        return Meshing(False, None, None, "no sidecar")
    cfg = {"outbound_ports_exclude": ann[EXCLUDE_PORTS]} if EXCLUDE_PORTS in ann else {}
    return Meshing(True, "istio", InterceptConfig.from_dict(cfg), "istio-proxy container")


class Locator:
    """find_pod over a dict the test fills: uid -> (netns, cgroup)."""

    def __init__(self):
        self.known, self.calls = {}, []

    def __call__(self, uid, cgroup_root=None):
        self.calls.append((uid, cgroup_root))
        if uid not in self.known:
            raise PodNotFoundError(f"no cgroup pod{uid}")
        return self.known[uid]


def recorded(name="watch-istio-running.yaml"):
    with open(os.path.join(DATA, name)) as f:
        return yaml.safe_load(f)


def pod(name, uid, node=NODE, **ann):
    p = recorded()
    p["metadata"].update(name=name, uid=uid)
    p["metadata"]["annotations"].update(ann)
    p["spec"]["nodeName"] = node
    return p


@pytest.fixture
def api(tmp_path):
    with KubeAPIServer() as server:
        server.kubeconfig = server.write_kubeconfig(str(tmp_path / "kubeconfig"))
        yield server


@pytest.fixture
def make_source(api):
    made = []

    def make(**kw):
        loc = kw.pop("locator", None) or Locator()
        kw.setdefault("backoff_first", 0.05)
        kw.setdefault("backoff_max", 0.2)
        s = ks.KubeSource(kw.pop("node", NODE), kubeconfig=api.kubeconfig, classify=classify,
                          find_pod=loc, **kw)
        s.locator = loc
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.close()


def wait(pred, timeout=5, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def served(src):
    d = src.desired()
    return {} if d is None else d[0]


def woken(src, timeout=3):
    r, _, _ = select.select([src.fileno()], [], [], timeout)
    return bool(r) and src.changed()


def in_netns(src, *uids):
    for u in uids:
        src.locator.known[u] = (f"/run/netns/{u}", f"/sys/fs/cgroup/kubepods/pod{u}")


# ---- pure ----------------------------------------------------------------------------------
def test_assess_never_serves_a_half_known_pod():
    full = pod("a", "u-1")
    assert ks.assess(full, classify).kind == "serve"
    no_uid = copy.deepcopy(full)
    del no_uid["metadata"]["uid"]
    assert ks.assess(no_uid, classify) == ks.Verdict("wait", "no uid yet")
    unscheduled = recorded("watch-pending-unscheduled.yaml")
    assert ks.assess(unscheduled, classify) == ks.Verdict("wait", "not scheduled yet")
    unscheduled["spec"]["nodeName"] = NODE          # scheduled, sandbox not made yet
    v = ks.assess(unscheduled, classify)
    assert v.kind == "pending" and "no container started" in v.reason
    deleting = copy.deepcopy(full)
    deleting["metadata"]["deletionTimestamp"] = "2026-11-28T11:00:00Z"
    assert ks.assess(deleting, classify).kind == "drop"
    done = copy.deepcopy(full)
    done["status"]["phase"] = "Succeeded"
    assert ks.assess(done, classify).kind == "drop"
    plain = copy.deepcopy(full)
    plain["spec"]["containers"] = plain["spec"]["containers"][:1]
    assert ks.assess(plain, classify).kind == "drop"
    own = copy.deepcopy(full)
    own["spec"]["initContainers"] = [{"name": "istio-init", "image": "proxyv2"}]
    v = ks.assess(own, classify)
    assert v.kind == "drop" and v.meshing.left_alone


def test_desired_pod_is_keyed_by_uid_named_namespace_slash_name():
    loc = Locator()
    loc.known["u-1"] = ("/proc/42/ns/net", "/sys/fs/cgroup/kubepods/podu-1")
    pods, errors, waiting = ks.desired_state([pod("a", "u-1", **{EXCLUDE_PORTS: "9000"}),
                                              pod("b", "u-2")], classify, loc)
    assert errors == [] and sorted(pods) == ["u-1", "u-2"]
    p = pods["u-1"]
    assert (p.id, p.name, p.source, p.netns, p.cgroup, p.by_cni) == (
        "u-1", "bookinfo/a", "kubernetes", "/proc/42/ns/net", "/sys/fs/cgroup/kubepods/podu-1",
        True)
    assert p.config.to_dict()["outbound_ports_exclude"] == "9000"
    # not found on the node (yet): pending, its CNI ADD says where it is
    assert pods["u-2"].pending and pods["u-2"].name == "bookinfo/b"
    assert "no cgroup podu-2" in waiting["bookinfo/b"]


def test_backoff_doubles_to_its_cap_with_jitter():
    assert [ks.backoff_delay(n, 0.5, 4, rng=lambda: 1.0) for n in range(1, 7)] == \
        [0.5, 1, 2, 4, 4, 4]
    assert ks.backoff_delay(3, 0.5, 4, rng=lambda: 0.0) == 1.0       # half of 2 s


def test_no_node_name_is_a_usage_error(api):
    with pytest.raises(ks.UsageError, match="node's name"):
        ks.KubeSource("", kubeconfig=api.kubeconfig, classify=classify, find_pod=Locator())
    with pytest.raises(ks.UsageError, match="does not exist"):
        ks.KubeSource(NODE, kubeconfig="/nonexistent/kubeconfig", classify=classify,
                      find_pod=Locator())


# ---- against the local API server ------------------------------------------------------
def test_add_modify_delete(api, make_source):
    api.add(pod("a", "u-a"))
    src = make_source()
    in_netns(src, "u-a", "u-b")
    wait(lambda: "u-a" in served(src), what="listed pod served")
    lst = api.lists()
    assert lst and lst[0]["fieldSelector"] == f"spec.nodeName={NODE}"
    api.wait_watches(1)
    src.changed()
    api.add(pod("b", "u-b"))
    assert woken(src)
    wait(lambda: set(served(src)) == {"u-a", "u-b"}, what="added pod")
    api.modify("bookinfo", "b", lambda p: p["metadata"]["annotations"].update(
        {EXCLUDE_PORTS: "7000,7001"}))
    assert woken(src)
    wait(lambda: served(src)["u-b"].config.to_dict()["outbound_ports_exclude"] == "7000,7001",
         what="modified config")
    api.delete("bookinfo", "a")
    assert woken(src)
    wait(lambda: set(served(src)) == {"u-b"}, what="deleted pod gone")
    assert len(api.lists()) == 1                          # one list, then only watching


def test_pod_on_another_node_is_ignored(api, make_source):
    api.add(pod("mine", "u-1"))
    api.add(pod("theirs", "u-2", node="node-b"))
    src = make_source()
    in_netns(src, "u-1", "u-2")
    wait(lambda: src.desired() is not None)
    api.wait_watches(1)
    api.add(pod("theirs-2", "u-3", node="node-b"))
    api.add(pod("mine-2", "u-4"))
    in_netns(src, "u-3", "u-4")
    wait(lambda: "u-4" in served(src))
    assert set(served(src)) == {"u-1", "u-4"}
    assert set(src.pods) == {"bookinfo/mine", "bookinfo/mine-2"}
    assert all(q.get("fieldSelector") == f"spec.nodeName={NODE}" for q in
               [q for _m, _p, q in api.requests])


def test_dropped_watch_resumes_from_its_resource_version(api, make_source):
    src = make_source()
    in_netns(src, "u-1", "u-2")
    wait(lambda: src.desired() is not None)
    api.wait_watches(1)
    added = api.add(pod("a", "u-1"))
    wait(lambda: "u-1" in served(src))
    api.drop_watches()
    wait(lambda: len(api.watch_versions()) == 2, what="second watch")
    # resumed exactly where the first left off: no list again, nothing missed
    assert api.watch_versions()[1] == added["metadata"]["resourceVersion"]
    assert len(api.lists()) == 1
    api.add(pod("b", "u-2"))
    wait(lambda: set(served(src)) == {"u-1", "u-2"})


def test_a_watch_that_times_out_is_resumed_without_a_backoff_or_a_list(api, make_source):
    src = make_source(watch_timeout=1, backoff_first=5)
    wait(lambda: src.desired() is not None)
    wait(lambda: len(api.watch_versions()) >= 3, timeout=6, what="watches renewed")
    assert all(q.get("timeoutSeconds") == "1" for q in
               [q for _m, _p, q in api.requests if q.get("watch") == "true"])
    assert set(api.watch_versions()) == {src.resource_version}
    assert len(api.lists()) == 1 and src.failures == 0


def test_bookmark_moves_the_resume_point(api, make_source):
    src = make_source()
    wait(lambda: src.desired() is not None)
    api.wait_watches(1)
    other = api.add(pod("elsewhere", "u-9", node="node-b"))   # not seen by this node's watch
    api.bookmark()
    rv = other["metadata"]["resourceVersion"]
    wait(lambda: src.resource_version == rv, what="bookmark")
    api.compact()             # history before the bookmark is gone: the resume must not 410
    api.drop_watches()
    wait(lambda: len(api.watch_versions()) == 2)
    assert api.watch_versions()[1] == rv
    time.sleep(0.2)
    assert len(api.lists()) == 1


def test_410_gone_lists_again_and_forgets_what_was_deleted_meanwhile(api, make_source):
    api.add(pod("a", "u-1"))
    api.add(pod("b", "u-2"))
    src = make_source()
    in_netns(src, "u-1", "u-2", "u-3")
    wait(lambda: set(served(src)) == {"u-1", "u-2"})
    api.wait_watches(1)
    seen = src.resource_version
    api.fail_next(1000)                 # the agent cannot reach the API server for a while
    api.drop_watches()
    wait(lambda: len(api.watch_versions()) >= 3, what="failing watches")
    api.delete("bookinfo", "a")         # missed: the history is compacted
    api.add(pod("c", "u-3"))
    api.compact()
    with api.lock:
        api.failures.clear()
    wait(lambda: set(served(src)) == {"u-2", "u-3"}, what="relisted state")
    versions = api.watch_versions()
    assert versions[-2] == seen or seen in versions   # it tried to resume from there ...
    assert len(api.lists()) == 2                      # ... got 410 and listed again
    assert src.resource_version is not None and int(src.resource_version) >= int(api.floor)


def test_500s_are_backed_off_doubling_to_the_cap(api, make_source):
    api.add(pod("a", "u-1"))
    api.fail_next(5)
    src = make_source(backoff_first=0.1, backoff_max=0.4, rng=lambda: 1.0)   # no jitter
    in_netns(src, "u-1")
    wait(lambda: "u-1" in served(src), timeout=10)
    t = api.request_times[:6]
    gaps = [round(b - a, 2) for a, b in zip(t, t[1:])]
    # 0.1, 0.2, 0.4, then capped at 0.4 (never the 0.8 a further doubling would give);
    # never shorter, a little longer on a busy machine
    for got, want in zip(gaps, [0.1, 0.2, 0.4, 0.4, 0.4]):
        assert want - 0.01 <= got < want + 0.35, gaps
    assert src.last_error is None and src.failures == 0
    assert src.report()["synced"]


def test_500_reported_while_failing(api, make_source):
    api.fail_next(1000)
    src = make_source()
    wait(lambda: src.last_error is not None)
    assert "500" in src.report()["error"] and src.desired() is None
    with api.lock:
        api.failures.clear()


def test_half_known_pod_is_not_acted_on_until_complete(api, make_source):
    pending = recorded("watch-pending-unscheduled.yaml")
    pending["spec"]["nodeName"] = NODE            # scheduled, no container yet
    api.add(pending)
    src = make_source()
    uid = pending["metadata"]["uid"]
    wait(lambda: src.desired() is not None)
    # meshed, no container yet: pending (no netns: its CNI ADD says where it is)
    assert list(served(src)) == [uid] and served(src)[uid].pending
    assert "no container started" in src.waiting["bookinfo/" + pending["metadata"]["name"]]
    assert src.locator.calls == []                # not even looked for
    # the sandbox is up but the pod is not found on the node yet: still pending
    api.modify("bookinfo", pending["metadata"]["name"], lambda p: p["status"].update(
        phase="Pending", initContainerStatuses=[{"name": "istio-validation", "ready": False,
                                                 "state": {"running": {}}}]))
    wait(lambda: (served(src), src.locator.calls)[1], what="looked for")
    assert served(src)[uid].pending
    in_netns(src, uid)
    assert served(src)[uid].netns == f"/run/netns/{uid}"     # found on the next look
    # being deleted: dropped (so the agent detaches) while the object still exists
    api.modify("bookinfo", pending["metadata"]["name"], lambda p: p["metadata"].update(
        deletionTimestamp="2026-11-28T11:00:00Z"))
    wait(lambda: served(src) == {}, what="dropped while deleting")


# ---- a CNI ADD's lookup ----------------------------------------------------------------------
def no_container(name, uid, node=NODE, **ann):
    """Scheduled here, meshed, no container started: what the API has at the pod's ADD."""
    p = pod(name, uid, node, **ann)
    p["status"] = {"phase": "Pending"}
    return p


def gets(api):
    """The requests for one pod (GET /api/v1/namespaces/NS/pods/NAME)."""
    return [p for _m, p, _q in list(api.requests) if len(p.strip("/").split("/")) == 6]


def synced(make_source, api):
    src = make_source()
    wait(lambda: src.desired() is not None, what="listed")
    api.wait_watches(1)
    return src


def test_lookup_of_a_pod_the_watch_has_is_pending_and_asks_nothing(api, make_source):
    api.add(no_container("a", "u-a", **{EXCLUDE_PORTS: "9000"}))
    src = synced(make_source, api)
    want = src.lookup("bookinfo", "a", "u-a")
    assert (want.id, want.name, want.pending, want.by_cni, want.source) == (
        "u-a", "bookinfo/a", True, True, "kubernetes")
    assert want.config.to_dict()["outbound_ports_exclude"] == "9000"
    assert served(src) == {"u-a": want}           # the daemon's desired state has it too
    assert gets(api) == [] and src.locator.calls == []


def test_lookup_gets_a_pod_the_watch_has_not_delivered_until_the_watch_has_it(api, make_source):
    src = synced(make_source, api)
    api.hold_watches()                            # the ADD races the watch event
    api.add(no_container("b", "u-b", **{EXCLUDE_PORTS: "7000"}))
    time.sleep(0.2)
    assert served(src) == {}
    want = src.lookup("bookinfo", "b", "u-b")
    assert want.pending and want.id == "u-b" and want.name == "bookinfo/b"
    assert want.config.to_dict()["outbound_ports_exclude"] == "7000"
    assert gets(api) == ["/api/v1/namespaces/bookinfo/pods/b"]
    assert served(src) == {"u-b": want}           # kept: the daemon merges it in
    assert src.lookup("bookinfo", "b", "u-b") == want and len(gets(api)) == 1
    api.hold_watches(False)
    wait(lambda: "bookinfo/b" in src.pods, what="the watch event")
    assert src.fetched == {} and served(src) == {"u-b": want}
    api.delete("bookinfo", "b")                   # the watch is the authority again
    wait(lambda: served(src) == {}, what="deleted")


def test_lookup_when_the_api_cannot_say_is_an_error(api, make_source, tmp_path):
    src = synced(make_source, api)
    api.fail_next(1, 503)
    with pytest.raises(MeshbpfError, match="cannot get pod bookinfo/c .*503"):
        src.lookup("bookinfo", "c", "u-c")
    assert src.fetched == {}
    dead = KubeAPIServer().start()                # nobody listens there any more
    kubeconfig = dead.write_kubeconfig(str(tmp_path / "dead"))
    dead.stop()
    down = ks.KubeSource(NODE, kubeconfig=kubeconfig, classify=classify, find_pod=Locator())
    t0 = time.monotonic()
    try:
        with pytest.raises(MeshbpfError, match="cannot get pod bookinfo/c"):
            down.lookup("bookinfo", "c", "u-c")
    finally:
        down.close()
    assert time.monotonic() - t0 < 15


def test_lookup_of_a_pod_not_meshed_elsewhere_gone_or_replaced_is_none(api, make_source):
    src = synced(make_source, api)
    api.hold_watches()
    plain = no_container("plain", "u-p")
    plain["spec"]["containers"] = plain["spec"]["containers"][:1]      # no sidecar
    api.add(plain)
    api.add(no_container("far", "u-f", node="node-b"))
    api.add(no_container("web-0", "u-new"))
    assert src.lookup("bookinfo", "plain", "u-p") is None
    assert src.lookup("bookinfo", "far", "u-f") is None
    assert src.lookup("bookinfo", "nosuch", "u-n") is None             # 404
    assert src.lookup("bookinfo", "web-0", "u-old") is None            # another pod now
    assert len(gets(api)) == 4
    assert src.fetched == {} and served(src) == {}      # nothing kept of any of them


# ---- the daemon with two sources -----------------------------------------------------------
def test_daemon_serves_the_union_and_a_shared_id_is_an_error_for_both(api, tmp_path,
                                                                      monkeypatch):
    import signal
    import threading

    from meshbpf.agent import daemon

    from .test_agent_daemon import LoopService, _wait, _write
    from .test_agent_reconciler import FakePod
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    path = str(tmp_path / "pods.json")
    _write(path, [{"name": "vm", "netns": "/run/netns/vm", "cgroup": "/sys/fs/cgroup/vm"}])
    api.add(pod("a", "u-a"))
    loc = Locator()
    for u in ("u-a", "u-b", "vm"):
        loc.known[u] = (f"/run/netns/{u}", f"/sys/fs/cgroup/kubepods/pod{u}")
    kube = ks.KubeSource(NODE, kubeconfig=api.kubeconfig, classify=classify, find_pod=loc,
                         backoff_first=0.05)
    svc = LoopService(str(tmp_path / "state"))
    d = daemon.Daemon(svc, path, resync=30, sources=[kube])
    errors = []

    def doc():
        with open(os.path.join(str(tmp_path / "state"), "agent.json")) as f:
            return json.load(f)

    def pods():
        return {p["name"]: p for p in doc()["pods"]}

    def script():
        try:
            _wait(lambda: set(svc.store.recs) == {"vm", "u-a"}, 5)
            p = pods()
            assert p["vm"]["source"] == "pods-file" and p["bookinfo/a"]["source"] == "kubernetes"
            assert doc()["sources"][1]["name"] == "kubernetes"
            api.add(pod("b", "u-b"))
            _wait(lambda: "u-b" in svc.store.recs, 2)
            api.delete("bookinfo", "a")
            _wait(lambda: "u-a" not in svc.store.recs, 2)
            api.add(pod("vm", "vm"))                  # the pods file's id, from Kubernetes
            _wait(lambda: "vm" not in svc.store.recs, 2)
            p = pods()
            assert p["vm"]["state"] == p["bookinfo/vm"]["state"] == "error"
            assert "also" in p["vm"]["last_error"] and "kubernetes" in p["vm"]["last_error"]
            assert p["bookinfo/vm"]["source"] == "kubernetes"
            assert "u-b" in svc.store.recs
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=script)
    t.start()
    d.run()
    t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("args, msg", [
    ([], "at least one pod source"),
    (["--pods-file", "/x/pods.yaml", "--kubeconfig", "/x/kc"], "--kubeconfig goes with --kube"),
    (["--kube", "--kubeconfig", "/nonexistent/kc", "--node-name", "n"], "does not exist"),
])
def test_daemon_command_needs_a_usable_source(args, msg, tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(DATA))))
    env.pop("NODE_NAME", None)
    r = subprocess.run([sys.executable, "-m", "meshbpf", "daemon", "--pin-prefix",
                        str(tmp_path / "pins"), *args], capture_output=True, text=True,
                       timeout=60, env=env, check=False)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_daemon_acts_on_nothing_until_the_kube_source_has_listed(api, tmp_path, monkeypatch):
    """An agent (re)started while the API server fails must not detach the pods it owns
    (they would look removed): nothing is acted on, and it is not ready, until the list."""
    import signal
    import threading

    from meshbpf.agent import daemon

    from .test_agent_daemon import LoopService, _wait, _write
    from .test_agent_reconciler import FakePod
    monkeypatch.setattr(reconcile, "resolve", FakePod)
    path = str(tmp_path / "pods.json")
    _write(path, [{"name": "vm", "netns": "/run/netns/vm", "cgroup": "/sys/fs/cgroup/vm"}])
    api.add(pod("a", "u-a"))
    api.fail_next(1000)
    loc = Locator()
    loc.known["u-a"] = ("/run/netns/u-a", "/sys/fs/cgroup/kubepods/podu-a")
    kube = ks.KubeSource(NODE, kubeconfig=api.kubeconfig, classify=classify, find_pod=loc,
                         backoff_first=0.05, backoff_max=0.1)
    svc = LoopService(str(tmp_path / "state"))
    svc.store.recs["u-old"] = {"id": "u-old", "name": "bookinfo/old", "netns": "/x",
                               "cgroup": "/y", "config": {}, "mode": "iptables"}
    os.makedirs(str(tmp_path / "state"), exist_ok=True)
    with open(str(tmp_path / "state" / "agent.json"), "w") as f:
        json.dump({"owned": ["u-old"]}, f)          # what the previous agent managed
    d = daemon.Daemon(svc, path, resync=30, sources=[kube])
    errors = []

    def script():
        try:
            _wait(lambda: kube.failures >= 3, 5)
            time.sleep(0.2)
            assert "u-old" in svc.store.recs and "vm" not in svc.store.recs
            assert not d.ready
            with api.lock:
                api.failures.clear()
            _wait(lambda: set(svc.store.recs) == {"vm", "u-a"}, 5)
            _wait(lambda: d.ready, 2)
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=script)
    t.start()
    d.run()
    t.join()
    if errors:
        raise errors[0]
