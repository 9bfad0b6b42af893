"""A restarted agent adopting in-sync pods verifies them cheaply (issue 11: restart to
ready): its first full reconcile, drift checks included, runs no command (no `tc` per
pod), visits each pod's network namespace at most once and changes nothing; a deleted tc
filter is still found by that cheap check."""

import json
import os
import subprocess

import pytest

from meshbpf import system
from meshbpf.agent import daemon
from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox

pytestmark = pytest.mark.kernel

N = 4


def _counting(monkeypatch):
    seen = {"netns": [], "commands": []}
    real_in_netns, real_popen = system.in_netns, subprocess.Popen.__init__

    def in_netns(path):
        seen["netns"].append(path)
        return real_in_netns(path)

    def popen(self, args, *a, **kw):
        seen["commands"].append(args)
        return real_popen(self, args, *a, **kw)

    monkeypatch.setattr(system, "in_netns", in_netns)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    return seen


def test_a_new_agent_adopts_in_sync_pods_with_one_netns_visit_each_and_no_command(monkeypatch):
    with Sandbox(name="adopt") as sb:
        pods = [sb.add_pod(f"p{i}") for i in range(N)]
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        with open(pods_file, "w") as f:
            json.dump({"pods": [{"name": p.name, "netns": p.netns, "cgroup": p.cgroup}
                                for p in pods]}, f)
        node = dict(pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root, mode="ebpf",
                    reconcile=True, upgrade=True)
        first = NodeService(**node)
        try:
            for p in pods:
                first.attach(p.pod, InterceptConfig(), pod_id=p.name)
            first.probe()               # what the earlier agent cached on the node
            updated = {p.name: first.store.load(p.name)["updated"] for p in pods}

            seen = _counting(monkeypatch)
            d = daemon.Daemon(NodeService(**node), pods_file)
            d.start()
            monkeypatch.undo()
            assert seen["commands"] == [], seen["commands"]
            visits = [v for v in seen["netns"] if v in {p.netns for p in pods}]
            assert len(visits) <= N and len(set(visits)) == len(visits), visits
            assert d.ready
            st = {p["id"]: p["state"] for p in d.reconciler.report()}
            assert st == {p.name: "attached" for p in pods}
            assert {p.name: first.store.load(p.name)["updated"] for p in pods} == updated

            # the cheap check still sees a deleted filter
            r = pods[1].exec(["tc", "filter", "del", "dev", "eth0", "ingress"])
            assert r.returncode == 0, r.stderr
            d.reconcile(check_drift=True)
            assert first.store.load(pods[1].name)["updated"] != updated[pods[1].name]
            assert [first.store.load(p.name)["updated"] == updated[p.name] for p in pods] == \
                [True, False, True, True]
        finally:
            first.cleanup()


# A fresh agent (its own process: nothing imported yet) after start, then its first pod.
FIRST_POD = """
import json, sys
from meshbpf.agent import daemon
from meshbpf.service import NodeService
kw, pods_file, pod = json.loads(sys.argv[1])
d = daemon.Daemon(NodeService(**kw), pods_file)
d.start()
daemon._warm_attach_path()                  # what run() does after start
before = set(sys.modules)
with open(pods_file, "w") as f:
    json.dump({"pods": [pod]}, f)
d.load()
d.sync(d.reconciler.changed(d.desired))
print(json.dumps({"state": d.reconciler.report()[0]["state"],
                  "imported": sorted(set(sys.modules) - before)}))
"""


def test_a_fresh_agents_first_pod_imports_nothing(monkeypatch):
    """The first pod a fresh agent attaches does not pay for imports (pyroute2, the
    inbound modules: about 90 ms more than the next pods before the warm-up)."""
    with Sandbox(name="warm") as sb:
        p = sb.add_pod("p0")
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        with open(pods_file, "w") as f:
            json.dump({"pods": []}, f)
        node = dict(pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root, mode="ebpf",
                    reconcile=True, upgrade=True)
        svc = NodeService(**node)
        try:
            svc.backend("ebpf").adopt()              # the programs are loaded and pinned
            arg = json.dumps([node, pods_file, {"name": p.name, "netns": p.netns,
                                                "cgroup": p.cgroup}])
            r = subprocess.run([__import__("sys").executable, "-c", FIRST_POD, arg],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-3000:]
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert out["state"] == "attached"
            assert out["imported"] == [], out["imported"]
        finally:
            svc.cleanup()
