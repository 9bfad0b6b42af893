"""An agent upgrade driven through the daemon (issue 11, item 3): agent A runs; a client
in the meshed pod connects in a loop through its Envoy sidecar; A is stopped (SIGTERM:
interception stays) and agent B, whose BPF programs differ (built with the harmless
define test_upgrade uses for "another version"), starts and replaces the pinned programs
in place. No connection of the loop fails or bypasses the sidecar, the pod stays
enrolled as it was (not attached again), and `meshbpf status` shows B's version."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from meshbpf.ebpf import loader
from meshbpf.ebpf.inbound import tc
from meshbpf.testbed import pod_python
from meshbpf.testbed.traffic import CONNECT_LOOP as LOOP

from .test_agent import OUT_CX, REPO, Agent, entry, map_entry, node, write_pods  # noqa: F401

pytestmark = pytest.mark.kernel

LOOP_SECONDS = 25         # outlasts B's start, which compiles the new programs


def _status(sb):
    return json.loads(subprocess.run(
        [sys.executable, "-m", "meshbpf", "status", "-o", "json", "--pin-prefix", sb.pin_prefix,
         "--cgroup-root", sb.cgroup_root], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=True).stdout)


def test_an_agent_with_other_programs_takes_over_while_the_app_connects(node, monkeypatch):  # noqa: F811
    sb, a, b, env, pods_file, agents = node
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    write_pods(pods_file, [entry(a)])
    ag_a = Agent(sb, pods_file)
    agents.append(ag_a)
    ag_a.wait_state("a", "attached", 60)
    old_version = loader.read_meta(sb.pin_prefix)["version"]
    assert _status(sb)["ebpf"]["version"] == old_version
    rec_path = os.path.join(sb.state_dir, "pods", "a.json")
    rec = json.load(open(rec_path))
    old_tc = {h["prog_id"] for h in tc.list_hooks(a.pod)}

    before = env.stats().get(OUT_CX, 0)
    result = {}
    loop = threading.Thread(target=lambda: result.update(r=a.exec(
        [pod_python(), "-c", LOOP, b.ip4, "8080", str(LOOP_SECONDS)], uid=1000, timeout=120)))
    loop.start()
    time.sleep(1.5)                                   # the loop is connecting
    assert ag_a.stop(signal.SIGTERM) == 0             # A leaves interception in place
    ag_b = Agent(sb, pods_file, env=dict(os.environ, **{loader.EXTRA_CFLAGS_ENV:
                                                         "-DMB_UPGRADE_TEST=1"}))
    agents.append(ag_b)
    ag_b.wait(lambda: ag_b.pods().get("a", {}).get("state") == "attached", 90, "B took over")
    taken_over_during_loop = loop.is_alive()
    loop.join()
    r = result["r"]
    ok, fail = map(int, r.stdout.split())
    assert taken_over_during_loop, "B's start outlasted the client loop: proves nothing"
    assert fail == 0, r.stderr[-2000:]
    assert ok >= 30, ok
    assert env.stats().get(OUT_CX, 0) - before == ok      # none bypassed the sidecar

    new_version = loader.read_meta(sb.pin_prefix)["version"]
    assert new_version != old_version
    assert '"action": "upgrade"' in ag_b.output() and new_version in ag_b.output()
    with open(f"/proc/{ag_b.proc.pid}/maps") as f:        # B compiled in its child only
        assert "libbcc" not in f.read()
    st = _status(sb)
    assert st["ebpf"]["version"] == new_version
    assert st["agent"]["pid"] == ag_b.proc.pid
    assert [(p["name"], p["state"]) for p in st["agent"]["pods"]] == [("a", "attached")]
    text = subprocess.run([sys.executable, "-m", "meshbpf", "status", "--pin-prefix",
                           sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"(version {new_version})" in text
    # the pod stayed enrolled as it was: same record, its map entry, its filter on the
    # new program
    assert json.load(open(rec_path))["updated"] == rec["updated"]
    assert '"action": "attach"' not in ag_b.output()
    assert map_entry(sb, a.pod.netns_cookie) is not None
    new_tc = {h["prog_id"] for h in tc.list_hooks(a.pod)}
    assert new_tc and new_tc.isdisjoint(old_tc)
    assert ag_b.stop() == 0
