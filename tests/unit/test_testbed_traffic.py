"""The test bed's traffic scripts and helpers (meshbpf/testbed/traffic.py), run on this
process's loopback without root: a stand-in pod whose exec() runs the command here."""

import socket
import subprocess
import sys
import time

import pytest

from meshbpf.errors import MeshbpfError
from meshbpf.testbed import traffic

# Answers "y" to any request, then closes first (as the benchmark's connection server).
Y_SERVER = r"""
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(1)
    c.sendall(b"y")
    c.close()
"""


class LocalPod:
    """Just enough of a SandboxPod for traffic.connect: exec() runs here, as we are."""

    name = "local"

    def exec(self, cmd, uid=0, gid=None, userns=False, timeout=30):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    procs = []

    def start(script, *args):
        port = _free_port()
        p = subprocess.Popen([sys.executable, "-c", script, str(port), *map(str, args)],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert "listening" in p.stdout.readline()
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_http_get_reports_both_ends_and_the_apps_reply():
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", traffic.HTTP_APP, str(port), "b", "127.0.0.1"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("serving")
        out = traffic.http_get(LocalPod(), "127.0.0.1", port, path="/x")
    finally:
        p.kill()
        p.wait()
    assert out["status"].startswith("HTTP/1.0 200")
    assert out["peer"] == ["127.0.0.1", port] and out["local"][0] == "127.0.0.1"
    assert out["reply"]["pod"] == "b" and out["reply"]["path"] == "/x"
    assert out["reply"]["peer"] == out["local"]          # the app saw our socket


def test_a_refused_connect_is_returned_or_raised_as_asked():
    port = _free_port()                                   # nothing listens there
    out = traffic.connect(LocalPod(), "127.0.0.1", port, allow_error="connect", timeout=2)
    assert out["error"] == "ConnectionRefusedError" and out["during"] == "connect"
    with pytest.raises(MeshbpfError, match="ConnectionRefusedError during connect"):
        traffic.connect(LocalPod(), "127.0.0.1", port, timeout=2)


def test_a_reply_that_does_not_parse_is_an_error_not_a_result(serve):
    port = serve(Y_SERVER)
    with pytest.raises(MeshbpfError, match="exit 1"):
        traffic.connect(LocalPod(), "127.0.0.1", port, send="x")     # "y" is not JSON
    out = traffic.connect(LocalPod(), "127.0.0.1", port, send="x", allow_error=True)
    assert out["during"] == "script" and "JSONDecodeError" in out["stderr"]


def test_exchange_from_a_fixed_port(serve):
    port = serve(Y_SERVER)
    local = _free_port()
    assert traffic.exchange(LocalPod(), "127.0.0.1", port, "x", "y", bind_port=local) == "ok"
    assert traffic.exchange(LocalPod(), "127.0.0.1", port, "x", "z").startswith("bad reply 'y'")
    refused = traffic.exchange(LocalPod(), "127.0.0.1", _free_port(), "x", "y", timeout=2)
    assert refused.startswith("failed during connect: ConnectionRefusedError"), refused


def test_whoami_names_the_listener(serve):
    port = serve(traffic.WHOAMI)
    out = traffic.connect(LocalPod(), "127.0.0.1", port)
    assert out["reply"]["server"] == port
    assert out["reply"]["peer"][1] == out["local"][1]


@pytest.mark.parametrize("pause", [[], [100000, 0.2]], ids=["sink", "pausing-sink"])
def test_bulk_source_and_sink_agree_on_every_byte(serve, pause):
    port = serve(traffic.BULK_SINK, *pause)
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", traffic.BULK_SOURCE, "127.0.0.1", str(port),
                        "300000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "300000"], r.stderr
    assert time.monotonic() - t >= (pause[1] if pause else 0)


def test_connect_argv_checks_its_options():
    argv = traffic.connect_argv("::1", 80, http="/p", sockopts=[(41, 59, b"\x00\x01")])
    assert argv[1] == "-c" and argv[2] == traffic.CONNECT
    with pytest.raises(ValueError):
        traffic.connect_argv("::1", 80, parse="xml")
