"""Traffic for test-bed pods: the apps (servers) and clients that tests, the demo and the
benchmark run inside pods, as scripts for a pod's Python (`procs.pod_python()`), plus the
helpers that start them and read what they report.

A script here is run as `python -c SCRIPT args...` in a pod, so it imports only the stdlib
and prints what it saw as one JSON line.
"""

import json

from .procs import pod_python

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
