"""Node-wide map safety, in throwaway sandbox pods:

- address-keyed maps (local_ips, inbound_pods, inbound_ports, inbound_netns) are owned: a
  stale detach of a dead pod whose address a live pod reuses leaves the live pod's entries,
  and a live pod's address is refused to another pod;
- full maps fail closed: with MB_MAX_CONNS shrunk in the test's own pin prefix, a pod past
  its share, and any pod once orig_dst is full, has its connect refused (EPERM) and counted,
  while the others keep working, and no sidecar is ever told a wrong SO_ORIGINAL_DST;
- inbound through sk_lookup (the path for SO_REUSEPORT listeners that bpf_sk_assign refuses
  before Linux 6.5), forced here with NODE_F_INBOUND_SK_LOOKUP.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.ebpf import inbound, structs
from meshbpf.ebpf.inbound import policy
from meshbpf.probe import inbound as inbound_probe
from meshbpf.service import NodeService
from meshbpf.ebpf.maps import Maps
from meshbpf.errors import UsageError
from meshbpf.testbed import Sandbox, pod_python, traffic

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The sidecar's outbound listener (127.0.0.1:15001) and the app in one process: `n` connects
# to host:port (each redirected to 15001), each accepted end asks SO_ORIGINAL_DST. Prints
# one JSON list (the answer "ip:port", or the connect's errno name), then holds every
# connection open for `hold` seconds.
HOLDER = r"""
import errno, json, socket, struct, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 15001))
lst.listen(256)
lst.settimeout(5)
held, out = [], []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
        s.close()
        continue
    a, _ = lst.accept()
    try:
        raw = a.getsockopt(socket.SOL_IP, 80, 16)
        out.append("%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]))
    except OSError as e:
        out.append("getsockopt " + errno.errorcode.get(e.errno, str(e.errno)))
    held += [s, a]
print(json.dumps(out), flush=True)
time.sleep(hold)
"""


def _serve(pod, port, *extra):
    return traffic.start_whoami(pod, port, reuseport=extra == ("reuseport",))


def _run(cmd):
    return subprocess.run(cmd, capture_output=True).returncode


def _connect(client, host, port):
    """{"reply": what the listener said} or {"error": exception name}."""
    out = traffic.connect(client, host, port, timeout=4, allow_error=True)
    return {"error": out["error"]} if "error" in out else {"reply": out["reply"]}


def _entries(sb):
    """Every entry of the maps keyed by address (raw bytes), for before/after checks."""
    out = {}
    with Maps(sb.pin_prefix) as m:
        for name in ("pods", "local_ips", policy.MAP_PODS, policy.MAP_PORTS, policy.MAP_NETNS):
            out[name] = {bytes(k): bytes(m[name].lookup_raw(k)) for k in m[name].keys()}
    return out


# ---- item 4: owners ------------------------------------------------------------------------

@pytest.mark.parametrize("b_made", ["before", "after"])
def test_stale_detach_after_address_reuse_leaves_the_live_pods_inbound(b_made):
    """B gets A's addresses. Made after A dies, B's netns may get A's inode; A's record is
    keyed by its pod id, so A's late detach (by id) must still spare B."""
    with Sandbox(name="reuse") as sb:
        c, a = sb.add_pod("c"), sb.add_pod("a")
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            if b_made == "before":
                b = sb.add_pod("b", ip4=a.ip4, ip6=a.ip6)
            a_id = icp.attach(a.pod, InterceptConfig())["id"]
            sb.remove_pod("a")                    # dies without a detach
            if b_made == "after":
                b = sb.add_pod("b", ip4=a.ip4, ip6=a.ip6)
            _serve(b, 8080)
            _serve(b, 15006)
            icp.attach(b.pod, InterceptConfig())  # A is gone: its addresses are taken over
            b_cookie = b.pod.netns_cookie
            b_id = icp.store.id_of_cookie(b_cookie)
            assert b_id is not None and b_id != a_id
            # A's stale record goes by its id ...
            assert icp.detach(a_id)["was_attached"] is True
            assert icp.store.load(b_id) is not None
            # ... and B's inbound still goes through its sidecar (not to the app)
            for host in (b.ip4, b.ip6):
                out = _connect(c, host, 8080)
                assert out.get("reply", {}).get("server") == 15006, (host, out)
                assert out["reply"]["local"][1] == 8080
            with Maps(sb.pin_prefix) as m:        # B's entries are B's
                owner = {v.pod_index: k.value for k, v in m["pods"].items()}
                for ip in (b.ip4, b.ip6):
                    assert owner[m["local_ips"].lookup(structs.ip_key(ip)).value] == b_cookie
            with Maps(sb.pin_prefix) as m:
                assert inbound.owners(m, [b.ip4, b.ip6]) == {b.ip4: b_cookie, b.ip6: b_cookie}
            # and B's own detach removes them
            icp.detach(b.pod)
            assert all(not v for v in _entries(sb).values())
        finally:
            icp.cleanup()


def test_an_address_a_live_pod_holds_is_refused_and_nothing_changes():
    with Sandbox(name="clash") as sb:
        a = sb.add_pod("a")
        b = sb.add_pod("b", ip4=a.ip4)
        _serve(a, 15006)
        _serve(b, 15006)
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            icp.attach(a.pod, InterceptConfig())
            before = _entries(sb)
            with pytest.raises(UsageError) as e:
                icp.attach(b.pod, InterceptConfig())
            assert e.value.exit_code == 2 and a.ip4 in str(e.value)
            assert _entries(sb) == before
            # the CLI, in auto mode: the same refusal (no fallback to iptables), exit code 2
            r = subprocess.run([sys.executable, "-m", "meshbpf", "attach", "--netns", b.netns,
                                "--cgroup", b.cgroup, "--pin-prefix", sb.pin_prefix,
                                "--cgroup-root", sb.cgroup_root], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
            assert r.returncode == 2 and "held by another meshed pod" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            assert "ISTIO" not in b.exec(["iptables-save"]).stdout
            assert _entries(sb) == before
            assert [p["netns_cookie"] for p in icp.status()["pods"]] == [a.pod.netns_cookie]
            assert "meshbpf_inbound" not in b.exec(["tc", "filter", "show", "dev", "eth0",
                                                    "ingress"]).stdout
        finally:
            icp.cleanup()


# ---- item 5: full maps ---------------------------------------------------------------------

# One UDP DNS query to host:53 (captured: to the sidecar's 15053); prints "sent" or the errno.
DNS_SEND = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"q", (sys.argv[1], 53))
    print("sent")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def _hold(pod, host, n, hold=60):
    p = pod.spawn([pod_python(), "-c", HOLDER, host, "8080", str(n), str(hold)], label="hold")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [l for l in p.output().splitlines() if l.startswith("[")]
        if lines:
            return p, json.loads(lines[0])
        if not p.alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"holder in {pod.name} said nothing: {p.output()[-2000:]}")


def test_full_maps_refuse_connects_count_them_and_never_answer_wrong(monkeypatch):
    # 16 connections per node, default share = half: 8 per pod
    monkeypatch.setenv("MESHBPF_MAX_CONNS", "16")
    with Sandbox(name="full") as sb:
        s = sb.add_pod("s")
        a, c, d = sb.add_pod("a"), sb.add_pod("c"), sb.add_pod("d")
        want = f"{s.ip4}:8080"
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        procs = []
        try:
            for p in (a, c, d):
                icp.attach(p.pod, InterceptConfig(redirect_dns=True, capture_all_dns=True))
            # A asks for more than its share: 8 recorded, the rest refused
            pa, out_a = _hold(a, s.ip4, 12)
            procs.append(pa)
            assert out_a == [want] * 8 + ["EPERM"] * 4, out_a
            # a captured DNS query needs a record too: refused as well, not redirected
            r = a.exec([pod_python(), "-c", DNS_SEND, s.ip4], timeout=30)
            assert r.stdout.strip() == "EPERM", (r.stdout, r.stderr)
            # another pod is not starved: C gets its whole share, answered right
            pc, out_c = _hold(c, s.ip4, 8)
            procs.append(pc)
            assert out_c == [want] * 8, out_c
            # orig_dst is now full (16): D's connect is refused, not redirected unrecorded
            pd, out_d = _hold(d, s.ip4, 2, hold=0)
            assert out_d == ["EPERM", "EPERM"], out_d
            st = icp.status()
            assert st["counters"]["conn_refused"] == 7
            conns = st["ebpf"]["connections"]
            assert conns["held"] == 16 and conns["capacity"] == 16
            with Maps(sb.pin_prefix) as m:
                assert len(m["orig_dst"]) == 16
            assert sorted(p["connections"] for p in st["pods"]) == [0, 8, 8]
            # closing gives every share back: no entry and no count leaks
            for p in procs:
                p.stop()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with Maps(sb.pin_prefix) as m:
                    left = (len(m["orig_dst"]), len(m["pairs"]),
                            sum(v.value for _, v in m["pod_conns"].items()))
                if left == (0, 0, 0):
                    break
                time.sleep(0.2)
            assert left == (0, 0, 0)
            pd, out_d = _hold(d, s.ip4, 2, hold=0)
            assert out_d == [want] * 2, out_d
        finally:
            for p in procs:
                p.stop()
            icp.cleanup()


def test_max_conns_override_is_checked(monkeypatch):
    from meshbpf.ebpf import loader
    monkeypatch.setenv("MESHBPF_MAX_CONNS", "lots")
    with pytest.raises(UsageError):
        loader.cflags()
    monkeypatch.setenv("MESHBPF_MAX_CONNS", "1000")
    assert "-DMB_MAX_CONNS=1000" in loader.cflags()
    assert "#define MB_MAX_CONNS 1000" in loader.render_source()


# ---- item 7: inbound through sk_lookup -----------------------------------------------------

def test_inbound_through_sk_lookup_reaches_a_reuseport_listener():
    with Sandbox(name="skl") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        _serve(s, 9000)
        _serve(s, 15006, "reuseport")
        _serve(s, 15006, "reuseport")             # a reuseport group of two, as Envoy's workers
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root,
                              inbound_sk_lookup=True)
        try:
            rec = icp.attach(s.pod, InterceptConfig())
            assert rec["inbound"]["sk_lookup"]["enabled"], rec["inbound"]
            for host in (s.ip4, s.ip6) * 3:
                out = _connect(c, host, 9000)
                assert out.get("reply", {}).get("server") == 15006, (host, out)
                assert out["reply"]["local"][1] == 9000   # the original destination, intact
            cnt = icp.status()["counters"]
            assert cnt["inbound_sk_lookup"] == 6 and cnt["inbound_no_listener"] == 0
        finally:
            icp.cleanup()


def test_inbound_sk_lookup_path_never_reaches_the_app_without_the_sidecar():
    with Sandbox(name="skl0") as sb:
        c, s = sb.add_pod("c"), sb.add_pod("s")
        _serve(s, 9000)
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root,
                              inbound_sk_lookup=True)
        try:
            icp.attach(s.pod, InterceptConfig())
            out = _connect(c, s.ip4, 9000)
            assert "error" in out, out
        finally:
            icp.cleanup()


# Binds (not listens) a socket with SO_REUSEPORT on the sidecar's inbound address: this
# succeeds only if the listener already there has SO_REUSEPORT too (same uid).
JOIN_REUSEPORT = r"""
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 15006))
s.close()
"""


def test_envoy_reuseport_inbound_listener_through_sk_lookup():
    with Sandbox(name="sklenv") as sb:
        pb, pc = sb.add_pod("b"), sb.add_pod("c")
        env = pb.start_envoy()
        pb.start_http_server(8080)
        # Envoy's inbound listener uses SO_REUSEPORT (its default), which bpf_sk_assign
        # refuses before Linux 6.5
        r = pb.exec([pod_python(), "-c", JOIN_REUSEPORT], uid=1337)
        assert r.returncode == 0, r.stderr
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root,
                              inbound_sk_lookup=True)
        try:
            icp.attach(pb.pod, InterceptConfig())
            before = env.stats().get("tcp.inbound.downstream_cx_total", 0)
            for ip, host, src in ((pb.ip4, pb.ip4, "127.0.0.6"), (pb.ip6, f"[{pb.ip6}]", "::6")):
                r = pc.exec(["curl", "-sS", "-m", "10", f"http://{host}:8080/x"], check=True)
                reply = json.loads(r.stdout)
                # the app got it from Envoy's inbound passthrough, on the port dialled
                assert reply["peer"][0].replace("::ffff:", "") == src, reply
                assert reply["local"][0].replace("::ffff:", "") == ip and reply["local"][1] == 8080
            assert env.stats()["tcp.inbound.downstream_cx_total"] - before == 2
            assert icp.status()["counters"]["inbound_sk_lookup"] == 2
        finally:
            icp.cleanup()


# `n` connections whose app end closes at once while the sidecar's end stays open and never
# asks: their pairs entries stay (the sidecar's close removes them). Then one more, whose
# SO_ORIGINAL_DST the sidecar asks for. Prints that answer (or the error), and the answer
# for a plain loopback connection to another port of the pod (conntrack's: its own).
LINGER = r"""
import errno, json, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def listener(p):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", p))
    l.listen(64)
    l.settimeout(5)
    return l
def ask(a):
    try:
        raw = a.getsockopt(socket.SOL_IP, 80, 16)
        return "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
lst, other = listener(15001), listener(9100)
held = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=5)
    held.append(lst.accept()[0])
    s.close()
s = socket.create_connection((host, port), timeout=5)
out = {"last": ask(lst.accept()[0])}
s2 = socket.create_connection(("127.0.0.1", 9100), timeout=5)
out["loopback"] = ask(other.accept()[0])
print(json.dumps(out), flush=True)
"""


def test_full_pairs_never_answer_the_sidecars_own_address(monkeypatch):
    monkeypatch.setenv("MESHBPF_MAX_CONNS", "2")          # pairs: 4 entries
    with Sandbox(name="pairs") as sb:
        s, a = sb.add_pod("s"), sb.add_pod("a")
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root,
                              pod_conn_limit=2)
        try:
            icp.attach(a.pod, InterceptConfig())
            r = a.exec([pod_python(), "-c", LINGER, s.ip4, "8080", "4"], timeout=60)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            assert icp.status()["counters"]["pairs_full"] == 1
            # no answer for the unrecorded one, never 127.0.0.1:15001 (the sidecar itself)
            assert out["last"] in ("ENOENT", "ENOPROTOOPT"), out
            assert out["loopback"] == "127.0.0.1:9100", out
        finally:
            icp.cleanup()


# As the proxy (uid 1337, never redirected): once `go` exists, a pod-address connection
# to host:port; prints the server's reply line.
PROXY_CLIENT = r"""
import os, socket, sys, time
host, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.05)
s = socket.create_connection((host, port), timeout=5)
print(s.makefile().readline().strip(), flush=True)
"""


def test_only_the_owner_of_an_address_splices_pod_address_connections():
    """X's netns name goes while a process keeps the netns alive: meshbpf takes X as gone
    and Y takes its address over. X still has sockets with that address, whose splice key
    (pod addresses, netns 0) is Y's to use: X's end must stay out of the SOCKHASH."""
    with Sandbox(name="splown") as sb:
        s, x = sb.add_pod("s"), sb.add_pod("x")
        _serve(s, 15006)                          # S is meshed: its inbound sidecar
        go = os.path.join(x.tmpdir, "go")
        proc = x.spawn([pod_python(), "-c", PROXY_CLIENT, s.ip4, "8080", go], uid=1337,
                       label="proxy-client")
        icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            icp.attach(s.pod, InterceptConfig())
            icp.attach(x.pod, InterceptConfig())
            # X's name goes; its netns lives on in proxy-client
            assert _run(["ip", "netns", "del", x.netns_name]) == 0
            y = sb.add_pod("y", ip4=x.ip4)
            assert _run(["ip", "-n", y.netns_name, "link", "set", "eth0", "down"]) == 0
            icp.attach(y.pod, InterceptConfig())  # takes X's address over
            before = icp.status()["counters"]["sockhash_add"]
            open(go, "w").close()
            assert proc.wait(timeout=30) == 0, proc.output()
            assert json.loads(proc.output().strip().splitlines()[-1])["server"] == 15006
            # S's end (its own address, a registered peer) went in; X's did not: nothing
            # can redirect bytes to X's socket by a key Y owns
            assert icp.status()["counters"]["sockhash_add"] - before == 1
        finally:
            proc.stop()
            icp.cleanup()



def test_probe_tries_the_sk_lookup_path_for_reuseport_listeners():
    # what `meshbpf probe` reports as inbound_reuseport on kernels before 6.5 (5.9+ here)
    res = inbound_probe.run()
    assert res["ok"] and res["sk_lookup_reuseport"], res["detail"]
