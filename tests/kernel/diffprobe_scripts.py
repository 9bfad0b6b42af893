"""The two programs the differential suite runs inside sandbox pods (stdlib only).

PROBE_SERVER listens, as one process, on every port a verdict can name: TCP on
8080/9090/53/15021 (the app and the destinations), 15001 (outbound), 15006 (inbound) and
15053 (DNS), UDP on 53 and 15053, all dual-stack on [::] (it binds as root, then runs as the given
uid/gid, the proxy's; UDP 15053 only on 127.0.0.1 and ::1, as Istio's DNS proxy). For each TCP connection it
answers one JSON line: which pod and listening port accepted it, the peer and local
address of the accepted socket, and what SO_ORIGINAL_DST answered on it. On the ports
it is told to forward (15001 in the meshed peer pod) it then behaves as a sidecar's passthrough: it dials the original destination (as its own
uid, the proxy's) and adds that hop's answer as "up". UDP datagrams are answered with
the same record (no SO_ORIGINAL_DST for UDP).

PROBE_CLIENT reads a JSON list of probes on stdin, runs them in order as the uid/gid it was
started with, and prints a JSON list of raw results: outcome, getpeername/getsockname of
the app's socket (recvfrom's source for unconnected UDP) and the listener's record (with
"http": the JSON reply of the sandbox's HTTP app, {pod, peer, local}).

Both start with meshbpf.testbed.traffic.SCRIPT_HELPERS (recv_all, recv_line, sockaddr).
"""

from meshbpf.testbed.traffic import SCRIPT_HELPERS

PROBE_SERVER = SCRIPT_HELPERS + r"""
import json, os, select, socket, struct, sys, threading

pod = sys.argv[1]
tcp_ports = [int(p) for p in sys.argv[2].split(",")]
udp_ports = [int(p) for p in sys.argv[3].split(",")]
forward = set(int(p) for p in sys.argv[4].split(",") if p)
uid, gid = int(sys.argv[5]), int(sys.argv[6])
loopback_udp = set(int(p) for p in sys.argv[7].split(",") if p)
transparent = set(int(p) for p in sys.argv[8].split(",") if p)

def addr(sa):
    return [sa[0], sa[1]]

def orig_dst(c, peer):
    v4 = peer[0].startswith("::ffff:") or "." in peer[0]
    try:
        if v4:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
        else:
            raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
    except OSError as e:
        return "error:" + (errno_name(e))
    fam = struct.unpack("=H", raw[:2])[0]
    port = struct.unpack("!H", raw[2:4])[0]
    if fam == socket.AF_INET:
        return [socket.inet_ntop(socket.AF_INET, raw[4:8]), port]
    if fam == socket.AF_INET6 and len(raw) >= 24:
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), port]
    return "error:family%d" % fam

def errno_name(e):
    import errno
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__

def hop(dst):
    host, port = dst
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        data = recv_line(s)
        return json.loads(data) if data else {"outcome": "empty"}
    except socket.timeout:
        return {"outcome": "timeout"}
    except OSError as e:
        return {"outcome": errno_name(e)}
    finally:
        s.close()

def handle(c, port):
    try:
        peer = c.getpeername()
        rec = {"outcome": "ok", "pod": pod, "port": port, "peer": addr(peer),
               "local": addr(c.getsockname()), "orig": orig_dst(c, peer)}
        if port in forward and isinstance(rec["orig"], list):
            rec["up"] = hop(tuple(rec["orig"]))
    except Exception as e:  # a probe bug must show in the verdict, not as a closed socket
        rec = {"outcome": "server-error:%s" % e, "pod": pod, "port": port}
    try:
        c.sendall(json.dumps(rec).encode() + b"\n")
    except OSError:
        pass
    finally:
        c.close()

socks = {}

def listen(kind, port):
    if kind == "tcp":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if port in transparent:     # Istio's TPROXY mode: the inbound listener is transparent
            s.setsockopt(socket.SOL_IP, 19, 1)              # IP_TRANSPARENT
            s.setsockopt(socket.IPPROTO_IPV6, 75, 1)        # IPV6_TRANSPARENT
        s.bind(("::", port))
        s.listen(128)
        socks[s] = ("tcp", port)
    elif port in loopback_udp:
        # Istio's DNS proxy listens on localhost: its replies then leave from the address
        # the redirect sent the query to, which conntrack maps back to the server's
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.bind((host, port))
            socks[u] = ("udp", port)
    else:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", port))
        socks[u] = ("udp", port)

wanted = [("tcp", p) for p in tcp_ports] + [("udp", p) for p in udp_ports]
for kind, port in wanted:
    if port < 1024 or (kind, port) in [("tcp", t) for t in transparent]:
        listen(kind, port)          # privileged (low port, IP_TRANSPARENT): as root
# then become the proxy, whose connects the rules leave alone. Sockets made from here on
# belong to it: iptables' owner match (Istio's DNS conntrack zones) looks at the uid that
# created a socket, not at the process using it.
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
for kind, port in wanted:
    if port >= 1024 and (kind, port) not in [("tcp", t) for t in transparent]:
        listen(kind, port)
print("ready", flush=True)
while True:
    ready, _, _ = select.select(list(socks), [], [])
    for s in ready:
        kind, port = socks[s]
        if kind == "tcp":
            try:
                c, _ = s.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(c, port), daemon=True).start()
        else:
            data, peer = s.recvfrom(2048)
            rec = {"outcome": "ok", "pod": pod, "port": port, "peer": addr(peer),
                   "local": None, "orig": None}
            s.sendto(json.dumps(rec).encode(), peer)
"""

PROBE_CLIENT = SCRIPT_HELPERS + r"""
import errno, json, socket, sys

def name(e):
    if isinstance(e, socket.timeout):
        return "timeout"
    return errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else type(e).__name__

def addr(x):
    return [x[0], x[1]]

def run(p):
    host, port, proto = p["host"], p["port"], p["proto"]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    out = {"id": p["id"], "outcome": None, "app_peer": None, "app_local": None, "rec": None}
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(p.get("timeout", 2))
    try:
        if proto == "tcp":
            s.connect(sockaddr(host, port))
            out["app_peer"] = addr(s.getpeername())
            out["app_local"] = addr(s.getsockname())
            if p.get("http"):           # a real app behind a real sidecar: one GET
                s.sendall(b"GET /diff HTTP/1.0\r\nHost: x\r\n\r\n")
                data = recv_all(s)
                body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
                out["rec"] = json.loads(body) if body else None
                out["outcome"] = "ok" if body else "empty"
                return out
            data = recv_line(s)
            out["rec"] = json.loads(data) if data else None
            out["outcome"] = "ok" if data else "empty"
        else:
            if p.get("connected"):
                s.connect(sockaddr(host, port))
                s.send(b"q")
                data = s.recv(4096)
                out["app_peer"] = addr(s.getpeername())
            else:
                s.sendto(b"q", sockaddr(host, port))
                data, src = s.recvfrom(4096)
                out["app_peer"] = addr(src)
            out["app_local"] = addr(s.getsockname())
            out["rec"] = json.loads(data)
            out["outcome"] = "ok"
    except (OSError, ValueError) as e:
        out["outcome"] = name(e) if isinstance(e, OSError) else "bad-reply"
    finally:
        s.close()
    return out

print(json.dumps([run(p) for p in json.load(sys.stdin)]))
"""
