"""The node agent (`meshbpf daemon`, run as a subprocess) with the pods-file source, on a
test-bed node with real Envoy sidecars: pods added, re-configured and removed through the
file; a bad entry and a half-written file; SIGKILL during a stream and a restarted agent
that adopts; drift repair; SIGTERM with and without --cleanup-on-exit."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from meshbpf.ebpf import structs
from meshbpf.ebpf.inbound import tc
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox, traffic

from .agentrt import REPO, AgentProcess, write_pods  # noqa: F401 - re-exported to the agent tests

pytestmark = pytest.mark.kernel

OUT_CX = "tcp.outbound.downstream_cx_total"
IN_CX = "tcp.inbound.downstream_cx_total"


class Agent(AgentProcess):
    """The agent with the pods-file source, in `mode`, with `flags`."""

    def __init__(self, sb, pods_file, *flags, mode="ebpf", env=None):
        self.pods_file = pods_file
        super().__init__(sb, "--pods-file", pods_file, "--mode", mode, *flags, env=env)


def entry(p, **kw):
    return dict({"name": p.name, "netns": p.netns, "cgroup": p.cgroup}, **kw)


def through_sidecar(env, pod, host, name=OUT_CX):
    before = env.stats().get(name, 0)
    traffic.http_get(pod, host, 8080)
    return env.stats().get(name, 0) - before


def map_entry(sb, cookie):
    with Maps(sb.pin_prefix) as m:
        return m["pods"].lookup(structs.U64(cookie))


@pytest.fixture
def node():
    with Sandbox(name="agent") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        write_pods(pods_file, [])
        agents = []
        try:
            yield sb, a, b, env, pods_file, agents
        finally:
            for ag in agents:
                with contextlib.suppress(Exception):
                    ag.stop(signal.SIGKILL)
            subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix",
                            sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                           capture_output=True, timeout=60)


def test_added_pod_is_intercepted_within_a_second_then_reconfigured_then_removed(node):
    sb, a, b, env, pods_file, agents = node
    ag = Agent(sb, pods_file)
    agents.append(ag)
    ag.wait(lambda: ag.doc() is not None, 30, "first reconcile")
    assert through_sidecar(env, a, b.ip4) == 0             # not meshed yet
    t0 = time.monotonic()
    write_pods(pods_file, [entry(a)])
    ag.wait_state("a", "attached", 1)
    assert through_sidecar(env, a, b.ip4) == 1
    assert time.monotonic() - t0 < 1.0
    cookie = a.pod.netns_cookie
    assert map_entry(sb, cookie) is not None
    url = f"http://127.0.0.1:{ag.port}"
    assert urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200
    text = urllib.request.urlopen(f"{url}/metrics", timeout=2).read().decode()
    assert 'meshbpf_pod_operations_total{' in text and 'meshbpf_pods{' in text
    assert 'meshbpf_connections_redirected_total{direction="out"}' in text

    # config change: b's address excluded -> the app reaches b directly
    write_pods(pods_file, [entry(a, config={"outbound_ip_ranges_exclude": f"{b.ip4}/32"})])
    rec_path = os.path.join(sb.state_dir, "pods", "a.json")

    def excluded():
        with contextlib.suppress(OSError, ValueError):     # rewritten while we read
            with open(rec_path) as f:
                return f"{b.ip4}/32" in json.load(f)["config"]["outbound_ip_ranges_exclude"]

    ag.wait(excluded, 2, "config applied")
    assert through_sidecar(env, a, b.ip4) == 0
    assert '"action": "update"' in ag.output() and '"pod": "a"' in ag.output()

    # removal: detached, no record, no map entry, no tc filter, not intercepted
    write_pods(pods_file, [])
    ag.wait(lambda: not os.path.exists(rec_path) and "a" not in ag.pods(), 2, "detach")
    assert map_entry(sb, cookie) is None
    assert tc.list_hooks(a.pod) == []
    assert os.listdir(os.path.join(sb.state_dir, "pods")) == []
    assert through_sidecar(env, a, b.ip4) == 0
    assert ag.stop() == 0


def test_bad_entry_serves_the_others_and_a_half_written_file_is_not_acted_on(node):
    sb, a, b, env, pods_file, agents = node
    write_pods(pods_file, [entry(a), {"name": "ghost", "netns": "/run/netns/mbt-no-such",
                                      "cgroup": sb.cgroup_root},
                           entry(b, name="typo", config={"outbound_ports_exclude": "x"})])
    ag = Agent(sb, pods_file)
    agents.append(ag)
    ag.wait_state("a", "attached", 30)
    ghost = ag.wait_state("ghost", "error")
    assert "does not exist" in ghost["last_error"]
    assert ag.pods()["typo"]["state"] == "error" and "config" in ag.pods()["typo"]["last_error"]
    assert through_sidecar(env, a, b.ip4) == 1
    st = json.loads(subprocess.run(
        [sys.executable, "-m", "meshbpf", "status", "-o", "json", "--pin-prefix", sb.pin_prefix,
         "--cgroup-root", sb.cgroup_root], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=True).stdout)
    by_name = {p["name"]: p for p in st["agent"]["pods"]}
    assert by_name["a"]["state"] == "attached" and by_name["a"]["source"] == "pods-file"
    assert by_name["ghost"]["state"] in ("error", "backoff") and by_name["ghost"]["last_error"]
    text = subprocess.run([sys.executable, "-m", "meshbpf", "status", "--pin-prefix",
                           sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ghost" in text and "does not exist" in text and "state=attached" in text

    # written in place and cut short: would read as "no pods" to a careless parser
    with open(pods_file, "w") as f:
        f.write('{"pods": [')
    ag.wait(lambda: (ag.doc() or {}).get("file_error"), 2, "the file error reported")
    time.sleep(0.3)
    assert ag.pods()["a"]["state"] == "attached"
    assert os.path.exists(os.path.join(sb.state_dir, "pods", "a.json"))
    assert through_sidecar(env, a, b.ip4) == 1
    assert ag.stop() == 0


def test_sigkill_during_a_stream_loses_nothing_and_a_new_agent_adopts(node):
    sb, a, b, env, pods_file, agents = node
    srv = b.spawn(["iperf3", "-s", "-p", "5201", "-1"])
    b.wait_port(5201, listening=True)
    write_pods(pods_file, [entry(a)])
    ag = Agent(sb, pods_file, "--resync", "1")
    agents.append(ag)
    ag.wait_state("a", "attached", 30)
    rec_path = os.path.join(sb.state_dir, "pods", "a.json")
    rec = json.load(open(rec_path))
    before = env.stats().get(OUT_CX, 0)
    client = a.spawn(["iperf3", "-c", b.ip4, "-p", "5201", "-t", "5", "-J"], uid=1000)
    time.sleep(1)
    ag.stop(signal.SIGKILL)
    assert through_sidecar(env, a, b.ip4) == 1            # new connections still captured
    ag2 = Agent(sb, pods_file, "--resync", "1")
    agents.append(ag2)
    ag2.wait_state("a", "attached", 30)
    time.sleep(1.5)                                       # a drift-checking resync ran too
    assert client.wait(timeout=30) == 0, client.output()[-2000:]
    out = json.loads(client.output()[client.output().index("{"):])
    assert "error" not in out and out["end"]["sum_received"]["bytes"] > 0
    # the stream (control + data connection) and the probe went through the sidecar
    assert env.stats().get(OUT_CX, 0) - before >= 3
    # adopted as it was: not attached again
    assert json.load(open(rec_path))["updated"] == rec["updated"]
    assert '"action": "attach"' not in ag2.output() and '"action": "repair"' not in ag2.output()
    assert through_sidecar(env, a, b.ip4) == 1
    srv.stop()
    assert ag2.stop() == 0


def test_a_deleted_tc_filter_is_repaired_and_sigterm_leaves_interception(node):
    sb, a, b, env, pods_file, agents = node
    a.start_http_server(8080)
    write_pods(pods_file, [entry(a)])
    ag = Agent(sb, pods_file, "--resync", "1")
    agents.append(ag)
    ag.wait_state("a", "attached", 30)
    assert through_sidecar(env, b, a.ip4, IN_CX) == 1
    assert tc.list_hooks(a.pod)
    r = a.exec(["tc", "filter", "del", "dev", "eth0", "ingress"])
    assert r.returncode == 0, r.stderr
    assert tc.list_hooks(a.pod) == []
    ag.wait(lambda: tc.list_hooks(a.pod), 3, "tc filter repaired")
    # the filter is back while the repair runs; its log line comes when it has finished
    ag.wait(lambda: '"action": "repair"' in ag.output(), 3, "the repair logged")
    assert through_sidecar(env, b, a.ip4, IN_CX) == 1

    assert ag.stop(signal.SIGTERM) == 0
    assert (json.load(open(ag.state))["running"]) is False
    assert os.path.exists(os.path.join(sb.state_dir, "pods", "a.json"))
    assert through_sidecar(env, a, b.ip4) == 1
    assert through_sidecar(env, b, a.ip4, IN_CX) == 1

    # --cleanup-on-exit: the next agent removes everything when it stops
    ag2 = Agent(sb, pods_file, "--cleanup-on-exit")
    agents.append(ag2)
    ag2.wait_state("a", "attached", 30)
    cookie = a.pod.netns_cookie
    assert ag2.stop(signal.SIGTERM) == 0
    assert not os.path.exists(os.path.join(sb.state_dir, "pods", "a.json"))
    assert not os.path.isdir(sb.pin_prefix) or map_entry(sb, cookie) is None
    assert through_sidecar(env, a, b.ip4) == 0


def test_a_flushed_iptables_chain_is_repaired(node):
    sb, a, b, env, pods_file, agents = node
    write_pods(pods_file, [entry(a)])
    ag = Agent(sb, pods_file, "--resync", "1", mode="iptables")
    agents.append(ag)
    assert ag.wait_state("a", "attached", 30)["mode"] == "iptables"
    assert through_sidecar(env, a, b.ip4) == 1
    flushed = [a.exec([tool, "-t", "nat", "-F", "ISTIO_OUTPUT"]).returncode == 0
               for tool in ("iptables-nft", "iptables-legacy")]
    assert any(flushed)
    assert through_sidecar(env, a, b.ip4) == 0            # the drift is real
    ag.wait(lambda: '"action": "repair"' in ag.output(), 3, "repair")
    assert through_sidecar(env, a, b.ip4) == 1
    assert ag.stop() == 0


def test_a_recreated_netns_is_attached_again(node):
    """A pod sandbox restart: the netns at the same path is a new one (new cookie). The
    agent re-attaches it; the old netns's map entry goes, the new one's is there."""
    sb, a, b, env, pods_file, agents = node
    c = sb.add_pod("c")
    ip4, ip6 = c.ip4, c.ip6
    write_pods(pods_file, [entry(c)])
    ag = Agent(sb, pods_file, "--resync", "1")
    agents.append(ag)
    ag.wait_state("c", "attached", 30)
    old = c.pod.netns_cookie
    assert map_entry(sb, old) is not None
    sb.remove_pod("c")
    c = sb.add_pod("c", ip4=ip4, ip6=ip6)
    new = c.pod.netns_cookie
    assert new != old
    rec_path = os.path.join(sb.state_dir, "pods", "c.json")

    def cookie_of_record():
        with contextlib.suppress(OSError, ValueError):     # rewritten while we read
            with open(rec_path) as f:
                return json.load(f)["netns_cookie"]

    ag.wait(lambda: cookie_of_record() == new, 5, "re-attach")
    assert map_entry(sb, new) is not None and map_entry(sb, old) is None
    assert "network namespace was recreated" in ag.output() or '"pod": "c"' in ag.output()
    assert ag.wait_state("c", "attached", 3)["last_error"] is None
    assert ag.stop() == 0
