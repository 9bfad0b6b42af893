"""Inbound steering (bpf/tc_inbound.c + meshbpf/ebpf/inbound/) in throwaway sandbox pods.

The tc program is compiled on its own here (bpf/tc_inbound.c with the bpf/lib/ headers it
includes, as the core loader inlines them) and attached with meshbpf.ebpf.inbound, so these tests check the
inbound data path by itself: pod B is meshed (inbound only), pod C is a plain client.
The last tests go through the service layer (eBPF mode) with a real Envoy sidecar.
"""

import json
import os
import socket
import sys
import time

import pytest

from meshbpf import system
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader
from meshbpf.errors import ApplyError, NotFoundError, UnsupportedError
from meshbpf.testbed import Sandbox, traffic

pytestmark = pytest.mark.kernel



def _counter_indexes():
    """Counter indexes from bpf/lib/types.h's enum."""
    import re
    text = loader.header_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(COUNTER_\w+) = (\d+)", text)}


_IDX = _counter_indexes()
COUNTER_REDIRECT_IN = _IDX["COUNTER_REDIRECT_IN"]
COUNTER_NO_LISTENER = _IDX["COUNTER_INBOUND_NO_LISTENER"]
COUNTER_UNSTEERABLE = _IDX["COUNTER_INBOUND_UNSTEERABLE"]
COUNTER_BYPASS = _IDX["COUNTER_INBOUND_BYPASS"]

# Options a client can put on every packet: an IPv6 destination options header, or IPv4
# options (a 24-byte IPv4 header).
CLIENT_OPTS = {
    "dstopts": (socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0])),
    "ipopts": (socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 0])),  # NOPs, EOL
}


def _bare(ip):
    return ip[7:] if ip.startswith("::ffff:") else ip


@pytest.fixture(scope="module")
def tc_object():
    """bpf/tc_inbound.c and the headers it includes, compiled by bcc: (BPF, maps, progs)."""
    from bcc import BPF
    b = BPF(text=loader.c_text(["tc_inbound.c"]).encode(), cflags=["-Wno-comment"])
    fn = b.load_func(b"tc_inbound_ingress", BPF.SCHED_CLS)
    maps = {"inbound_pods": b[b"inbound_pods"], "inbound_ports": b[b"inbound_ports"]}
    try:
        yield b, maps, {"tc_inbound_ingress": fn}
    finally:
        b.cleanup()


@pytest.fixture
def obj(tc_object):
    b, maps, progs = tc_object
    yield tc_object
    for name in maps:
        maps[name].clear()


@pytest.fixture
def sb():
    with Sandbox(name="inb") as s:
        yield s


def counter(b, idx):
    return sum(b[b"counters"][idx])


def serve(pod, *ports):
    """A listener per port telling each client which server answered (traffic.WHOAMI)."""
    return [traffic.start_whoami(pod, port) for port in ports]


def connect(client, host, port, timeout=3.0, *extra):
    """What the server said and the peer the client's socket reports, or {"error": name}
    when the connect failed; `extra`: names of CLIENT_OPTS."""
    out = traffic.connect(client, host, port, timeout=timeout, allow_error="connect",
                          sockopts=[CLIENT_OPTS[x] for x in extra])
    return {"error": out["error"]} if "error" in out else {"reply": out["reply"],
                                                            "peer": out["peer"]}


def tc_state(pod):
    qd = system.run(["tc", "qdisc", "show", "dev", "eth0"], netns=pod.netns).stdout
    filters = system.run(["tc", "filter", "show", "dev", "eth0", "ingress"], netns=pod.netns,
                         check=False).stdout
    return qd, filters


def test_captured_port_reaches_capture_listener_with_original_port(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080, 15020)
    before_in, before_bypass = counter(b, COUNTER_REDIRECT_IN), counter(b, COUNTER_BYPASS)
    rec = inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    assert rec["interfaces"][0]["name"] == "eth0" and rec["interfaces"][0]["kind"] == "veth"
    assert set(rec["addresses"]) == {pb.ip4, pb.ip6}
    hooks = inbound.list_hooks(pb.pod)
    assert [(h["interface"], h["direction"], h["direct_action"]) for h in hooks] == \
        [("eth0", "ingress", True)]
    from meshbpf import bpfsys
    assert hooks[0]["prog_id"] == bpfsys.prog_get_info(progs["tc_inbound_ingress"].fd)["id"]

    for ip in (pb.ip4, pb.ip6):
        out = connect(pc, ip, 8080)
        # The sidecar's listener answered; its socket's local address is the original one.
        assert out["reply"]["server"] == 15006
        assert _bare(out["reply"]["local"][0]) == ip and out["reply"]["local"][1] == 8080
        assert _bare(out["reply"]["peer"][0]) == (pc.ip4 if "." in ip else pc.ip6)
        # Replies carry the original port: the client is connected to ip:8080.
        assert out["peer"] == [ip, 8080]
        # Excluded by default (Istio's injector): 15020 goes to its own listener.
        out = connect(pc, ip, 15020)
        assert out["reply"]["server"] == 15020 and out["peer"] == [ip, 15020]
    assert counter(b, COUNTER_REDIRECT_IN) - before_in == 2
    assert counter(b, COUNTER_BYPASS) - before_bypass == 2


# Sends a TCP SYN to host:port as two IPv4 fragments (raw socket, IP_HDRINCL).
FRAGMENTED_SYN = r"""
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for off, chunk, more in ((0, tcp[:8], 1), (1, tcp[8:], 0)):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), 0x4242,
                     (more << 13) | off, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + chunk, (dst, 0))
"""


def reassembly_requests(pod):
    with system.in_netns(pod.netns):
        with open("/proc/thread-self/net/snmp") as f:
            lines = [l.split() for l in f if l.startswith("Ip:")]
    return int(dict(zip(lines[0], lines[1]))["ReasmReqds"])


def test_ip_options_and_ipv6_extension_headers_are_skipped(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    out = connect(pc, pb.ip6, 8080, 3.0, "dstopts")
    assert out["reply"]["server"] == 15006 and out["peer"] == [pb.ip6, 8080]
    out = connect(pc, pb.ip4, 8080, 3.0, "ipopts")
    assert out["reply"]["server"] == 15006 and out["peer"] == [pb.ip4, 8080]


def test_tcp_fragments_to_a_captured_pod_are_dropped_not_delivered_to_the_app(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    before, reasm = counter(b, COUNTER_UNSTEERABLE), reassembly_requests(pb)
    pc.exec([sys.executable, "-c", FRAGMENTED_SYN, pc.ip4, pb.ip4, "8080"], check=True)
    time.sleep(0.3)
    # Reassembly happens after tc: had the fragments passed, the reassembled SYN would
    # have reached the app's listener without the sidecar.
    assert counter(b, COUNTER_UNSTEERABLE) - before == 2
    assert reassembly_requests(pb) == reasm
    # Detached, the same fragments reach the IP layer (the check above is meaningful).
    inbound.detach_pod(pb.pod, maps)
    pc.exec([sys.executable, "-c", FRAGMENTED_SYN, pc.ip4, pb.ip4, "8080"], check=True)
    time.sleep(0.3)
    assert reassembly_requests(pb) > reasm


def test_syncookie_handshakes_complete_at_the_sidecar(sb, obj):
    """With SYN cookies the handshake's last ACK finds no half-open socket; it must still
    go to the sidecar's listener, which sent the cookie. (Left to the kernel it reaches
    the app's listener: reset, or accepted around the sidecar if that listener recently
    overflowed.)"""
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    system.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"], netns=pb.netns)  # always
    serve(pb, 15006, 8080)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    for ip in (pb.ip4, pb.ip6):
        out = connect(pc, ip, 8080)
        assert out["reply"]["server"] == 15006 and out["peer"] == [ip, 8080]
    with system.in_netns(pb.netns):
        with open("/proc/thread-self/net/netstat") as f:
            rows = [l.split() for l in f if l.startswith("TcpExt:")]
    assert int(dict(zip(rows[0], rows[1]))["SyncookiesRecv"]) >= 2   # cookies were used


# Opens many connections from a thread pool; prints how many each server port answered
# and whether every reply showed the original local port.
MANY = r"""
import collections, json, socket, sys
from concurrent.futures import ThreadPoolExecutor
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def one(_):
    s = socket.create_connection((host, port), timeout=10)
    r = json.loads(s.makefile().readline())
    ok = r["local"][1] == port and s.getpeername()[1] == port
    s.close()
    return r["server"], ok
with ThreadPoolExecutor(32) as ex:
    res = list(ex.map(one, range(n)))
print(json.dumps({"servers": collections.Counter(str(a) for a, _ in res), "all_ok": all(o for _, o in res)}))
"""


def test_many_concurrent_connections_all_reach_the_sidecar(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    before = counter(b, COUNTER_REDIRECT_IN)
    for ip in (pb.ip4, pb.ip6):
        r = pc.exec([sys.executable, "-c", MANY, ip, "8080", "400"], timeout=120, check=True)
        out = json.loads(r.stdout)
        assert out == {"servers": {"15006": 400}, "all_ok": True}
    assert counter(b, COUNTER_REDIRECT_IN) - before == 800


def test_include_list_captures_only_listed_ports(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080, 9090)
    cfg = InterceptConfig().replace(inbound_ports_include="9090",
                                    inbound_ports_exclude="9090")  # ignored with a list
    inbound.attach_pod(pb.pod, cfg, maps, progs)
    assert connect(pc, pb.ip4, 9090)["reply"]["server"] == 15006
    assert connect(pc, pb.ip4, 8080)["reply"]["server"] == 8080
    assert connect(pc, pb.ip6, 9090)["reply"]["server"] == 15006
    # Re-attaching with another policy replaces the old one (stale port entries go).
    inbound.attach_pod(pb.pod, InterceptConfig().replace(inbound_ports_include="8080"),
                       maps, progs)
    assert connect(pc, pb.ip4, 9090)["reply"]["server"] == 9090
    assert connect(pc, pb.ip4, 8080)["reply"]["server"] == 15006
    assert len(inbound.list_hooks(pb.pod)) == 1


def test_no_listener_drops_until_sidecar_listens(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 8080)                      # the app listens, the sidecar does not (yet)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    before = counter(b, COUNTER_NO_LISTENER)
    out = connect(pc, pb.ip4, 8080, timeout=1.5)
    # Never delivered to the app around the sidecar: the SYN is dropped (a timeout, not
    # a refusal and not the app's answer).
    assert out == {"error": "TimeoutError"}
    assert counter(b, COUNTER_NO_LISTENER) > before
    # A client already retrying connects as soon as the sidecar listens.
    client = pc.spawn(traffic.connect_argv(pb.ip4, 8080, timeout=15), label="late")
    time.sleep(1.2)
    serve(pb, 15006)
    client.wait(20)
    out = json.loads(client.output().strip().splitlines()[-1])
    assert out["reply"]["server"] == 15006 and out["peer"] == [pb.ip4, 8080]


def test_connection_open_before_attach_keeps_going_to_app(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006)
    echo = pb.spawn([sys.executable, "-c", ECHO, "8080"], label="echo")
    pb.wait_port(8080, listening=True, proc=echo)
    client = pc.spawn([sys.executable, "-c", ECHO_CLIENT, pb.ip4, "8080"], label="echoc")
    deadline = time.monotonic() + 10
    while "first" not in client.output():
        assert time.monotonic() < deadline, client.output()
        time.sleep(0.05)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    client.wait(15)
    assert client.output().split() == ["first", "second"]
    # New connections to the same port go to the sidecar.
    assert connect(pc, pb.ip4, 8080)["reply"]["server"] == 15006


ECHO = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(100)
        if not d:
            break
        c.sendall(d)
    c.close()
"""

# Says "first" over a connection, waits while the test attaches, then says "second".
ECHO_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"first"); print(s.recv(100).decode(), flush=True)
time.sleep(2)
s.sendall(b"second"); print(s.recv(100).decode(), flush=True)
"""


def test_detach_removes_filters_qdisc_and_entries(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    serve(pb, 15006, 8080)
    first = inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    rec = inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    assert first["interfaces"][0]["clsact_added"] is True
    assert rec["interfaces"][0]["clsact_added"] is None   # a re-attach cannot tell
    assert len(inbound.list_hooks(pb.pod)) == 1
    assert "clsact" in tc_state(pb)[0] and "meshbpf_inbound" in tc_state(pb)[1]
    assert len(maps["inbound_pods"]) == 2 and len(maps["inbound_ports"]) > 0
    inbound.detach_pod(pb.pod, maps, rec)
    qd, filters = tc_state(pb)
    assert "clsact" not in qd and filters.strip() == ""
    assert len(maps["inbound_pods"]) == 0 and len(maps["inbound_ports"]) == 0
    assert inbound.list_hooks(pb.pod) == []
    assert connect(pc, pb.ip4, 8080)["reply"]["server"] == 8080
    inbound.detach_pod(pb.pod, maps, rec)            # idempotent
    # Without the record (the caller lost it) the same things go.
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    inbound.detach_pod(pb.pod, maps, None)
    qd, filters = tc_state(pb)
    assert "clsact" not in qd and filters.strip() == ""
    assert len(maps["inbound_pods"]) == 0 and len(maps["inbound_ports"]) == 0


def test_detach_keeps_someone_elses_clsact_and_filters(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb = sb.add_pod("b")
    system.run(["tc", "qdisc", "add", "dev", "eth0", "clsact"], netns=pb.netns)
    # Another tool's classifier (after ours, matching nothing).
    system.run(["tc", "filter", "add", "dev", "eth0", "ingress", "pref", "49000", "u32",
                "match", "u32", "0x12345678", "0xffffffff", "at", "0", "flowid", "1:1"],
               netns=pb.netns)
    rec = inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    assert rec["interfaces"][0]["clsact_added"] is False
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    inbound.detach_pod(pb.pod, maps, None)          # also without a record
    qd, filters = tc_state(pb)
    assert "clsact" in qd and "u32" in filters and "meshbpf" not in filters


def test_bad_input_changes_nothing(sb, obj):
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb = sb.add_pod("b")
    with pytest.raises(NotFoundError):
        inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs, interfaces=["eth9"])
    with pytest.raises(UnsupportedError):
        inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs, hook="xdp")
    # A failure half-way (the kernel refuses a map fd as a tc program) is rolled back.
    with pytest.raises(ApplyError):
        inbound.attach_pod(pb.pod, InterceptConfig(), maps,
                           {"tc_inbound_ingress": maps["inbound_pods"].map_fd})
    qd, filters = tc_state(pb)
    assert "clsact" not in qd and filters.strip() == ""
    assert len(maps["inbound_pods"]) == 0 and len(maps["inbound_ports"]) == 0


def test_iperf3_1g_through_haproxy_sidecar(sb, obj):
    """A real unmodified proxy (HAProxy, which falls back to getsockname) as B's sidecar:
    C's 1 GB iperf3 transfer to B's app port goes through it without errors."""
    from meshbpf.ebpf import inbound
    b, maps, progs = obj
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    hap = pb.start_haproxy()
    srv = pb.spawn(["iperf3", "-s", "-p", "5201"], label="iperf3-s")
    pb.wait_port(5201, listening=True, proc=srv)
    before = counter(b, COUNTER_REDIRECT_IN)
    inbound.attach_pod(pb.pod, InterceptConfig(), maps, progs)
    r = pc.exec(["iperf3", "-c", pb.ip4, "-p", "5201", "-n", "1G", "-J"], timeout=300)
    res = json.loads(r.stdout)
    assert r.returncode == 0 and "error" not in res, r.stdout[-2000:] + r.stderr
    assert res["end"]["sum_sent"]["bytes"] >= 1 << 30
    # iperf3's control and data connections both went through the sidecar, all of it.
    assert counter(b, COUNTER_REDIRECT_IN) - before >= 2
    # The bulk went through the proxy. (Not all of it: iperf3 ends the test over its
    # control connection, which can overtake the tens of MB still buffered in the proxy's
    # sockets; the server then closes the data stream. Same in iptables mode, any proxy.)
    deadline = time.monotonic() + 10      # HAProxy counts a session's bytes as it ends
    while True:
        stats = hap.stats()
        if stats.get("inbound.FRONTEND.bin", 0) >= 0.9 * (1 << 30) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats.get("inbound.FRONTEND.stot", 0) >= 2, stats
    assert stats.get("inbound.FRONTEND.bin", 0) >= 0.9 * (1 << 30), stats


# ---- through the whole eBPF interceptor, with a real Envoy sidecar ---------------------------

@pytest.fixture
def meshed(sb):
    """Pod B meshed by EbpfInterceptor (Envoy sidecar + app on 8080), plain pod C."""
    from meshbpf.service import NodeService
    pb, pc = sb.add_pod("b"), sb.add_pod("c")
    icp = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
    try:
        env = pb.start_envoy()
        pb.start_http_server(8080)
        rec = icp.attach(pb.pod, InterceptConfig())
        yield icp, rec, env, pb, pc
    finally:
        icp.cleanup()


def test_envoy_inbound_listener_serves_a_non_meshed_client(meshed):
    from meshbpf.ebpf import inbound
    icp, rec, env, pb, pc = meshed
    assert [h["direction"] for h in inbound.list_hooks(pb.pod)] == ["ingress"]
    assert rec["inbound"]["interfaces"][0]["name"] == "eth0"
    before = env.stats().get("tcp.inbound.downstream_cx_total", 0)
    for ip, url_host, sidecar_src in ((pb.ip4, pb.ip4, "127.0.0.6"),
                                      (pb.ip6, f"[{pb.ip6}]", "::6")):
        r = pc.exec(["curl", "-sS", "-m", "10", f"http://{url_host}:8080/hello"], check=True)
        reply = json.loads(r.stdout)
        # B's app got the request from B's sidecar (Istio's inbound passthrough source),
        # on the port the client dialled.
        assert _bare(reply["peer"][0]) == sidecar_src, reply
        assert _bare(reply["local"][0]) == ip and reply["local"][1] == 8080
        assert reply["path"] == "/hello"
    assert env.stats()["tcp.inbound.downstream_cx_total"] - before == 2
    assert icp.status()["counters"]["redirect_in"] >= 2


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_iperf3_1g_through_envoy_inbound(meshed, family):
    icp, rec, env, pb, pc = meshed
    srv = pb.spawn(["iperf3", "-s", "-p", "5201"], label="iperf3-s")
    pb.wait_port(5201, listening=True, proc=srv)
    before = env.stats().get("tcp.inbound.downstream_cx_total", 0)
    host = pb.ip4 if family == "ipv4" else pb.ip6
    r = pc.exec(["iperf3", "-c", host, "-p", "5201", "-n", "1G", "-J"], timeout=300)
    res = json.loads(r.stdout)
    assert r.returncode == 0 and "error" not in res, r.stdout[-2000:] + r.stderr
    assert res["end"]["sum_sent"]["bytes"] >= 1 << 30
    # control + data connection, both through the sidecar's inbound listener, and the
    # bulk of the bytes (iperf3 may end the test while tens of MB are still buffered in
    # and around the proxy).
    assert env.stats()["tcp.inbound.downstream_cx_total"] - before >= 2
    deadline = time.monotonic() + 10
    while True:
        rx = env.stats().get("tcp.inbound.downstream_cx_rx_bytes_total", 0)
        if rx >= 0.9 * (1 << 30) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rx >= 0.9 * (1 << 30)


def test_cleanup_leaves_no_filter_qdisc_or_pin(meshed, sb):
    from meshbpf.ebpf import inbound
    from meshbpf import bpfsys
    icp, rec, env, pb, pc = meshed
    hooks = inbound.list_hooks(pb.pod)
    assert len(hooks) == 1
    icp.cleanup()
    qd, filters = tc_state(pb)
    assert "clsact" not in qd and filters.strip() == ""
    assert not os.path.exists(sb.pin_prefix) or os.listdir(sb.pin_prefix) == []
    assert "xdp" not in system.run(["ip", "link", "show"], netns=pb.netns).stdout
    # The tc program itself is gone (nothing holds it; the kernel frees it after RCU).
    deadline = time.monotonic() + 5
    while True:
        try:
            os.close(bpfsys.prog_get_fd_by_id(hooks[0]["prog_id"]))
        except OSError:
            break
        assert time.monotonic() < deadline, "the tc_inbound program is still loaded"
        time.sleep(0.1)
    # B's app is reached directly again.
    r = pc.exec(["curl", "-sS", "-m", "10", f"http://{pb.ip4}:8080/"], check=True)
    assert _bare(json.loads(r.stdout)["peer"][0]) == pc.ip4


def test_probe_tries_plain_and_reuseport_listeners():
    from meshbpf.probe import inbound as inbound_probe
    res = inbound_probe.run()
    assert res["ok"], res["detail"]
    # bpf_sk_assign accepts SO_REUSEPORT listeners since Linux 6.5 (older kernels may
    # have it backported, so only the newer side is certain).
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release >= (6, 5):
        assert res["reuseport"], res
