"""`meshbpf trace` on a real kernel: a pod attached in eBPF mode through the service layer
connects once where its config redirects and once to an excluded range and an excluded
port; `meshbpf trace -o json` (a separate process, reading the pinned ring buffer without
bcc) prints one line per connection with the verdict and the rule that decided it. With
nobody tracing, the ring buffer is not written at all, and the gate is off afterwards.
Inbound: a client pod connects to a meshed pod on a captured port (before and after its
capture listener is up) and on an excluded port: one event each, from tc_inbound. A second
follower is refused while one runs."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import trace
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, pod_python

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# connect() to each host:port in turn; the decision is made in connect() itself, so no
# listener is needed (the redirected one meets no sidecar: refused; the others time out)
CONNECT = textwrap.dedent("""
    import socket, sys
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect((host, int(port)))
        except OSError:
            pass
        s.close()
    print("done")
""")

REDIRECTED = "10.77.0.9:80"      # not excluded: include '*'
EXCL_CIDR = "10.250.0.9:80"      # in outbound_ip_ranges_exclude
EXCL_PORT = "10.77.0.9:22"       # outbound_ports_exclude


def _connect(pod, *targets):
    r = pod.exec([pod_python(), "-c", CONNECT, *targets], uid=1000, timeout=30)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr


# a stand-in for the sidecar's inbound listener: accept and close, forever
LISTEN = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(64)
    while True:
        s.accept()[0].close()
""")


def _start_trace(pin_prefix, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "meshbpf", "trace", "--pin-prefix", pin_prefix, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=60):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _producer_pos(pin_prefix):
    reader = trace.RingReader(os.path.join(pin_prefix, "maps", trace.EVENTS_MAP))
    try:
        return reader.positions()[1]
    finally:
        reader.close()


def test_trace_shows_a_redirected_and_excluded_connections_and_costs_nothing_untraced():
    with Sandbox(name="trace") as sb:
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        app = sb.add_pod("app")
        try:
            svc.attach(app.pod, InterceptConfig(outbound_ip_ranges_exclude="10.250.0.0/16",
                                                outbound_ports_exclude="22"), pod_id="app-id")
            name = svc.store.load("app-id")["name"]
            # nobody follows: decisions are made, nothing is written
            assert trace.read_gate(sb.pin_prefix) == 0
            before = _producer_pos(sb.pin_prefix)
            _connect(app, REDIRECTED, EXCL_CIDR, EXCL_PORT)
            assert _producer_pos(sb.pin_prefix) == before

            env = dict(os.environ, PYTHONPATH=REPO)
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshbpf", "trace", "-o", "json", "--count", "3",
                 "--timeout", "60", "--pod", name, "--pin-prefix", sb.pin_prefix],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for_follower(proc, sb.pin_prefix)
                _connect(app, REDIRECTED, EXCL_CIDR, EXCL_PORT)
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 0, err
            lines = [json.loads(line) for line in out.splitlines()]
            got = [(e["pod"], e["pod_id"], e["direction"], e["destination"], e["verdict"],
                    e["rule"], e["to_port"], e["uid"]) for e in lines]
            assert got == [
                (name, "app-id", "out", REDIRECTED, "redirected", "include_all", 15001, 1000),
                (name, "app-id", "out", EXCL_CIDR, "bypassed", "excluded_cidr", None, 1000),
                (name, "app-id", "out", EXCL_PORT, "bypassed", "excluded_port", None, 1000),
            ]
            # the follower is gone: the gate is off again, and nothing more is written
            assert trace.read_gate(sb.pin_prefix) == 0
            before = _producer_pos(sb.pin_prefix)
            _connect(app, REDIRECTED)
            assert _producer_pos(sb.pin_prefix) == before
        finally:
            svc.cleanup()


def _wait_for_follower(proc, pin_prefix):
    """Until the `meshbpf trace` process `proc` has turned the gate on."""
    end = time.monotonic() + 30
    while trace.read_gate(pin_prefix) != 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "meshbpf trace never set trace_on"
        time.sleep(0.05)


def test_trace_shows_inbound_connections_with_their_verdicts():
    """One event per inbound connection at a meshed pod's interface. Pod srv (include '*',
    exclude 7070): a captured port with no capture listener yet (dropped), the same port
    once the listener is up (redirected to 15006), the excluded port (bypassed). Pod srv2
    (include 8080 only): its listed port (redirected) and another (bypassed, not included).
    `--pod` keeps one pod's events (srv2's are made while srv's follower runs); the client
    pod is not meshed, so its own connects make no events."""
    with Sandbox(name="trin") as sb:
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        srv, srv2 = sb.add_pod("srv"), sb.add_pod("srvb")
        cli = sb.add_pod("cli")
        try:
            svc.attach(srv.pod, InterceptConfig(inbound_ports_exclude="7070"), pod_id="srv-id")
            svc.attach(srv2.pod, InterceptConfig(inbound_ports_include="8080"), pod_id="srv2-id")
            name, name2 = (svc.store.load(i)["name"] for i in ("srv-id", "srv2-id"))
            captured, excluded = f"{srv.ip4}:8080", f"{srv.ip4}:7070"
            listed, unlisted = f"{srv2.ip4}:8080", f"{srv2.ip4}:9090"

            def follow(pod, n, *connects):
                proc = _start_trace(sb.pin_prefix, "-o", "json", "--count", str(n),
                                    "--timeout", "60", "--pod", pod)
                try:
                    _wait_for_follower(proc, sb.pin_prefix)
                    for step in connects:
                        step()
                finally:
                    out, err = _finish(proc)
                assert proc.returncode == 0, err
                return [(e["pod"], e["pod_id"], e["direction"], e["destination"], e["verdict"],
                         e["rule"], e["to_port"], e["uid"])
                        for e in map(json.loads, out.splitlines())]

            def listeners():
                for p in (srv, srv2):
                    p.spawn([pod_python(), "-c", LISTEN, "15006"], uid=1337)
                    p.wait_port(15006, listening=True)

            got = follow(name, 3, lambda: _connect(cli, captured), listeners,
                         lambda: _connect(cli, unlisted, captured, excluded))
            assert got == [
                (name, "srv-id", "in", captured, "dropped", "no_listener", None, None),
                (name, "srv-id", "in", captured, "redirected", "in_include_all", 15006, None),
                (name, "srv-id", "in", excluded, "bypassed", "in_excluded_port", None, None),
            ]
            got = follow(name2, 2, lambda: _connect(cli, listed, unlisted))
            assert got == [
                (name2, "srv2-id", "in", listed, "redirected", "in_included_port", 15006, None),
                (name2, "srv2-id", "in", unlisted, "bypassed", "in_not_included", None, None),
            ]
            assert trace.read_gate(sb.pin_prefix) == 0
        finally:
            svc.cleanup()


def test_trace_one_follower_at_a_time_and_clears_the_gate_on_sigterm():
    with Sandbox(name="trterm") as sb:
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            svc.attach(sb.add_pod("app").pod, InterceptConfig(), pod_id="app-id")
            proc = _start_trace(sb.pin_prefix)
            try:
                _wait_for_follower(proc, sb.pin_prefix)
                # a second follower would share the ring's one reader position and turn
                # the gate off when it exits: refused, and the first one keeps following
                second = _start_trace(sb.pin_prefix, "--timeout", "5")
                out2, err2 = _finish(second)
                assert second.returncode == 1, (out2, err2)
                assert "another `meshbpf trace` already follows" in err2
                assert "Traceback" not in err2 and out2 == ""
                assert trace.read_gate(sb.pin_prefix) == 1 and proc.poll() is None
                proc.terminate()
                _, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 0, err
            assert trace.read_gate(sb.pin_prefix) == 0
        finally:
            svc.cleanup()
