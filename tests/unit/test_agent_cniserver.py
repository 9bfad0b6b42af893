"""The agent's CNI socket (meshbpf.agent.cniserver) without a kernel: request validation,
finding a pod's cgroup by UID (kubelet's cgroupfs and systemd names), the bindings file,
and the handler's answers (a pending entry enrolled by ADD, a pod not in the source, DEL
idempotent and by container id, CHECK) on a daemon stand-in whose reconcile records."""

import json
import os
import socket
import threading
import types

import pytest

from meshbpf.agent import cniserver, source
from meshbpf.cni import plugin

UID = "5f0e8a4c-1d2b-4c3d-9e8f-0a1b2c3d4e5f"


def req(op="add", **kw):
    return dict({"op": op, "container_id": "abc123", "netns": "/run/netns/cni-1", "ifname": "eth0",
                 "namespace": "shop", "name": "web-0", "uid": UID, "network": "k8s"}, **kw)


@pytest.mark.parametrize("bad,words", [
    ([], "object"), ({"op": "boom"}, "unknown op"), (req(container_id=None), "container_id"),
    (req(netns=None), "netns"), (req(netns="relative"), "netns"), (req(name=5), "name"),
    (req(namespace="a/b"), "namespace"), (req(ifname=""), "ifname"),
])
def test_bad_requests_are_refused_with_the_reason(bad, words):
    with pytest.raises(cniserver.ProtocolError, match=words):
        cniserver.validate(bad)


def test_del_needs_no_netns():
    assert cniserver.validate(req("del", netns=None))["netns"] is None


def test_pod_cgroup_by_uid_cgroupfs_and_systemd(tmp_path):
    fs = tmp_path / "fs"
    (fs / "kubepods" / "burstable" / f"pod{UID}" / "c1").mkdir(parents=True)
    (fs / "kubepods" / "besteffort" / "podother").mkdir(parents=True)
    assert cniserver.pod_cgroup(UID, str(fs)) == str(fs / "kubepods" / "burstable" / f"pod{UID}")
    sd = tmp_path / "sd"
    slice_ = f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
    (sd / "kubepods.slice" / "kubepods-besteffort.slice" / slice_).mkdir(parents=True)
    assert cniserver.pod_cgroup(UID, str(sd)).endswith("/" + slice_)
    assert cniserver.pod_cgroup("nope", str(fs)) is None
    assert cniserver.pod_cgroup(None, str(fs)) is None


def test_bindings_survive_a_reload_and_a_gone_netns_is_pruned(tmp_path):
    live = tmp_path / "netns-live"
    live.write_text("")
    b = cniserver.Bindings(str(tmp_path / "cni.json"))
    b.bind("shop/a", {"container_id": "c1", "netns": str(live)})
    b.bind("shop/b", {"container_id": "c2", "netns": str(tmp_path / "gone")})
    again = cniserver.Bindings(str(tmp_path / "cni.json")).load()
    assert again.data == b.data and again.of_container("c2") == "shop/b"
    assert again.prune() == ["shop/b"]
    assert list(cniserver.Bindings(str(tmp_path / "cni.json")).load().data) == ["shop/a"]


def test_default_socket_is_the_node_one_only_for_the_default_pin_prefix():
    from meshbpf.interceptor import DEFAULT_PIN_PREFIX
    assert cniserver.default_socket(DEFAULT_PIN_PREFIX, "/run/meshbpf/meshbpf") == \
        "/run/meshbpf/cni.sock" == plugin.DEFAULT_SOCKET
    assert cniserver.default_socket("/sys/fs/bpf/meshbpf-test-x", "/run/meshbpf/meshbpf-test-x") \
        == "/run/meshbpf/meshbpf-test-x/cni.sock"


class FakeDaemon:
    """What the handler uses of a Daemon; reconcile 'attaches' every served pod whose netns
    exists and 'detaches' owned pods no longer served."""

    def __init__(self, tmp_path, pods_doc):
        self.lock = threading.RLock()
        self.desired, _ = source.parse(json.dumps(pods_doc))
        self.file_error = None
        self.bindings = cniserver.Bindings(str(tmp_path / "cni.json"))
        self.records, self.owned, self.passes = {}, set(), 0
        store = types.SimpleNamespace(load=self.records.get)
        self.svc = types.SimpleNamespace(store=store, cgroup_root=str(tmp_path / "cg"),
                                         detach=lambda i: self.records.pop(i, None))
        self.reconciler = types.SimpleNamespace(status={})

    def reconcile(self, check_drift):
        self.passes += 1
        served = source.complete(self.desired, self.bindings.data)[0]
        for pod_id, p in served.items():
            if os.path.exists(p.netns or ""):
                self.records[pod_id] = {"netns": p.netns, "cgroup": p.cgroup, "mode": "ebpf"}
                self.reconciler.status[pod_id] = {"state": "attached"}
                self.owned.add(pod_id)
            else:
                self.reconciler.status[pod_id] = {"state": "error",
                                                  "last_error": f"{p.netns} does not exist"}
        for pod_id in list(self.owned - set(served)):
            self.records.pop(pod_id, None)
            self.owned.discard(pod_id)


@pytest.fixture
def daemon(tmp_path):
    netns = tmp_path / "netns"
    netns.write_text("")
    (tmp_path / "cg" / "kubepods" / f"pod{UID}").mkdir(parents=True)
    d = FakeDaemon(tmp_path, {"pods": [{"name": "shop/web-0"}]})
    d.netns = str(netns)
    return d


def test_add_enrolls_a_pending_pod_before_answering_and_del_detaches(daemon):
    h = cniserver.Handler(daemon)
    r = h(req(netns=daemon.netns))
    assert r["ok"] and r["meshed"] and r["id"] == "shop:web-0" and daemon.passes == 1
    rec = daemon.records["shop:web-0"]
    assert rec["netns"] == daemon.netns
    assert rec["cgroup"].endswith(f"/kubepods/pod{UID}")            # found by the pod's UID
    assert json.load(open(daemon.bindings.path))["bindings"]["shop/web-0"]["container_id"] == "abc123"
    assert h(req("check", netns=daemon.netns)) == {"ok": False, "error": "shop/web-0: cannot read "
                                                   f"its netns: {_cookie_error(daemon.netns)}"}
    r = h(req("del", netns=None))
    assert r["ok"] and "shop:web-0" not in daemon.records and daemon.bindings.data == {}
    assert h(req("del", netns=None))["ok"]                           # idempotent


def _cookie_error(path):
    from meshbpf import system
    try:
        system.netns_cookie(path)
    except Exception as e:  # noqa: BLE001 - the same message the handler reports
        return str(e)


def test_add_of_a_pod_not_in_the_source_is_not_meshed_but_bound(daemon):
    r = cniserver.Handler(daemon)(req(name="other", netns=daemon.netns))
    assert r["ok"] and r["meshed"] is False and daemon.passes == 0
    assert "shop/other" in daemon.bindings.data and daemon.records == {}


def test_add_that_fails_to_attach_is_an_error(daemon):
    r = cniserver.Handler(daemon)(req(netns="/run/netns/meshbpf-test-no-such"))
    assert r["ok"] is False and "does not exist" in r["error"]


def test_add_without_a_usable_source_asks_to_retry(daemon):
    daemon.desired, daemon.file_error = None, "pods file x does not exist"
    r = cniserver.Handler(daemon)(req(netns=daemon.netns))
    assert r["ok"] is False and "does not exist" in r["error"] and daemon.bindings.data == {}


def test_del_of_an_older_sandbox_leaves_the_newer_one(daemon):
    h = cniserver.Handler(daemon)
    assert h(req(netns=daemon.netns, container_id="new"))["meshed"]
    assert h(req("del", container_id="old"))["message"] == "nothing bound to this container"
    assert "shop:web-0" in daemon.records


def test_del_without_identity_finds_the_binding_by_container(daemon):
    h = cniserver.Handler(daemon)
    h(req(netns=daemon.netns))
    assert h(req("del", namespace=None, name=None, netns=None))["ok"]
    assert daemon.records == {} and daemon.bindings.data == {}


def test_check_of_a_pod_never_added_fails(daemon):
    r = cniserver.Handler(daemon)(req("check", netns=daemon.netns))
    assert r["ok"] is False and "no ADD recorded" in r["error"]
    assert cniserver.Handler(daemon)(req("check", name="other"))["ok"]     # not meshed: fine


def test_server_round_trip_with_the_plugin_client(tmp_path, daemon):
    path = str(tmp_path / "s" / "cni.sock")
    srv = cniserver.Server(path, cniserver.Handler(daemon)).start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        r = plugin.call_agent(path, req(netns=daemon.netns), 5)
        assert r["ok"] and r["meshed"]
        assert plugin.call_agent(path, {"op": "nope"}, 5) == \
            {"ok": False, "error": "unknown op 'nope' (add, del or check)"}
        with pytest.raises(Exception, match="another agent"):
            cniserver.Server(path, None).start()
    finally:
        srv.stop()
    assert not os.path.exists(path)
    s = socket.socket(socket.AF_UNIX)            # a dead agent's socket file is replaced
    s.bind(path)
    s.close()
    srv = cniserver.Server(path, cniserver.Handler(daemon)).start()
    srv.stop()


def test_a_handler_bug_is_an_answer_not_a_dead_agent(tmp_path):
    def boom(r):
        raise RuntimeError("bug")
    assert cniserver.Server("/x", boom).answer(json.dumps(req()).encode()) == \
        {"ok": False, "error": "add failed in the agent: bug"}
    assert cniserver.Server("/x", boom).answer(b"{nope") == {"ok": False,
                                                            "error": "the request is not JSON"}


def test_a_second_network_of_the_same_sandbox_neither_rebinds_nor_detaches(daemon):
    h = cniserver.Handler(daemon)
    assert h(req(netns=daemon.netns))["meshed"]
    assert h(req(netns=daemon.netns, network="macvlan-net", ifname="net1"))["ok"]
    assert daemon.bindings.data["shop/web-0"]["network"] == "k8s"
    r = h(req("del", netns=None, network="macvlan-net", ifname="net1"))
    assert r["message"] == "another attachment of this container (network, interface)"
    assert "shop:web-0" in daemon.records
    assert h(req("del", netns=None))["ok"] and daemon.records == {}


# ---- a source that answers for pods it only learns of at their ADD (Kubernetes) ------------
class AskingSource:
    """A pod source with a lookup of its own (the Kubernetes source's GET): `answer` is the
    DesiredPod (or an exception) it gives; `merge` on the daemon takes its pod in."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def lookup(self, namespace, name, uid):
        self.asked.append((namespace, name, uid))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def kube_pod(**kw):
    from meshbpf.config import InterceptConfig
    return source.DesiredPod(**dict(dict(id=UID, name="shop/web-0", config=InterceptConfig(),
                                         source="kubernetes", by_cni=True), **kw))


@pytest.fixture
def kube_daemon(tmp_path, daemon):
    daemon.desired = {}                           # the watch has not delivered the pod

    def merge():
        want = daemon.sources[0].answer
        daemon.desired = {want.id: want}
    daemon.merge = merge
    return daemon


def test_add_of_a_pod_only_its_source_can_find_enrolls_it_and_the_watch_changes_nothing(
        kube_daemon):
    d = kube_daemon
    d.sources = [AskingSource(kube_pod())]
    h = cniserver.Handler(d)
    r = h(req(netns=d.netns))
    assert r["ok"] and r["meshed"] and r["id"] == UID and d.passes == 1
    assert d.sources[0].asked == [("shop", "web-0", UID)]
    rec = dict(d.records[UID])
    assert rec["netns"] == d.netns and rec["cgroup"].endswith(f"/kubepods/pod{UID}")
    # the watch's event: containers started, the pod found on the node through /proc
    d.desired = {UID: kube_pod(netns="/proc/4242/ns/net", cgroup=rec["cgroup"])}
    served = source.complete(d.desired, d.bindings.data)[0]
    assert served[UID].netns == d.netns and served[UID].cgroup == rec["cgroup"]
    d.reconcile(False)
    assert d.records[UID] == rec                  # nothing re-attached
    # DEL detaches; what the source finds while the sandbox goes is not served again
    r = h(req("del", netns=None))
    assert r["ok"] and r["message"] == "shop/web-0 detached" and UID not in d.records
    assert source.complete(d.desired, d.bindings.data) == ({}, [d.desired[UID]])
    d.reconcile(False)
    assert UID not in d.records
    assert h(req("del", netns=None))["message"] == "nothing bound to this container"
    assert h(req("check", netns=d.netns))["ok"] is False
    # a new sandbox of the pod (its ADD) is enrolled again
    assert h(req(netns=d.netns, container_id="def456"))["meshed"] and UID in d.records


def test_a_binding_of_another_pod_of_that_name_is_not_taken(kube_daemon):
    d = kube_daemon
    d.bindings.bind("shop/web-0", {"container_id": "old", "netns": d.netns, "uid": "older-uid"})
    d.desired = {UID: kube_pod()}
    assert source.complete(d.desired, d.bindings.data) == ({}, [kube_pod()])


def test_add_when_the_source_cannot_say_asks_the_runtime_to_retry(kube_daemon):
    from meshbpf.errors import MeshbpfError
    d = kube_daemon
    d.sources = [AskingSource(MeshbpfError("cannot get pod shop/web-0 from the Kubernetes "
                                           "API: 503 Service Unavailable"))]
    r = cniserver.Handler(d)(req(netns=d.netns))
    assert r == {"ok": False, "retry": True, "error": "shop/web-0: cannot get pod shop/web-0 "
                 "from the Kubernetes API: 503 Service Unavailable"}
    assert d.records == {} and d.passes == 0


def test_add_of_a_pod_its_source_does_not_mesh_is_not_meshed(kube_daemon):
    d = kube_daemon
    d.sources = [AskingSource(None)]
    r = cniserver.Handler(d)(req(netns=d.netns))
    assert r["ok"] and r["meshed"] is False and d.records == {} and d.passes == 0


def test_add_for_another_uid_than_the_known_pod_of_that_name_asks_the_source(kube_daemon):
    # the desired state has shop/web-0 with an older UID (a StatefulSet's pod recreated)
    d = kube_daemon
    d.desired = {"older-uid": kube_pod(id="older-uid")}
    d.sources = [AskingSource(None)]
    r = cniserver.Handler(d)(req(netns=d.netns))
    assert r["ok"] and r["meshed"] is False and d.records == {}
    assert d.sources[0].asked == [("shop", "web-0", UID)]
