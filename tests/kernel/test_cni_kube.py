"""meshbpf-cni for a pod of the Kubernetes source: the agent with `--kube` against the local
API server (meshbpf.testbed.kubeapi) and `--cni-socket`, Debian's reference plugins bridge +
host-local and meshbpf-cni invoked as a container runtime invokes a chained conflist
(tests/kernel/cnirt.py), a real Envoy sidecar as uid 1337.

- The pod object is in the API server only (scheduled here, no container status yet); its
  cgroup is the kubelet's kubepods/pod<uid>. The agent lists it as pending; the ADD enrolls
  it with the runtime's netns and the app's first connection right after ADD goes through
  Envoy. The watch's later event (containers running, the pod now found on the node through
  /proc) re-attaches nothing: one attach, the record unchanged. DEL detaches (once: the
  pod's deletion from the API afterwards detaches nothing more) and leaves no record, map
  entry or pins.
- The API server has the pod but the watch is held back: the ADD's GET of the pod enrolls it;
  the watch event, once released, changes nothing.
- The API cannot answer that GET (503): the ADD fails with code 11 (try again later), nothing
  is attached; the runtime's next ADD enrolls the pod.
"""

import contextlib
import json
import os
import time
import types
import uuid

import pytest
import yaml

from meshbpf import system
from meshbpf.testbed import traffic
from meshbpf.testbed.kubeapi import KubeAPIServer

from .cnirt import (
    OUT_CX,
    Agent,
    CniFailed,
    cni_args,
    cni_node,
    map_entry,
    new_pod,
    pins,
)

pytestmark = pytest.mark.kernel

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "k8s")
NODE = "node-a"
NS, NAME = "bookinfo", "web-0"
KEY = f"{NS}/{NAME}"


def pod_object(uid):
    """The injected pod as the API server has it when kubelet has not reported any container
    yet (its sandbox, and so its netns, is being made)."""
    with open(os.path.join(DATA, "watch-istio-running.yaml")) as f:
        p = yaml.safe_load(f)
    p["metadata"].update(name=NAME, namespace=NS, uid=uid)
    p["spec"]["nodeName"] = NODE
    p["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    return p


def running(p):
    p["status"].update(phase="Running", containerStatuses=[
        {"name": c["name"], "ready": True, "started": True, "restartCount": 0,
         "state": {"running": {"startedAt": "2026-11-28T12:00:00Z"}}}
        for c in p["spec"]["containers"]])


def actions(agent, uid, kind):
    """The agent's log lines (JSON) for pod `uid` with action `kind`."""
    out = []
    for line in agent.output().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("pod_id") == uid and d.get("action") == kind:
            out.append(d)
    return out


def kube_source(agent):
    return next(s for s in agent.doc()["sources"] if s["name"] == "kubernetes")


def start(tmp_path, sb, sock, api, agents):
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
    agent = Agent(sb, None, sock, "--kube", "--kubeconfig", kubeconfig, "--node-name", NODE)
    agents.append(agent)
    api.wait_watches(1, timeout=30)
    agent.wait(lambda: kube_source(agent)["synced"], 30, "listed")
    return agent


def server_pod(sb, rt, conflist):
    """db: a pod not in Kubernetes (its ADD: not meshed) serving HTTP on 8080."""
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    db = new_pod(sb, "db", 2, uid)
    rt.loopback(cid, db.netns)
    res = rt.add(conflist, cid, db.netns, cni_args("shop", "db-0", uid, cid))
    db.ip4 = res[-1]["ips"][0]["address"].split("/")[0]
    db.start_http_server(8080)
    return db


def web_pod(sb, rt):
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    web = new_pod(sb, "web", 1, uid)
    rt.loopback(cid, web.netns)
    web.ip4 = "0.0.0.0"
    return web, uid, cid


@contextlib.contextmanager
def kube_node(tmp_path, name):
    """A CNI node with the agent on the local API server, db (not meshed, serving 8080) and
    web (its netns made, ADD not run yet; Envoy as uid 1337 in it). Yields the scene."""
    with cni_node(name) as (sb, rt, conflist, _pf, sock, _ipam, agents), \
            KubeAPIServer() as api:
        agent = start(tmp_path, sb, sock, api, agents)
        db = server_pod(sb, rt, conflist)
        web, uid, cid = web_pod(sb, rt)
        env = web.start_envoy()
        yield types.SimpleNamespace(sb=sb, rt=rt, conflist=conflist, api=api, agent=agent,
                                    db=db, web=web, uid=uid, cid=cid, env=env,
                                    pins_before=pins(sb))


def enrolled_at_add(s):
    """ADD; then the app's first connection: through Envoy. Returns (args, results, record)."""
    sb, web, db, env, uid = s.sb, s.web, s.db, s.env, s.uid
    args = cni_args(NS, NAME, uid, s.cid)
    results = s.rt.add(s.conflist, s.cid, web.netns, args)
    # ---- ADD has returned ----
    first = traffic.http_get(web, db.ip4, 8080)
    assert results[1] == results[0]                       # bridge's result, unchanged
    assert first["status"].endswith("200 OK") and first["reply"]["pod"] == "db"
    assert env.stats().get(OUT_CX, 0) == 1, "the first connection did not go through Envoy"
    assert first["peer"][0].endswith(db.ip4)
    with open(os.path.join(sb.state_dir, "pods", f"{uid}.json")) as f:
        rec = json.load(f)
    assert rec["netns"] == web.netns and rec["mode"] == "ebpf"
    assert rec["netns_cookie"] == system.netns_cookie(web.netns)
    assert rec["cgroup"] == os.path.realpath(web.cgroup)              # found by the pod's UID
    assert str(rec["config"]["proxy_uid"]) == "1337"                   # classify()'s config
    return args, results, rec


def nothing_reattached(s, rec, rv):
    """After the watch's event at resourceVersion `rv`: one attach, the record unchanged."""
    agent = s.agent
    agent.wait(lambda: kube_source(agent)["resource_version"] == rv, 10, "the watch event")
    time.sleep(1.0)                                  # the daemon's merge + reconcile after it
    agent.wait(lambda: agent.pods()[KEY]["state"] == "attached", 5, "attached")
    with open(os.path.join(s.sb.state_dir, "pods", f"{s.uid}.json")) as f:
        assert json.load(f) == rec
    assert len(actions(agent, s.uid, "attach")) == 1, actions(agent, s.uid, "attach")


def running_then_deleted(s, args, results, rec):
    """kubelet reports the containers running (the pod is found on the node via /proc now):
    nothing re-attached, traffic still through Envoy. Then DEL and the API's delete leave
    nothing."""
    rv = s.api.modify(NS, NAME, running)["metadata"]["resourceVersion"]
    nothing_reattached(s, rec, rv)
    assert traffic.http_get(s.web, s.db.ip4, 8080)["reply"]["pod"] == "db"
    assert s.env.stats().get(OUT_CX, 0) == 2

    sb, web, uid, agent = s.sb, s.web, s.uid, s.agent
    cookie = system.netns_cookie(web.netns)
    s.rt.delete(s.conflist, s.cid, web.netns, args, results[-1])
    rec_path = os.path.join(sb.state_dir, "pods", f"{uid}.json")
    assert not os.path.exists(rec_path)
    assert map_entry(sb, cookie) is None
    assert pins(sb) == s.pins_before
    with open(os.path.join(sb.state_dir, "cni.json")) as f:
        assert json.load(f)["bindings"][KEY]["deleted"] is True    # until its netns goes
    time.sleep(0.5)
    assert not os.path.exists(rec_path)              # not served again from /proc
    before = s.env.stats().get(OUT_CX, 0)
    # bridge's DEL took eth0 away; the connect is not taken to Envoy either
    assert traffic.connect(web, s.db.ip4, 8080, http="/", allow_error="connect")["error"]
    assert s.env.stats().get(OUT_CX, 0) == before
    s.api.delete(NS, NAME)
    agent.wait(lambda: KEY not in agent.pods(), 10, "pod object deleted")
    assert len(actions(agent, uid, "detach")) == 1                     # detached once
    assert os.listdir(os.path.join(sb.state_dir, "pods")) == []


def test_pending_kube_pod_enrolled_at_add_watch_event_changes_nothing_del_leaves_nothing(
        tmp_path):
    with kube_node(tmp_path, "cnik") as s:
        agent = s.agent
        s.api.add(pod_object(s.uid))                 # in the API server only
        agent.wait(lambda: agent.pods().get(KEY, {}).get("state") == "pending", 10,
                   "listed as pending")
        assert agent.pods()[KEY]["waiting_for"] == "its CNI ADD"
        assert not os.path.exists(os.path.join(s.sb.state_dir, "pods", f"{s.uid}.json"))

        args, results, rec = enrolled_at_add(s)
        assert agent.pods()[KEY]["state"] == "attached" and agent.pods()[KEY]["id"] == s.uid
        assert actions(agent, s.uid, "get") == []    # the watch had it: no GET
        running_then_deleted(s, args, results, rec)


def test_add_before_the_watch_event_gets_the_pod_from_the_api(tmp_path):
    with kube_node(tmp_path, "cnikg") as s:
        agent = s.agent
        s.api.hold_watches()                         # the ADD races the watch event
        rv = s.api.add(pod_object(s.uid))["metadata"]["resourceVersion"]
        time.sleep(0.3)
        assert KEY not in agent.pods()

        args, results, rec = enrolled_at_add(s)
        assert len(actions(agent, s.uid, "get")) == 1   # the ADD's GET of its pod
        assert agent.pods()[KEY]["state"] == "attached"

        s.api.hold_watches(False)                    # the watch's ADDED arrives now
        nothing_reattached(s, rec, rv)
        running_then_deleted(s, args, results, rec)


def test_add_when_the_api_cannot_answer_fails_to_be_retried_then_enrolls(tmp_path):
    with kube_node(tmp_path, "cnikr") as s:
        s.api.hold_watches()
        s.api.add(pod_object(s.uid))
        s.api.fail_next(1, 503)                      # the ADD's GET: the API cannot say
        args = cni_args(NS, NAME, s.uid, s.cid)
        with pytest.raises(CniFailed) as e:
            s.rt.add(s.conflist, s.cid, s.web.netns, args)
        assert e.value.plugin == "meshbpf-cni" and e.value.out["code"] == 11
        assert "503" in e.value.out["details"]
        assert not os.path.exists(os.path.join(s.sb.state_dir, "pods", f"{s.uid}.json"))
        s.rt.delete(s.conflist, s.cid, s.web.netns, args, None)   # the runtime tears it down...
        enrolled_at_add(s)                                         # ...and tries again
        assert len(actions(s.agent, s.uid, "attach")) == 1
