"""A host workload (a VM or bare-metal service whose Envoy is a system service) meshed by the
agent, in both modes.

SAFETY: nothing here runs in the machine's own network namespace. The agent is started in
a test-bed pod's netns ("vm"): for that agent its own netns IS the host, which is exactly
what a host entry names. The workload is a cgroup of the test cgroup; a second cgroup in the
same netns is "the rest of the machine" (sshd, the agent's neighbours).

What is proved, per mode:
- an app in the workload cgroup reaches a server in another netns through Envoy's 15001
  (Envoy's outbound counter moves, the app sees the server it dialled, the server answers);
- a process of the same netns outside the workload cgroup: eBPF mode leaves it alone (the
  connect hooks compare the caller's cgroup); iptables mode captures it, as Istio's VM mode
  does (its OUTPUT rules know no cgroup, only uid 1337);
- inbound to the workload's port from another netns reaches Envoy's 15006;
- SIGTERM leaves interception in place and a new agent adopts it without re-attaching;
- removing the entry leaves nothing: no record, no map entry, no tc filter, no ISTIO chain;
- bad host entries (another netns with "host": true; an interface list in iptables mode)
  are reported and change nothing.
"""

import contextlib
import copy
import json
import os
import subprocess
import sys
import types

import pytest

from meshbpf import system
from meshbpf.ebpf import structs
from meshbpf.ebpf.inbound import tc
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox, traffic
from meshbpf.testbed.procs import popen_in_pod

from .agentrt import REPO, AgentProcess, write_pods

pytestmark = pytest.mark.kernel

OUT_CX = "tcp.outbound.downstream_cx_total"
IN_CX = "tcp.inbound.downstream_cx_total"


class HostAgent(AgentProcess):
    """`meshbpf daemon` started inside `netns` (setns in the child, never `ip netns exec`),
    outside the test cgroup: the node programs never see it."""

    def __init__(self, sb, netns, pods_file, mode):
        where = types.SimpleNamespace(netns=netns, cgroup=None, name="agent")
        super().__init__(sb, "--pods-file", pods_file, "--mode", mode, timeout=60,
                         tag=f"agent-{mode}",
                         popen=lambda cmd, **kw: popen_in_pod(where, cmd, 0, 0, **kw))


def in_cgroup(pod, cgroup):
    """`pod` (a SandboxPod) as seen by processes of another cgroup in its netns."""
    view = copy.copy(pod)
    view.cgroup = cgroup
    view.procs = []
    return view


def delta(env, fn, stat):
    before = env.stats().get(stat, 0)
    out = fn()
    return env.stats().get(stat, 0) - before, out


def istio_chains(netns):
    """The ISTIO_* chains in `netns` (iptables-save of both variants, v4)."""
    text = ""
    for binary in ("iptables-nft-save", "iptables-legacy-save"):
        r = system.run([binary], netns=netns, check=False)
        text += r.stdout or ""
    return sorted({l.split()[0][1:] for l in text.splitlines() if l.startswith(":ISTIO")})


@pytest.fixture
def bed():
    with Sandbox(name="hostwl") as sb:
        vm, srv, peer = sb.add_pod("vm"), sb.add_pod("srv"), sb.add_pod("peer")
        srv.start_http_server(8080)
        vm.start_http_server(8080)               # the host workload's own service
        env = vm.start_envoy()                   # the sidecar "system service", uid 1337
        app_cg = os.path.join(sb.cgroup_root, "vmapp")
        other_cg = os.path.join(sb.cgroup_root, "vmother")
        os.mkdir(app_cg)
        os.mkdir(other_cg)
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        write_pods(pods_file, [])
        agents = []
        try:
            yield types.SimpleNamespace(sb=sb, vm=vm, srv=srv, peer=peer, env=env,
                                        app=in_cgroup(vm, app_cg), other=in_cgroup(vm, other_cg),
                                        app_cg=app_cg, pods_file=pods_file, agents=agents)
        finally:
            for ag in agents:
                with contextlib.suppress(Exception):
                    ag.proc.kill()
                    ag.proc.wait(10)
            subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix",
                            sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                           capture_output=True, timeout=120, check=False)


def host_entry(b, **kw):
    return dict({"name": "vm", "netns": b.vm.netns, "cgroup": b.app_cg, "host": True,
                 "inbound_interfaces": ["eth0"]}, **kw)


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_host_workload_through_its_sidecar_then_removed(bed, mode):
    b = bed
    assert b.vm.pod.netns_cookie != system.netns_cookie("/proc/self/ns/net")  # not ours
    ag = HostAgent(b.sb, b.vm.netns, b.pods_file, mode)
    b.agents.append(ag)
    entry = host_entry(b) if mode == "ebpf" else host_entry(b, inbound_interfaces="*")
    # another netns with "host": true is refused (it is not the agent's)
    bad = host_entry(b, name="notours", netns=b.peer.netns, cgroup=b.peer.cgroup)
    write_pods(b.pods_file, [entry, bad])
    ag.wait_state("vm", "attached")
    err = ag.wait_state("notours", "error")
    assert "agent's own network namespace" in err["last_error"]
    assert istio_chains(b.peer.netns) == [] and tc.list_hooks(b.peer.pod) == []

    # outbound from the workload cgroup: through Envoy, to the server the app dialled
    n, out = delta(b.env, lambda: traffic.http_get(b.app, b.srv.ip4, 8080), OUT_CX)
    assert n == 1
    assert out["peer"] == [b.srv.ip4, 8080] and out["reply"]["pod"] == "srv"

    # the rest of the host netns
    n, out = delta(b.env, lambda: traffic.http_get(b.other, b.srv.ip4, 8080), OUT_CX)
    assert out["reply"]["pod"] == "srv"
    if mode == "ebpf":
        assert n == 0        # scoped by the workload's cgroup
    else:
        assert n == 1        # Istio's VM rules: the whole host netns but uid 1337

    # inbound to the workload's port from another netns: Envoy's 15006
    n, out = delta(b.env, lambda: traffic.http_get(b.peer, b.vm.ip4, 8080), IN_CX)
    assert n == 1 and out["reply"]["pod"] == "vm"

    cookie = b.vm.pod.netns_cookie
    rec_path = os.path.join(b.sb.state_dir, "pods", "vm.json")
    with open(rec_path) as f:
        rec = json.load(f)
    assert rec["host"] is True and rec["mode"] == mode
    if mode == "ebpf":
        with Maps(b.sb.pin_prefix) as m:
            cg = m["pod_cgroups"].lookup(structs.U64(cookie))
            assert cg is not None and cg.id == os.stat(b.app_cg).st_ino
        assert [h["interface"] for h in tc.list_hooks(b.vm.pod)
                if h["direction"] == "ingress"] == ["eth0"]
    else:
        assert istio_chains(b.vm.netns)

    # SIGTERM (what systemd sends the unit) leaves interception in place; a new agent adopts
    assert ag.stop() == 0
    assert delta(b.env, lambda: traffic.http_get(b.app, b.srv.ip4, 8080), OUT_CX)[0] == 1
    ag = HostAgent(b.sb, b.vm.netns, b.pods_file, mode)
    b.agents.append(ag)
    ag.wait_state("vm", "attached")
    assert '"action": "attach"' not in ag.output()      # in sync: nothing re-done

    # removal leaves nothing
    write_pods(b.pods_file, [])
    ag.wait(lambda: not os.path.exists(rec_path) and "vm" not in ag.pods(), 30, "detach")
    assert tc.list_hooks(b.vm.pod) == []
    assert istio_chains(b.vm.netns) == []
    if mode == "ebpf":
        with Maps(b.sb.pin_prefix) as m:
            assert m["pods"].lookup(structs.U64(cookie)) is None
            assert len(m["pod_cgroups"]) == 0
    assert delta(b.env, lambda: traffic.http_get(b.app, b.srv.ip4, 8080), OUT_CX)[0] == 0
    assert delta(b.env, lambda: traffic.http_get(b.peer, b.vm.ip4, 8080), IN_CX)[0] == 0
    assert ag.stop() == 0


def test_iptables_mode_refuses_an_interface_list_for_a_host_workload(bed):
    """Istio's rules capture inbound on every interface: a list is a bad combination,
    reported, nothing applied."""
    b = bed
    ag = HostAgent(b.sb, b.vm.netns, b.pods_file, "iptables")
    b.agents.append(ag)
    write_pods(b.pods_file, [host_entry(b)])
    err = ag.wait_state("vm", "error")
    assert "every interface" in err["last_error"] and "Traceback" not in ag.output()
    assert istio_chains(b.vm.netns) == []
    assert delta(b.env, lambda: traffic.http_get(b.app, b.srv.ip4, 8080), OUT_CX)[0] == 0
    assert ag.stop() == 0


def test_ebpf_fewer_inbound_interfaces_unhooks_the_dropped_one(bed):
    """A host entry whose inbound_interfaces shrinks is attached again: the interface no
    longer listed loses meshbpf's tc filter (and the clsact meshbpf added there)."""
    b = bed
    # a second Ethernet interface of the "host" (both veth ends stay in its netns)
    system.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], netns=b.vm.netns)
    system.run(["ip", "addr", "add", "10.251.0.1/24", "dev", "d0"], netns=b.vm.netns)
    for dev in ("d0", "d1"):
        system.run(["ip", "link", "set", dev, "up"], netns=b.vm.netns)
    ag = HostAgent(b.sb, b.vm.netns, b.pods_file, "ebpf")
    b.agents.append(ag)

    def hooked():
        return sorted(h["interface"] for h in tc.list_hooks(b.vm.pod) if h["direction"] == "ingress")

    write_pods(b.pods_file, [host_entry(b, inbound_interfaces=["eth0", "d0"])])
    ag.wait_state("vm", "attached")
    assert hooked() == ["d0", "eth0"]
    write_pods(b.pods_file, [host_entry(b, inbound_interfaces=["eth0"])])
    ag.wait(lambda: hooked() == ["eth0"], 10, "d0 unhooked")
    assert ag.pods()["vm"]["state"] == "attached"
    assert delta(b.env, lambda: traffic.http_get(b.peer, b.vm.ip4, 8080), IN_CX)[0] == 1
    write_pods(b.pods_file, [])
    ag.wait(lambda: "vm" not in ag.pods(), 30, "detach")
    assert tc.list_hooks(b.vm.pod) == []
    assert ag.stop() == 0
