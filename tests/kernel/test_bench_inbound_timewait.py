"""Found by the benchmark: a meshed server pod must accept a client port reused after TIME_WAIT.

When the server's sidecar closes a connection first, the server keeps a TIME_WAIT socket for
that 4-tuple. A client that later connects again from the same port (normal: the client
kernel does not see the server's TIME_WAIT) must still be served through the sidecar, in
every interception mode, as the kernel's own TIME_WAIT handling allows (RFC 6191 / Linux's
TCP_TW_SYN). The connect/request/close loops of `meshbpf bench` hit this every few
thousand connections.
"""

import sys

import pytest

from meshbpf.bench import rules
from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.sandbox import Sandbox

pytestmark = pytest.mark.kernel

CLIENT_PORT = 40000

# Connect from a fixed port, send, read the reply, wait for the server to close first
# (so the TIME_WAIT stays on the server), then close. Prints the outcome.
CLIENT = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(4)
t = time.monotonic()
try:
    s.connect((sys.argv[1], 9000))
    s.sendall(b"x")
    reply = s.recv(1)
    eof = s.recv(1) == b""
    print("ok" if reply == b"y" and eof else f"bad reply {reply!r} eof={eof}")
except OSError as e:
    print(f"failed after {time.monotonic() - t:.1f}s: {e!r}")
finally:
    s.close()
"""


@pytest.mark.parametrize("mode", ["iptables", "ebpf"])
def test_reused_client_port_after_server_time_wait(mode):
    with Sandbox(name="twreuse") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        rules.start_conn_server(s)
        env = s.start_envoy(access_log=False)
        icpt = NodeService(mode=mode, pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        icpt.attach(s.pod, InterceptConfig())
        try:
            first = c.exec([sys.executable, "-c", CLIENT, s.ip4, str(CLIENT_PORT)], timeout=30)
            assert first.stdout.strip() == "ok", first.stdout + first.stderr
            tw = s.exec(["ss", "-Htan", "state", "time-wait", "dport", "= :%d" % CLIENT_PORT]).stdout
            assert f":{CLIENT_PORT}" in tw, f"no server-side TIME_WAIT to reuse: {tw!r}"
            again = c.exec([sys.executable, "-c", CLIENT, s.ip4, str(CLIENT_PORT)], timeout=30)
            assert again.stdout.strip() == "ok", (again.stdout + again.stderr, tw)
            assert env.stats().get("tcp.inbound.downstream_cx_total", 0) >= 2
        finally:
            icpt.detach(s.pod)
            icpt.cleanup()
