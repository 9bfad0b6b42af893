"""Lifecycle end to end through the CLI: mode choice, many pods at once, cleanup."""

import concurrent.futures
import json
import os
import re
import time

import pytest

from meshbpf.testbed import Sandbox, traffic

from .test_e2e import APP, OUT_CX, attach, cli, delta, iptables_rules, pod_args, request

pytestmark = pytest.mark.kernel


def test_auto_mode_picks_ebpf_here_and_iptables_on_an_assumed_3_10_kernel():
    with Sandbox(name="auto") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(APP)
        env = a.start_envoy()
        rec = json.loads(attach(sb, a, "auto", "--output", "json").stdout)
        assert rec["mode"] == "ebpf", rec
        cli(sb, "detach", *pod_args(a))
        r = cli(sb, "attach", *pod_args(a), "--assume-kernel", "3.10", "--output", "json")
        rec = json.loads(r.stdout)
        assert rec["mode"] == "iptables"
        assert "3.10" in rec["reason"], rec["reason"]
        assert iptables_rules(a), "iptables mode must have installed its rules"
        n, res = delta(env, OUT_CX, lambda: request(a, b.ip4))
        assert n >= 1 and res["peer"] == [b.ip4, APP]
        cli(sb, "cleanup")


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_many_pods_at_once_each_sidecar_gets_its_own_original_destination(mode):
    with Sandbox(name=f"many-{mode}") as sb:
        clients = [sb.add_pod(f"c{i}") for i in range(4)]
        servers = [sb.add_pod(f"s{i}") for i in range(4)]
        for s in servers:
            s.start_http_server(APP)
        envs = [c.start_envoy() for c in clients]
        for c in clients:
            attach(sb, c, mode)

        def run(i):
            return [request(clients[i], servers[i].ip4)["reply"]["pod"] for _ in range(10)]

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(run, range(4)))
        for i, replies in enumerate(got):
            assert replies == [f"s{i}"] * 10, f"client c{i} reached {replies}"
            # Each sidecar's own access log shows only its own destination, 10 times.
            deadline = time.monotonic() + 10
            while True:
                dests = re.findall(r"-> (\d+\.\d+\.\d+\.\d+):8080 via", envs[i].log())
                if len(dests) >= 10 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(dests) == 10 and set(dests) == {servers[i].ip4}, dests
        cli(sb, "cleanup")


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_cleanup_leaves_nothing_behind(mode):
    with Sandbox(name=f"clean-{mode}") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        before = {p.name: iptables_rules(p) for p in (a, b)}
        for p in (a, b):
            attach(sb, p, mode)
        assert json.loads(cli(sb, "status", "-o", "json").stdout)["pods"]
        cli(sb, "cleanup")
        assert not os.path.exists(sb.pin_prefix), os.listdir(sb.pin_prefix)
        att = a.exec(["bpftool", "cgroup", "show", sb.cgroup_root])
        assert att.stdout.strip() == "", att.stdout
        for p in (a, b):
            assert iptables_rules(p) == before[p.name]
            for direction in ("ingress", "egress"):
                f = p.exec(["tc", "filter", "show", "dev", p.ifname, direction])
                assert f.stdout.strip() == "", f.stdout
            q = p.exec(["tc", "qdisc", "show", "dev", p.ifname])
            assert "clsact" not in q.stdout
            link = p.exec(["ip", "link", "show", p.ifname])
            assert "xdp" not in link.stdout
        st = json.loads(cli(sb, "status", "-o", "json").stdout)
        assert st["pods"] == [] and st["ebpf"] == {"loaded": False}


def test_a_time_wait_left_by_iptables_mode_does_not_hide_the_sidecar_from_ebpf_mode():
    """Under iptables mode B's sidecar socket for C's connection is B:15006 (REDIRECT), and
    it stays in TIME_WAIT. When B switches to eBPF mode and C dials again from the same
    source port, inbound steering must still find the capture listener (not the TIME_WAIT
    on the capture port) and deliver the connection through the sidecar."""
    with Sandbox(name="switch") as sb:
        b, c = sb.add_pod("b"), sb.add_pod("c")
        b.start_http_server(APP)
        env_b = b.start_envoy()
        for mode in ("iptables", "ebpf"):
            attach(sb, b, mode)
            # one request from a fixed source port; the server side closes first, so the
            # server pod keeps a TIME_WAIT for this client 4-tuple
            n, out = delta(env_b, "tcp.inbound.downstream_cx_total", lambda: traffic.http_get(
                c, b.ip4, APP, bind_port=40000, timeout=5, allow_error=True))
            assert out.get("status", "").startswith("HTTP/1.0 200"), f"{mode}: {out}"
            assert n == 1, f"{mode}: the connection did not go through B's sidecar"
            if mode == "iptables":
                tw = b.exec(["ss", "-tanH", "state", "time-wait", "sport", "= :15006"]).stdout
                assert f"{c.ip4}]:40000" in tw or f"{c.ip4}:40000" in tw, tw
            cli(sb, "detach", *pod_args(b))
        cli(sb, "cleanup")
