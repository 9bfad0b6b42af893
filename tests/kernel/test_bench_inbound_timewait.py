"""Found by the benchmark: a meshed server pod must accept a client port reused after TIME_WAIT.

When the server's sidecar closes a connection first, the server keeps a TIME_WAIT socket for
that 4-tuple. A client that later connects again from the same port (normal: the client
kernel does not see the server's TIME_WAIT) must still be served through the sidecar, in
every interception mode, as the kernel's own TIME_WAIT handling allows (RFC 6191 / Linux's
TCP_TW_SYN). The connect/request/close loops of `meshbpf bench` hit this every few
thousand connections.
"""

import pytest

from meshbpf.bench import rules
from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, traffic

pytestmark = pytest.mark.kernel

CLIENT_PORT = 40000

@pytest.mark.parametrize("mode", ["iptables", "ebpf"])
def test_reused_client_port_after_server_time_wait(mode):
    with Sandbox(name="twreuse") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        rules.start_conn_server(s)
        env = s.start_envoy(access_log=False)
        icpt = NodeService(mode=mode, pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        icpt.attach(s.pod, InterceptConfig())
        try:
            # from a fixed port: send, read the reply, the server closes first (so the
            # TIME_WAIT stays on the server)
            first = traffic.exchange(c, s.ip4, 9000, "x", "y", bind_port=CLIENT_PORT, timeout=4)
            assert first == "ok", first
            tw = s.exec(["ss", "-Htan", "state", "time-wait", "dport", "= :%d" % CLIENT_PORT]).stdout
            assert f":{CLIENT_PORT}" in tw, f"no server-side TIME_WAIT to reuse: {tw!r}"
            again = traffic.exchange(c, s.ip4, 9000, "x", "y", bind_port=CLIENT_PORT, timeout=4)
            assert again == "ok", (again, tw)
            assert env.stats().get("tcp.inbound.downstream_cx_total", 0) >= 2
        finally:
            icpt.detach(s.pod)
            icpt.cleanup()
