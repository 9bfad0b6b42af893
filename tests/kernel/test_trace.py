"""`meshbpf trace` on a real kernel: a pod attached in eBPF mode through the service layer
connects once where its config redirects and once to an excluded range and an excluded
port; `meshbpf trace -o json` (a separate process, reading the pinned ring buffer without
bcc) prints one line per connection with the verdict and the rule that decided it. With
nobody tracing, the ring buffer is not written at all, and the gate is off afterwards."""

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


def test_trace_clears_the_gate_on_sigterm():
    with Sandbox(name="trterm") as sb:
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            svc.attach(sb.add_pod("app").pod, InterceptConfig(), pod_id="app-id")
            env = dict(os.environ, PYTHONPATH=REPO)
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshbpf", "trace", "--pin-prefix", sb.pin_prefix],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for_follower(proc, sb.pin_prefix)
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
