"""meshbpf beside a CNI's socket load balancer (issue 12 item 7).

A socket LB (Cilium's, and others) attaches its own cgroup/connect4 high in the cgroup tree
and rewrites a ClusterIP to a backend at connect(). The kernel runs a socket's cgroup
programs from the deepest cgroup upwards, so meshbpf must attach BELOW the LB for the
sidecar to be told the ClusterIP (Istio routes by it). Here, in a test cgroup tree
<test>/node/kubepods/app, the test's own LB (bcc, cgroup/connect4: 10.96.0.10:80 ->
10.231.0.3:8080, a backend address in a test netns) is attached at <test>/node first, as a
CNI is there before meshbpf; meshbpf is attached through the service layer either at the
kubepods cgroup that meshbpf.k8s.cgroups finds below <test>/node (the daemon's
`--cgroup-root kubepods`): the app's real Envoy sidecar is told 10.96.0.10:80; or at
<test>/node beside the LB (after it): the sidecar is told the backend. Both cases reach the
backend (the sidecar's own connect meets the LB), so only the original destination tells
them apart."""

import ipaddress
import os
import re
import sys
import time

import pytest

from meshbpf import bpfsys
from meshbpf.config import InterceptConfig
from meshbpf.k8s import cgroups
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, traffic
from meshbpf.testbed.pods import run_ip

pytestmark = pytest.mark.kernel

CLUSTER_IP, CLUSTER_PORT = "10.96.0.10", 80
BACKEND_IP, BACKEND_PORT = "10.231.0.3", 8080

LB_C = r"""
#include <uapi/linux/bpf.h>
/* A ClusterIP becomes a backend at connect(), as a CNI's socket load balancer does. */
int lb_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 == LB_VIP && ctx->user_port == LB_VPORT) {
        ctx->user_ip4 = LB_BACKEND;
        ctx->user_port = LB_BPORT;
    }
    return 1;
}
"""


def _be32(ip):
    """An IPv4 address as the u32 a sock_addr context holds (network order in memory)."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, sys.byteorder)


def _be16(port):
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


class SocketLB:
    """The test's socket LB, attached (BPF_F_ALLOW_MULTI, as Cilium does) at `cgroup`."""

    def __init__(self, cgroup):
        from bcc import BPF
        self.b = BPF(text=LB_C.encode(), cflags=[
            f"-DLB_VIP={_be32(CLUSTER_IP)}U", f"-DLB_VPORT={_be16(CLUSTER_PORT)}U",
            f"-DLB_BACKEND={_be32(BACKEND_IP)}U", f"-DLB_BPORT={_be16(BACKEND_PORT)}U"])
        self.cgfd = None
        try:
            self.fn = self.b.load_func(b"lb_connect4", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                                       attach_type=bpfsys.BPF_CGROUP_INET4_CONNECT)
            self.cgfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            bpfsys.prog_attach(self.cgfd, self.fn.fd, bpfsys.BPF_CGROUP_INET4_CONNECT,
                               bpfsys.BPF_F_ALLOW_MULTI)
            self.attached = True
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.cgfd is not None:
            if getattr(self, "attached", False):
                bpfsys.prog_detach(self.cgfd, self.fn.fd, bpfsys.BPF_CGROUP_INET4_CONNECT)
                self.attached = False
            os.close(self.cgfd)
            self.cgfd = None
        self.b.cleanup()


def _sidecar_destinations(env, n, timeout=10):
    """(original destination, upstream host) of the first `n` outbound connections in the
    Envoy sidecar's access log, once they are written."""
    deadline = time.monotonic() + timeout
    while True:
        got = re.findall(r"\[virtualOutbound\] \S+ -> (\S+) via \S+ -> (\S+)", env.log())
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.parametrize("meshbpf_at,seen", [
    ("kubepods", f"{CLUSTER_IP}:{CLUSTER_PORT}"),     # below the LB: runs first
    ("node", f"{BACKEND_IP}:{BACKEND_PORT}"),         # beside it, after it: too late
])
def test_sidecar_sees_the_clusterip_only_when_meshbpf_is_below_the_socket_lb(meshbpf_at, seen):
    with Sandbox(name="socklb") as sb:
        backend = sb.add_pod("backend")
        run_ip(["addr", "add", f"{BACKEND_IP}/32", "dev", backend.ifname],
               netns=backend.netns_name)
        backend.start_http_server(BACKEND_PORT)
        app = sb.add_pod("app", cgroup="node/kubepods/app")
        node = os.path.join(sb.cgroup_root, "node")
        kubepods = cgroups.kubepods_cgroup(node)
        assert kubepods == os.path.join(node, "kubepods")
        env = app.start_envoy()
        lb = SocketLB(node)
        try:
            svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix,
                              cgroup_root=kubepods if meshbpf_at == "kubepods" else node)
            try:
                svc.attach(app.pod, InterceptConfig(), pod_id="app")
                out = traffic.http_get(app, CLUSTER_IP, CLUSTER_PORT, uid=1000)
                assert " 200 " in out["status"] and out["reply"]["pod"] == "backend", out
                # the app's connection went through its sidecar, told `seen`
                assert _sidecar_destinations(env, 1) == [(seen, seen)], env.log()[-3000:]
                # and the app sees as its peer the address it was told
                assert ":".join(map(str, out["peer"])) == seen
            finally:
                svc.cleanup()
        finally:
            lb.close()
