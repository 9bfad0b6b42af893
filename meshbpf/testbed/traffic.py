"""Traffic for test-bed pods: the apps (servers) and clients that tests, the demo and the
benchmark run inside pods, as scripts for a pod's Python (`procs.pod_python()`), plus the
helpers that start them and read what they report.

A script here is run as `python -c SCRIPT args...` in a pod, so it imports only the stdlib
and prints what it saw as one JSON line.
"""

import json
import textwrap

from ..errors import MeshbpfError
from .procs import pod_python

# What every client script starts with (here and in the tests' own scripts): a script runs
# alone in a pod, so it cannot import this module; the shared helpers are prepended as text.
SCRIPT_HELPERS = textwrap.dedent(r"""
    import json, socket, sys

    def recv_all(s, size=65536):
        data = b""
        while True:
            chunk = s.recv(size)
            if not chunk:
                return data
            data += chunk

    def recv_line(s, size=65536):
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(size)
            if not chunk:
                break
            data += chunk
        return data

    def tcp_listener(port, backlog=16, reuseport=False):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)     # dual stack on [::]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(backlog)
        return s

    def sockaddr(host, port):
        if "%" in host:              # a link-local address: the scope id must be given
            ip, dev = host.split("%", 1)
            return (ip, port, 0, socket.if_nametoindex(dev))
        return (host, port)
""")

# Serves on [::] (dual stack) by default; replies with the peer and local address it saw.
HTTP_APP = r"""
import http.server, json, socket, sys
port, pod, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pod": pod, "peer": list(self.client_address[:2]),
                           "local": list(self.connection.getsockname()[:2]),
                           "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.client_address[0], fmt % args))
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
print("serving", host, port, flush=True)
S((host, port), H).serve_forever()
"""



def start_http_server(pod, port=8080, uid=0, gid=None, host="::", timeout=10, userns=False):
    """A tiny HTTP app in `pod` replying with JSON {pod, peer, local, path} for every GET."""
    proc = pod.spawn([pod_python(), "-c", HTTP_APP, str(port), pod.name, host],
                     uid=uid, gid=gid, label=f"http{port}", userns=userns)
    proc.wait_port(port, host="127.0.0.1" if host in ("::", "0.0.0.0") else host,
                   timeout=timeout)
    return proc


# One TCP connection, as an app would make it: options in argv[1] (JSON, see `connect`).
# Prints one JSON line: {"peer", "local", then "status"+"reply" (http), "reply" (json) or
# "data" (text)}, or {"error", "errno", "during", "message"} when connecting ("connect") or the
# exchange after it ("exchange") failed. Anything else (a reply that does not parse) is a
# crash with a traceback.
CONNECT = SCRIPT_HELPERS + textwrap.dedent(r"""
    import time
    o = json.loads(sys.argv[1])
    host, port = o["host"], o["port"]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    out, step = {}, "connect"
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        for level, name, value in o["sockopts"]:
            s.setsockopt(level, name, bytes(value))
        if o["bind_port"]:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", o["bind_port"]))
        s.settimeout(o["timeout"])
        s.connect(sockaddr(host, port))
        step = "exchange"
        out["peer"], out["local"] = list(s.getpeername()[:2]), list(s.getsockname()[:2])
        time.sleep(o["hold"])
        if o["send"]:
            s.sendall(o["send"].encode())
        data = recv_all(s)
    except OSError as e:
        print(json.dumps({"error": type(e).__name__, "errno": e.errno, "during": step,
                          "message": str(e)}))
        sys.exit(0)
    if o["parse"] == "http":
        head, _, body = data.partition(b"\r\n\r\n")
        out["status"] = head.split(b"\r\n", 1)[0].decode()
        out["reply"] = json.loads(body)
    elif o["parse"] == "json":
        out["reply"] = json.loads(data)
    else:
        out["data"] = data.decode(errors="replace")
    print(json.dumps(out))
""")


def connect_argv(host, port, *, http=None, send=None, parse="json", bind_port=0, hold=0,
                 timeout=10, sockopts=()):
    """The command running CONNECT in a pod (for `pod.spawn`; `connect` runs it to the end).

    http: a path: send `GET <path> HTTP/1.0` and parse the reply as HTTP with a JSON body
        (what `HTTP_APP` answers); send: text to send after connecting (then half-open:
        the server closes first); parse: "json" (the whole reply is JSON, as the probe
        servers write it) or "text"; bind_port: a fixed local port (SO_REUSEADDR); hold:
        seconds to wait between connecting and sending; timeout: of connect and each read;
        sockopts: (level, name, bytes) set before connecting.
    """
    if http is not None:
        send, parse = f"GET {http} HTTP/1.0\r\nHost: t\r\n\r\n", "http"
    if parse not in ("http", "json", "text"):
        raise ValueError(f"parse {parse!r}: choose http, json or text")
    opts = {"host": host, "port": int(port), "send": send, "parse": parse,
            "bind_port": int(bind_port), "hold": float(hold), "timeout": float(timeout),
            "sockopts": [[int(level), int(name), list(bytes(value))]
                         for level, name, value in sockopts]}
    return [pod_python(), "-c", CONNECT, json.dumps(opts)]


def connect(pod, host, port, *, uid=0, gid=None, userns=False, allow_error=False,
            **opts):
    """One TCP connection from `pod`'s app (uid/gid, optionally in the pod's user namespace)
    to host:port; returns what CONNECT printed (see `connect_argv` for `opts`).

    allow_error: False: any failure raises MeshbpfError; "connect": a failed connect is
    returned as {"error", "errno", "during"} and a failure after it raises; True: every
    failure is returned (a reply that does not parse as {"during": "script", "stderr"}).
    """
    argv = connect_argv(host, port, **opts)
    what = f"client in pod {pod.name} -> {host}:{port}"
    r = pod.exec(argv, uid=uid, gid=gid, userns=userns,
                 timeout=float(opts.get("timeout", 10)) * 3 + float(opts.get("hold", 0)) + 20)
    if r.returncode != 0:
        if allow_error is True:
            return {"error": f"exit {r.returncode}", "errno": None, "during": "script",
                    "stderr": r.stderr[-1500:]}
        raise MeshbpfError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    out = json.loads(r.stdout)
    if "error" in out and not (allow_error is True
                               or (allow_error == "connect" and out["during"] == "connect")):
        raise MeshbpfError(f"{what}: {out['error']} during {out['during']}")
    return out


def exchange(pod, host, port, send, expect, **kw):
    """Connect, send `send`, read until the server closes (it closes first, so a TIME_WAIT
    stays on its side): "ok" when the reply was `expect`, else what went wrong ("failed
    during connect: TimeoutError: timed out", "bad reply ..."). `kw` as for `connect`."""
    out = connect(pod, host, port, send=send, parse="text", allow_error=True, **kw)
    if "error" in out:
        return f"failed during {out['during']}: {out['error']}: {out.get('message') or ''}"
    return "ok" if out["data"] == expect else f"bad reply {out['data']!r}"


def http_get(pod, host, port=8080, path="/", **kw):
    """GET `path` from the HTTP_APP at host:port (see `connect`): {"peer", "local",
    "status", "reply"} where "reply" is what the app saw ({pod, peer, local, path})."""
    return connect(pod, host, port, http=path, **kw)


# Tells each client which listener answered and what both ends look like, as one JSON line
# {"server": port, "local", "peer"}, then closes. Dual stack; "reuseport" puts the listener
# in a SO_REUSEPORT group (as Envoy does by default).
WHOAMI = SCRIPT_HELPERS + textwrap.dedent(r"""
    port = int(sys.argv[1])
    s = tcp_listener(port, backlog=1024, reuseport=sys.argv[2:] == ["reuseport"])
    print("listening", port, flush=True)
    while True:
        c, peer = s.accept()
        local = c.getsockname()
        c.sendall((json.dumps({"server": port, "local": [local[0], local[1]],
                               "peer": [peer[0], peer[1]]}) + "\n").encode())
        c.close()
""")


def start_whoami(pod, port, reuseport=False, uid=0):
    """WHOAMI listening on `port` in `pod` (root by default); returns its Proc."""
    proc = pod.spawn([pod_python(), "-c", WHOAMI, str(port), *(["reuseport"] if reuseport else [])],
                     uid=uid, label=f"srv{port}")
    pod.wait_port(port, listening=True, proc=proc)
    return proc


# Bulk transfer, checked end to end. The sink (argv: port [first pause]) reads every
# connection to EOF (after `first` bytes it stops reading for `pause` seconds: a reader
# that stops and resumes) and answers with the length and sha256 of what it got.
BULK_SINK = SCRIPT_HELPERS + textwrap.dedent(r"""
    import hashlib, time
    first = int(sys.argv[2]) if len(sys.argv) > 2 else None
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0
    srv = tcp_listener(int(sys.argv[1]))
    print("listening", flush=True)
    while True:
        c, _ = srv.accept()
        h, n, paused = hashlib.sha256(), 0, first is None
        while True:
            if not paused and n >= first:
                time.sleep(pause)
                paused = True
            d = c.recv(1 << 20 if first is None else 1 << 16)   # a slow reader: small steps
            if not d:
                break
            h.update(d)
            n += len(d)
        c.sendall(f"{n} {h.hexdigest()}".encode())
        c.close()
""")

# The source (argv: host port total [most]) sends `total` pseudo-random bytes in odd-sized
# writes (up to `most` bytes, default 65000), half-closes, then compares the sink's answer
# (length and sha256: catches loss and reordering); prints "ok <n>".
BULK_SOURCE = SCRIPT_HELPERS + textwrap.dedent(r"""
    import hashlib, random
    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    most = int(sys.argv[4]) if len(sys.argv) > 4 else 65000
    rnd = random.Random(7)
    block = rnd.randbytes(1 << 20)
    s = socket.create_connection((host, port), timeout=60)
    h, sent, i = hashlib.sha256(), 0, 0
    while sent < total:
        size = min(total - sent, 1000 + (i * 7919) % most)
        off = (i * 104729) % (len(block) - min(size, 65536))
        chunk = (block[off:] + block)[:size]
        s.sendall(chunk)
        h.update(chunk)
        sent += size
        i += 1
    s.shutdown(socket.SHUT_WR)
    n, digest = recv_all(s, 4096).decode().split()
    assert int(n) == total, (n, total)
    assert digest == h.hexdigest(), "payload corrupted or reordered"
    print("ok", n)
""")


# New connections in a loop for SECONDS (an HTTP GET each); prints "<ok> <failed>" and each
# error on stderr: argv HOST PORT SECONDS. Proves no connection fails while rules change.
CONNECT_LOOP = textwrap.dedent("""
    import socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ok = fail = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            while s.recv(65536):
                pass
            s.close()
            ok += 1
        except OSError as e:
            fail += 1
            print("error", e, file=sys.stderr)
    print(ok, fail)
""")
