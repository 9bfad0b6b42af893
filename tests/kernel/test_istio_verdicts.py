"""eBPF mode gives Istio's verdicts: the same traffic under iptables mode (Istio's exact
rules, the oracle) and under eBPF mode must land on the same listener (or none), and
SO_ORIGINAL_DST, getpeername, getsockname and the DNS answer must be the same.

Pod `c` is meshed. Instead of Envoy it runs plain listeners that report what they see:
15001 (outbound), 15006 (inbound), 8080 (the app) and a DNS server on 15053 (the sidecar's
DNS proxy), all as uid 1337. Pod `s` (not meshed) runs 8080 and a DNS server on 53. Each
case is run once per mode in the same pods, and the two results are compared.

Cases (issue 9): DNS on connected UDP sockets (python connect()+send() and glibc's resolver
through `getent`), DNS honouring outbound port excludes and owner groups, the proxy
dialling any local address over `lo` (inbound listener), the app's getsockname, and inbound
capture of addresses the pod got after attach and of its IPv6 link-local address.
"""

import contextlib
import json
import os
import tempfile
import textwrap

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, pod_python, traffic

pytestmark = pytest.mark.kernel

APP_UID = 1000
PROXY_UID = 1337
ANSWER_REAL = "192.0.2.53"       # the DNS server's answer
ANSWER_SIDECAR = "192.0.2.150"   # the sidecar DNS proxy's answer
ANSWER_LOCAL = "192.0.2.1"       # a DNS server in the meshed pod itself (port 53)

# Listeners: "tcp:PORT" reports {l, orig, peer, local} as JSON; "dns:PORT:IP[:lo]" answers
# DNS A queries with IP over UDP and TCP.
SERVE = textwrap.dedent("""
    import json, socket, struct, sys, threading
    def norm(a):
        return [a[0], a[1]]
    def orig(c):
        try:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        except OSError:
            pass
        try:
            raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
            return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
        except OSError as e:
            return "error %d" % e.errno
    def answer(q, ip):
        i = 12
        while q[i]:
            i += q[i] + 1
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
        ans = b""
        if qtype == 1:
            ans = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
        return (q[:2] + b"\\x81\\x80" + q[4:6] + struct.pack("!HHH", 1 if ans else 0, 0, 0)
                + q[12:i + 5] + ans)
    def tcp(port, host="::"):
        t = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if host == "::":
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port))
        t.listen(64)
        return t
    def serve_tcp(port):
        t = tcp(port)
        while True:
            c, peer = t.accept()
            try:
                info = {"l": port, "orig": orig(c), "peer": norm(peer),
                        "local": norm(c.getsockname())}
            except Exception as e:
                info = {"l": port, "exception": repr(e)}
            try:
                c.sendall(json.dumps(info).encode())
            except OSError:
                pass
            c.close()
    def serve_dns_udp(port, ip, host):
        u = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if host == "::":
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind((host, port))
        while True:
            q, addr = u.recvfrom(2048)
            u.sendto(answer(q, ip), addr)
    def serve_dns_tcp(port, ip, host):
        t = tcp(port, host)
        while True:
            c, _ = t.accept()
            q = c.recv(2048)[2:]
            a = answer(q, ip)
            c.sendall(struct.pack("!H", len(a)) + a)
            c.close()
    for spec in sys.argv[1].split(","):
        kind, port, *rest = spec.split(":")
        if kind == "tcp":
            threading.Thread(target=serve_tcp, args=(int(port),), daemon=True).start()
        else:
            # "lo": on 127.0.0.1 and ::1, as Istio's agent, so that replies leave from the
            # address the redirected query reached (conntrack then un-NATs them)
            for host in (("127.0.0.1", "::1") if rest[1:] == ["lo"] else ("::",)):
                threading.Thread(target=serve_dns_udp, args=(int(port), rest[0], host),
                                 daemon=True).start()
                threading.Thread(target=serve_dns_tcp, args=(int(port), rest[0], host),
                                 daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")

# A DNS query for x.test: `connected` (connect()+send(), as glibc and Go do; then the
# socket is connected to port 5353), `unconnected` (sendto) or `tcp`; which server
# answered, from where, and the socket's names.
QUERY = textwrap.dedent("""
    import json, socket, struct, sys
    mode, host = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 53
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x01x\\x04test\\x00\\x00\\x01\\x00\\x01"
    out = {}
    try:
        if mode == "tcp":
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((host, port))
            frm = s.getpeername()
            s.sendall(struct.pack("!H", len(q)) + q)
            data = s.recv(4096)
            data = data if data.startswith(b"{") else data[2:]
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(5)
            if mode == "connected":
                s.connect((host, port))
                peer = s.getpeername()
                s.send(q)
            else:
                s.sendto(q, (host, port))
            data, frm = s.recvfrom(4096)
    except OSError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(0)
    # a TCP listener of the sidecar (not a DNS server) answers with its JSON report
    out["answer"] = ("listener %d" % json.loads(data)["l"] if data.startswith(b"{")
                     else socket.inet_ntoa(data[-4:]))
    out["from"] = list(frm[:2])
    if mode != "unconnected":
        out["peer"] = list((frm if mode == "tcp" else peer)[:2])
    out["local"] = s.getsockname()[0]
    if mode == "connected":          # the same socket connected elsewhere: a plain peer
        s.connect((host, 5353))
        out["reconnected"] = [list(s.getpeername()[:2]), s.getsockname()[0]]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def pods():
    with Sandbox(name="verdict") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        srv = c.spawn([pod_python(), "-c", SERVE, f"tcp:8080,tcp:15001,tcp:15006,dns:15053:{ANSWER_SIDECAR}:lo"],
                      uid=PROXY_UID, label="listeners")
        for port in (8080, 15001, 15006, 15053):
            c.wait_port(port, listening=True, proc=srv)
        local = c.spawn([pod_python(), "-c", SERVE, f"dns:53:{ANSWER_LOCAL}"], label="local-dns")
        c.wait_port(53, listening=True, proc=local)
        real = s.spawn([pod_python(), "-c", SERVE, f"tcp:8080,dns:53:{ANSWER_REAL}"], label="server")
        s.wait_port(53, listening=True, proc=real)
        s.wait_port(8080, listening=True, proc=real)
        yield sb, c, s


def _interceptor(sb, mode):
    if mode == "ebpf":
        return NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
    return NodeService(mode="iptables", pin_prefix=sb.pin_prefix)


@contextlib.contextmanager
def meshed(sb, pod, mode, config):
    ic = _interceptor(sb, mode)
    try:
        ic.attach(pod.pod, config)
        yield ic
    finally:
        try:
            ic.detach(pod.pod)
        finally:
            ic.cleanup()


def _json(r, what):
    assert r.returncode == 0, f"{what}: {r.stderr}"
    return json.loads(r.stdout)


def dial(pod, host, port, uid=APP_UID):
    """A TCP client: what the listener reported ("server"), and the client's getpeername
    and getsockname (address); {"error": errno} when the connect failed."""
    out = traffic.connect(pod, host, port, uid=uid, timeout=5, allow_error="connect")
    if "error" in out:
        return {"error": out["errno"]}
    return {"peer": out["peer"], "local": out["local"][0], "server": out["reply"]}


def query(pod, mode, host, uid=APP_UID, gid=None):
    return _json(pod.exec([pod_python(), "-c", QUERY, mode, host], uid=uid, gid=gid, timeout=30),
                 f"{mode} DNS query to {host}")


def query_answer(pod, mode, host, uid=APP_UID):
    """Who answered a DNS query (or the error), for verdict tables."""
    r = query(pod, mode, host, uid=uid)
    return r.get("answer", r.get("error"))


def both_modes(sb, c, config, run):
    """{mode: run()} with pod c meshed by each mode in turn."""
    out = {}
    for mode in ("iptables", "ebpf"):
        with meshed(sb, c, mode, config):
            out[mode] = run()
    return out


def _link_local(pod):
    """The IPv6 link-local address of the pod's eth0 (one is added if it has none)."""
    for _ in range(2):
        r = pod.exec(["ip", "-j", "-6", "addr", "show", "dev", "eth0"], check=True)
        for a in json.loads(r.stdout)[0].get("addr_info", []):
            if a.get("local", "").startswith("fe80") and not a.get("tentative"):
                return a["local"]
        pod.exec(["ip", "addr", "add", f"fe80::{pod.ip6.split(':')[-1]}/64", "dev", "eth0",
                  "nodad"], check=True)
    pytest.fail(f"no usable link-local address on {pod.name}'s eth0: {r.stdout}")


# ---- 3: DNS on connected UDP sockets ------------------------------------------------------

def test_dns_on_connected_udp_sockets_is_captured_as_under_iptables(pods):
    sb, c, s = pods
    cfg = InterceptConfig(redirect_dns=True, capture_all_dns=True)

    def run():
        return {(mode, host): query(c, mode, host)
                for mode in ("connected", "unconnected", "tcp")
                for host in (s.ip4, s.ip6, f"::ffff:{s.ip4}")}
    got = both_modes(sb, c, cfg, run)
    # the oracle: every query, connected or not, answered by the sidecar as the server
    for (mode, host), r in got["iptables"].items():
        assert r["answer"] == ANSWER_SIDECAR and r["from"] == [host, 53], (mode, host, r)
    assert got["ebpf"] == got["iptables"]


def test_glibc_resolver_queries_reach_the_sidecar_as_under_iptables(pods):
    """getent (glibc: connect() + send() on a UDP socket, reply checked against the
    server's address) with a resolv.conf naming pod s as the name server."""
    sb, c, s = pods
    cfg = InterceptConfig(redirect_dns=True, capture_all_dns=True)
    with tempfile.TemporaryDirectory() as d:
        conf = os.path.join(d, "resolv.conf")
        with open(conf, "w") as f:
            f.write(f"nameserver {s.ip4}\noptions attempts:1 timeout:3\n")
        os.chmod(d, 0o755)
        os.chmod(conf, 0o644)
        script = (f"mount --bind {conf} /etc/resolv.conf && exec setpriv --reuid={APP_UID} "
                  f"--regid={APP_UID} --clear-groups getent ahostsv4 x.test")

        def run():
            r = c.exec(["unshare", "-m", "sh", "-c", script], timeout=30)
            return r.stdout.split()[:1]
        got = both_modes(sb, c, cfg, run)
    assert got["iptables"] == [ANSWER_SIDECAR]
    assert got["ebpf"] == got["iptables"]


# ---- 10a: DNS redirection honours port excludes and owner groups --------------------------

@pytest.mark.parametrize("extra", [
    {"outbound_ports_exclude": "53"},
    {"owner_groups_exclude": str(APP_UID)},
    {"owner_groups_include": "4242"},
    {"owner_groups_include": str(APP_UID)},
], ids=["port-exclude", "owner-exclude", "owner-include-other", "owner-include-app"])
def test_dns_honours_port_excludes_and_owner_groups_as_under_iptables(pods, extra):
    sb, c, s = pods
    cfg = InterceptConfig(redirect_dns=True, capture_all_dns=True, **extra)

    def run():
        return {mode: query(c, mode, s.ip4, gid=APP_UID)["answer"]
                for mode in ("connected", "unconnected", "tcp")}
    got = both_modes(sb, c, cfg, run)
    assert got["ebpf"] == got["iptables"]


# ---- 10b: the proxy dialling any local address goes to the inbound listener ---------------

def test_proxy_and_app_to_local_addresses_as_under_iptables(pods):
    """Istio: `-o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 --uid-owner 1337 -j
    ISTIO_IN_REDIRECT` (and `! -d ::1`): the proxy dialling any address of its own netns
    other than the host loopback reaches its inbound listener; `::6` is the passthrough
    source (an unbound socket dialling it has it as source); the app goes direct."""
    sb, c, s = pods
    ll = _link_local(c)
    c.exec(["ip", "addr", "add", "::6/128", "dev", "lo"], check=False)
    c.exec(["ip", "addr", "add", "10.233.250.11/32", "dev", "eth0"], check=True)
    cfg = InterceptConfig()
    targets = [c.ip4, c.ip6, "127.0.0.2", "127.0.0.1", "::1", "::6", "10.233.250.11"]

    def run():
        out = {(uid, t): dial(c, t, 8080, uid=uid) for uid in (PROXY_UID, APP_UID)
               for t in targets}
        out[(APP_UID, ll)] = dial(c, f"{ll}%eth0", 8080)
        return out
    try:
        got = both_modes(sb, c, cfg, run)
    finally:
        c.exec(["ip", "addr", "del", "10.233.250.11/32", "dev", "eth0"], check=False)
    # the oracle: the proxy reaches its inbound listener except on the host loopback
    for t in ("127.0.0.2", c.ip4, c.ip6, "10.233.250.11"):
        r = got["iptables"][(PROXY_UID, t)]
        assert r.get("server", {}).get("l") == 15006, (t, r)
    for t in ("127.0.0.1", "::1", "::6"):
        r = got["iptables"][(PROXY_UID, t)]
        assert r.get("server", {}).get("l") == 8080, (t, r)
    # what the inbound listener sees as its peer is not compared: see the docs
    for r in list(got["iptables"].values()) + list(got["ebpf"].values()):
        r.get("server", {}).pop("peer", None)
    assert got["ebpf"] == got["iptables"]


# ---- 10c: the app's getsockname ------------------------------------------------------------

def test_redirected_app_sees_its_pod_address_as_local_address(pods):
    sb, c, s = pods
    cfg = InterceptConfig()

    def run():
        return {t: dial(c, t, 8080) for t in (s.ip4, s.ip6, f"::ffff:{s.ip4}")}
    got = both_modes(sb, c, cfg, run)
    assert got["iptables"][s.ip4]["local"] == c.ip4
    assert got["iptables"][s.ip6]["local"] == c.ip6
    assert got["iptables"][s.ip4]["server"]["l"] == 15001
    # what the sidecar sees (its accepted socket's peer) is not compared: see the docs
    for r in list(got["iptables"].values()) + list(got["ebpf"].values()):
        r["server"].pop("peer")
    assert got["ebpf"] == got["iptables"]


# ---- 8: every local address is captured inbound -------------------------------------------

def test_inbound_to_new_and_link_local_addresses_as_under_iptables(pods):
    """Istio's `PREROUTING -p tcp -j ISTIO_INBOUND` takes any destination arriving on the
    pod's interface: an address added after attach and the IPv6 link-local address land
    on 15006 like the pod IP, and SO_ORIGINAL_DST answers the address dialled."""
    sb, c, s = pods
    ll = _link_local(c)
    _link_local(s)                                   # the client needs one to dial it
    extra = [("10.233.250.11", "16"), ("fd00:6d62::beef", "64")]
    cfg = InterceptConfig()

    def run():
        for ip, plen in extra:                       # added after attach
            c.exec(["ip", "addr", "add", f"{ip}/{plen}", "dev", "eth0", "nodad"], check=True)
        try:
            return {t: dial(s, t, 8080) for t in [c.ip4, c.ip6, f"{ll}%eth0"] +
                    [ip for ip, _ in extra]}
        finally:
            for ip, plen in extra:
                c.exec(["ip", "addr", "del", f"{ip}/{plen}", "dev", "eth0"], check=False)
    got = both_modes(sb, c, cfg, run)
    for t, r in got["iptables"].items():
        assert r.get("server", {}).get("l") == 15006, (t, r)
        assert r["server"]["orig"][0] == t.split("%")[0] and r["server"]["orig"][1] == 8080, (t, r)
    # the listener's own local address is not compared: REDIRECT rewrites it to the
    # interface's first address and port 15006, tc's socket assignment keeps the original
    # (docs/inbound.md)
    for r in list(got["iptables"].values()) + list(got["ebpf"].values()):
        r.get("server", {}).pop("local", None)
        if "peer" in r.get("server", {}):
            r["server"]["peer"] = r["server"]["peer"][0]     # the client's port varies
    assert got["ebpf"] == got["iptables"]


# ---- 10a/10b: Istio's `-o lo` rules for the app and the proxy, per config -------------------

@pytest.mark.parametrize("extra", [
    {},
    {"outbound_ip_ranges_include": "127.0.0.0/8,10.0.0.0/8"},
    {"redirect_dns": True, "dns_servers_v4": ["127.0.0.53"]},
    {"redirect_dns": True, "dns_servers_v4": ["10.96.0.10"]},
    {"redirect_dns": True, "capture_all_dns": True, "outbound_ports_exclude": "8080"},
], ids=["default", "loopback-included", "dns-on-lo", "dns-elsewhere", "dns-all-port-exclude"])
def test_traffic_over_lo_follows_istio_rules(pods, extra):
    """The app and the proxy dialling loopback and the pod's own addresses, TCP and DNS
    (UDP connected/unconnected, TCP), under the configs that change Istio's `-o lo`
    rules (loopback in an include range, DNS capture, port excludes)."""
    sb, c, s = pods
    cfg = InterceptConfig(**extra)

    def run():
        out = {}
        for uid in (APP_UID, PROXY_UID):
            for t in ("127.0.0.2", c.ip4, "127.0.0.1"):
                r = dial(c, t, 8080, uid=uid)
                out[("tcp", uid, t)] = r.get("server", {}).get("l", r.get("error"))
            for t in ("127.0.0.53", c.ip4):
                for mode in ("connected", "unconnected", "tcp"):
                    out[(mode, uid, t)] = query_answer(c, mode, t, uid=uid)
        return out
    got = both_modes(sb, c, cfg, run)
    assert got["ebpf"] == got["iptables"]
