"""The inbound TIME_WAIT path (bpf/sk_lookup.c, sockops LISTEN_CB, meshbpf/ebpf/inbound/).

A SYN that reuses a 4-tuple the meshed server still holds in TIME_WAIT (the sidecar closed
first) is left by tc to the kernel's TIME_WAIT handling, which asks the pod's sk_lookup
program for a listener; it must get the sidecar's capture listener, whether that listener
existed before attach (adopted with pidfd_getfd) or started after (sockops LISTEN_CB), over
IPv4 and IPv6, and never the app's own listener. Everything goes again on cleanup.
"""

import os
import sys
import time

import pytest

from meshbpf import system
from meshbpf.bench.rules import CONN_SERVER
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import structs
from meshbpf.ebpf.inbound import policy
from meshbpf.service import NodeService
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox, traffic

pytestmark = pytest.mark.kernel

APP_PORT = 9000

# The app: answers "y" to any request, then closes first.
APP = CONN_SERVER

def _client(c, host, port, timeout=4):
    """From fixed local port `port`: "x" to the app, its "y" back, the server closes first
    (so the TIME_WAIT stays on the server). "ok" or what went wrong."""
    return traffic.exchange(c, host, APP_PORT, "x", "y", bind_port=port, timeout=timeout)


def _server_time_wait(s, port):
    return s.exec(["ss", "-Htan", "state", "time-wait", "dport", f"= :{port}"]).stdout


def _listener_keys(sb, cookie):
    with Maps(sb.pin_prefix) as m:
        return sorted(structs.decode_capture_listener_key(k)[1:]
                      for k in m[policy.MAP_LISTENERS].keys()
                      if structs.decode_capture_listener_key(k)[0] == cookie)


def _reuse_twice(c, s, env, host, port):
    """A first connection leaves a server-side TIME_WAIT; the second reuses its 4-tuple.
    Both must be served through the sidecar."""
    before = env.stats().get("tcp.inbound.downstream_cx_total", 0)
    assert _client(c, host, port) == "ok"
    tw = _server_time_wait(s, port)
    assert f":{port}" in tw, f"no server-side TIME_WAIT to reuse: {tw!r}"
    out = _client(c, host, port)
    assert out == "ok", (out, tw)
    assert env.stats()["tcp.inbound.downstream_cx_total"] - before == 2


@pytest.fixture
def pods():
    with Sandbox(name="twsk") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        app = s.spawn([sys.executable, "-c", APP, str(APP_PORT)], label="app")
        s.wait_port(APP_PORT, listening=True, proc=app)
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            yield sb, icp, c, s
        finally:
            icp.cleanup()


def test_listener_that_existed_before_attach_is_adopted(pods):
    sb, icp, c, s = pods
    env = s.start_envoy(access_log=False)
    rec = icp.attach(s.pod, InterceptConfig())
    skl = rec["inbound"]["sk_lookup"]
    assert skl["enabled"] and "adopt_error" not in skl, skl
    # Envoy's [::]:15006 (dual-stack) listener, found in /proc and taken with pidfd_getfd.
    assert [(l["family"], l["address"], l["pid"]) for l in skl["listeners"]] == \
        [(structs.MB_AF_INET6, "::", env.proc.pid)]
    assert _listener_keys(sb, s.pod.netns_cookie) == [(15006, structs.MB_AF_INET6)]
    assert os.path.exists(skl["link"])
    # IPv4 (via the dual-stack listener) and IPv6, from different client ports.
    _reuse_twice(c, s, env, s.ip4, 40001)
    _reuse_twice(c, s, env, s.ip6, 40002)
    with Maps(sb.pin_prefix) as m:
        assert len(m[policy.MAP_TW]) == 0       # every mark was consumed by sk_lookup


def test_listener_started_after_attach_comes_from_listen_cb(pods):
    sb, icp, c, s = pods
    rec = icp.attach(s.pod, InterceptConfig())          # no sidecar yet
    skl = rec["inbound"]["sk_lookup"]
    assert skl["enabled"] and skl["listeners"] == []
    cookie = s.pod.netns_cookie
    assert _listener_keys(sb, cookie) == []
    env = s.start_envoy(access_log=False)
    assert _listener_keys(sb, cookie) == [(15006, structs.MB_AF_INET6)]
    _reuse_twice(c, s, env, s.ip4, 40003)
    # A restarted sidecar: the closed listener leaves the map, the new one is added.
    env.stop()
    assert _listener_keys(sb, cookie) == []
    env = s.start_envoy(access_log=False)
    assert _listener_keys(sb, cookie) == [(15006, structs.MB_AF_INET6)]
    _reuse_twice(c, s, env, s.ip4, 40004)


def test_time_wait_path_never_reaches_the_app_without_the_sidecar(pods):
    sb, icp, c, s = pods
    env = s.start_envoy(access_log=False)
    icp.attach(s.pod, InterceptConfig())
    assert _client(c, s.ip4, 40005) == "ok"
    assert ":40005" in _server_time_wait(s, 40005)
    env.stop()
    # The capture port is captured: with no sidecar the reused 4-tuple must not reach the
    # app's own listener (which would answer "ok" at once).
    out = _client(c, s.ip4, 40005, timeout=2.5)
    assert out.startswith("failed") and "timed out" in out, out


def test_cleanup_removes_the_sk_lookup_link_and_entries(pods):
    sb, icp, c, s = pods
    s.start_envoy(access_log=False)
    rec = icp.attach(s.pod, InterceptConfig())
    link = rec["inbound"]["sk_lookup"]["link"]
    netns_ino = str(os.stat(s.netns).st_ino)
    assert os.path.basename(link) == f"sk_lookup-{s.pod.netns_cookie}"

    def netns_links():
        out = system.run(["bpftool", "-j", "link", "show"]).stdout
        import json
        return [l for l in json.loads(out or "[]")
                if l.get("type") == "netns" and str(l.get("netns_ino")) == netns_ino]
    assert len(netns_links()) == 1
    # detach alone removes the link, its pin and the pod's entries
    icp.detach(s.pod)
    assert not os.path.exists(link) and netns_links() == []
    with Maps(sb.pin_prefix) as m:
        for name in (policy.MAP_NETNS, policy.MAP_TW, policy.MAP_LISTENERS):
            assert len(m[name]) == 0, name
    # re-attach, then cleanup: nothing of ours is left
    icp.attach(s.pod, InterceptConfig())
    assert len(netns_links()) == 1
    icp.cleanup()
    assert netns_links() == []
    assert not os.path.exists(sb.pin_prefix) or os.listdir(sb.pin_prefix) == []
    # the app is reached directly again
    deadline = time.monotonic() + 5
    while _client(c, s.ip4, 40006) != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.2)
