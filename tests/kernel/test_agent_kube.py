"""The node agent with `--kube` (and a pods file beside it) against the local Kubernetes API
server (meshbpf.testbed.kubeapi) on a test-bed node with a real Envoy sidecar: a pod object
added for this node is intercepted (found on the node by its UID through the kubelet-like
pod<uid> cgroup), a pod on another node is not, the pods file's pod is served beside it,
and a deleted pod object is detached leaving nothing behind."""

import os
import subprocess
import sys
import uuid

import pytest
import yaml

from meshbpf.ebpf.inbound import tc
from meshbpf.testbed import Sandbox
from meshbpf.testbed.kubeapi import KubeAPIServer

from .test_agent import REPO, Agent, entry, map_entry, through_sidecar, write_pods

pytestmark = pytest.mark.kernel

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "k8s")
NODE = "node-a"


def pod_object(name, uid, node=NODE):
    with open(os.path.join(DATA, "watch-istio-running.yaml")) as f:
        p = yaml.safe_load(f)
    p["metadata"].update(name=name, uid=uid)
    p["spec"]["nodeName"] = node
    return p


def test_kube_pod_added_is_intercepted_deleted_is_detached(tmp_path):
    # The kubelet names a pod's cgroup pod<uid> (cgroupfs driver); the test bed names a pod's
    # cgroup after the pod, under the agent's --cgroup-root, so a pod named pod<uid> is
    # where find_pod looks. (A short uid: the test bed's names are at most 31 characters.)
    uid = f"{uuid.uuid4().hex[:8]}-7e57-4b1d-9c0d"
    with Sandbox(name="kube") as sb, KubeAPIServer() as api:
        a = sb.add_pod(f"pod{uid}")             # from Kubernetes
        c = sb.add_pod("c")                     # from the pods file
        b = sb.add_pod("b")
        b.start_http_server(8080)
        env_a, env_c = a.start_envoy(), c.start_envoy()
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        write_pods(pods_file, [entry(c)])
        ag = None
        try:
            ag = Agent(sb, pods_file, "--kube", "--kubeconfig", kubeconfig,
                       "--node-name", NODE)
            ag.wait_state("c", "attached", 60)
            api.wait_watches(1, timeout=30)
            assert through_sidecar(env_a, a, b.ip4) == 0          # not in Kubernetes yet
            # the same pod's object on another node: not this agent's
            api.add(pod_object("reviews-elsewhere", uid, node="node-b"))
            name = "bookinfo/reviews-v1-5c7f8d9b8-x2kq4"
            api.add(pod_object("reviews-v1-5c7f8d9b8-x2kq4", uid))
            got = ag.wait_state(name, "attached", 5)
            assert got["id"] == uid and got["source"] == "kubernetes"
            assert "bookinfo/reviews-elsewhere" not in ag.pods()
            assert ag.pods()["c"]["source"] == "pods-file"
            assert through_sidecar(env_a, a, b.ip4) == 1
            assert through_sidecar(env_c, c, b.ip4) == 1
            rec_path = os.path.join(sb.state_dir, "pods", f"{uid}.json")
            with open(rec_path) as f:
                rec = yaml.safe_load(f)
            assert rec["cgroup"] == a.cgroup and str(rec["config"]["proxy_uid"]) == "1337"
            cookie = a.pod.netns_cookie
            assert map_entry(sb, cookie) is not None
            kube_src = next(s for s in ag.doc()["sources"] if s["name"] == "kubernetes")
            assert kube_src["synced"] and kube_src["error"] is None
            text = subprocess.run([sys.executable, "-m", "meshbpf", "status", "--pin-prefix",
                                   sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                                  capture_output=True, text=True, timeout=60, check=True).stdout
            assert f"{name}  id={uid}  source=kubernetes  state=attached" in text, text
            assert "c  id=c  source=pods-file  state=attached" in text, text
            assert "kubernetes (node node-a): listed" in text, text

            # the pod object is deleted: detached, nothing of it left; the file's pod stays
            api.delete("bookinfo", "reviews-v1-5c7f8d9b8-x2kq4")
            ag.wait(lambda: not os.path.exists(rec_path) and name not in ag.pods(), 5,
                    "detach")
            assert map_entry(sb, cookie) is None
            assert tc.list_hooks(a.pod) == []
            assert os.listdir(os.path.join(sb.state_dir, "pods")) == ["c.json"]
            assert through_sidecar(env_a, a, b.ip4) == 0
            assert through_sidecar(env_c, c, b.ip4) == 1
            assert ag.stop() == 0
        finally:
            if ag is not None and ag.proc.poll() is None:
                ag.stop(9)
            subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix",
                            sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                           capture_output=True, timeout=60, check=False)
