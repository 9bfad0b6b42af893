"""eBPF data path, end to end in the sandbox: connect4/6 redirect to a real Envoy (uid
1337), SO_ORIGINAL_DST emulation, getpeername restore, include/exclude rules, sockops +
sk_msg splicing, HAProxy as the sidecar, sidecar-not-yet-listening, attach/adopt/detach/
cleanup lifecycle, concurrent pods with colliding loopback 4-tuples, IPv6.

Every test uses its own EbpfInterceptor on the sandbox's pin prefix and test cgroup and
calls cleanup() in `finally`; the sandbox removes namespaces, cgroups and processes.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from meshbpf import bpfsys, system
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader
from meshbpf.service import NodeService
from meshbpf.ebpf.maps import Maps
from meshbpf.errors import UsageError
from meshbpf.testbed import Sandbox, pod_python, traffic

pytestmark = pytest.mark.kernel

APP_UID = 1000
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def client(pod, host, port=8080, uid=APP_UID, bind_port=0, hold=0):
    """What the app sees: {"peer": getpeername(), "local": getsockname(), "reply": ...}."""
    return traffic.http_get(pod, host, port, uid=uid, bind_port=bind_port, hold=hold)


def curl(pod, url, uid=APP_UID, timeout=10):
    return pod.exec(["curl", "-sS", "--max-time", str(timeout), url], uid=uid,
                    timeout=timeout + 10)


def url(ip, port=8080):
    return f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"


def outbound_cx(sidecar):
    return sidecar.stats().get("tcp.outbound.downstream_cx_total", 0)


def tcp_out_segs(pod):
    with system.in_netns(pod.netns):
        with open("/proc/thread-self/net/snmp") as f:
            lines = [l.split() for l in f if l.startswith("Tcp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("OutSegs")])


def lo_tx_packets(pod):
    r = pod.exec(["ip", "-s", "-j", "link", "show", "lo"], check=True)
    return json.loads(r.stdout)[0]["stats64"]["tx"]["packets"]


def counters(pin_prefix):
    with Maps(pin_prefix) as m:
        return m.counters()


def cgroup_prog_ids(cgroup):
    """Every program id attached at `cgroup`, per attach type we use."""
    out = {}
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for spec in loader.PROGRAMS:
            if spec.target == "cgroup":
                _, ids = bpfsys.prog_query(fd, spec.attach_type)
                out[spec.name] = ids
    finally:
        os.close(fd)
    return out


@pytest.fixture(scope="module")
def node():
    """Pod a (Envoy as uid 1337), pod b (HTTP server 8080, iperf3 server)."""
    with Sandbox(name="ebpf") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        yield sb, a, b, env


@pytest.fixture
def icpt(node):
    sb = node[0]
    made = []

    def make(**kw):
        kw.setdefault("cgroup_root", sb.cgroup_root)
        ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, **kw)
        made.append(ic)
        return ic
    yield make
    for ic in made:
        ic.cleanup()
    assert not os.path.exists(sb.pin_prefix)
    assert all(not ids for ids in cgroup_prog_ids(sb.cgroup_root).values())


def test_outbound_goes_through_envoy_and_app_sees_original_peer(node, icpt):
    sb, a, b, env = node
    ic = icpt()
    before = outbound_cx(env)
    ic.attach(a.pod, InterceptConfig())
    out = client(a, b.ip4)
    # the app sees the peer it dialled, not 127.0.0.1:15001
    assert out["peer"] == [b.ip4, 8080]
    # B's server got the request, from A's address (Envoy's upstream)
    assert out["reply"]["pod"] == "b"
    assert out["reply"]["peer"][0].replace("::ffff:", "") == a.ip4
    assert outbound_cx(env) == before + 1
    r = curl(a, url(b.ip4))
    assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "b"
    assert outbound_cx(env) == before + 2
    c = counters(sb.pin_prefix)
    assert c["redirect_out"] >= 2 and c["orig_dst_answered"] >= 2 and c["peername"] >= 1
    # Envoy's own upstream connects (uid 1337) were left alone, or it would loop
    assert c["bypass_proxy"] >= 2
    # no iptables rule anywhere in A's netns
    for binary in ("iptables-save", "ip6tables-save"):
        saved = a.exec([binary]).stdout
        assert "-A " not in saved, saved


def test_sidecar_uid_and_loopback_are_not_redirected(node, icpt):
    sb, a, b, env = node
    ic = icpt()
    ic.attach(a.pod, InterceptConfig())
    before = outbound_cx(env)
    out = client(a, b.ip4, uid=1337)                 # the proxy's own uid
    assert out["peer"] == [b.ip4, 8080] and out["reply"]["pod"] == "b"
    r = a.exec(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                "http://127.0.0.1:15000/ready"], uid=APP_UID)   # loopback: Envoy's admin
    assert r.stdout == "200"
    assert outbound_cx(env) == before


@pytest.mark.parametrize("change", [
    {"outbound_ip_ranges_exclude": "{b}/32"},
    {"outbound_ports_exclude": "8080"},
    {"outbound_ip_ranges_include": "10.99.0.0/16"},
    {"outbound_ip_ranges_include": "10.0.0.0/8", "outbound_ip_ranges_exclude": "10.233.0.0/16"},
    {"owner_groups_exclude": str(APP_UID)},          # the app runs with gid == uid
    {"owner_groups_include": "4242"},
])
def test_excluded_destinations_bypass_the_sidecar(node, icpt, change):
    sb, a, b, env = node
    ic = icpt()
    cfg = InterceptConfig().replace(**{k: v.format(b=b.ip4) for k, v in change.items()})
    ic.attach(a.pod, cfg)
    before = outbound_cx(env)
    out = client(a, b.ip4)
    assert out["peer"] == [b.ip4, 8080] and out["reply"]["pod"] == "b"
    assert outbound_cx(env) == before, f"{change} should bypass Envoy"


def test_included_ports_and_ranges_are_captured(node, icpt):
    sb, a, b, env = node
    ic = icpt()
    # ports include captures to destinations no range includes (Istio's ISTIO_OUTPUT order)
    ic.attach(a.pod, InterceptConfig(outbound_ip_ranges_include="",
                                     outbound_ports_include="8080"))
    before = outbound_cx(env)
    assert client(a, b.ip4)["reply"]["pod"] == "b"
    assert outbound_cx(env) == before + 1
    # re-attach with another config: rules are replaced, not added to
    ic.attach(a.pod, InterceptConfig(outbound_ip_ranges_include=f"{b.ip4}/32"))
    assert client(a, b.ip4)["reply"]["pod"] == "b"
    assert outbound_cx(env) == before + 2
    with Maps(sb.pin_prefix) as m:
        assert len(m["port_rules"]) == 0
    # an exclude containing the include wins
    ic.attach(a.pod, InterceptConfig(outbound_ip_ranges_include=f"{b.ip4}/32",
                                     outbound_ip_ranges_exclude="10.233.0.0/16"))
    assert client(a, b.ip4)["reply"]["pod"] == "b"
    assert outbound_cx(env) == before + 2


# Within one splice budget (structs.SPLICE_LIMIT, docs/splice.md), so every byte is
# spliced; what happens past it is tests/kernel/test_splice_load.py's business.
BULK = 3 * 1024 * 1024


def _bulk(sb, a, b, splice):
    """BULK bytes app -> Envoy -> B, verified; returns (A's TcpOutSegs delta, counters, status)."""
    ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root, splice=splice)
    try:
        ic.attach(a.pod, InterceptConfig())
        segs0, lo0 = tcp_out_segs(a), lo_tx_packets(a)
        r = a.exec([pod_python(), "-c", traffic.BULK_SOURCE, b.ip4, "9000", str(BULK)],
                   uid=APP_UID, timeout=120)
        segs, lo = tcp_out_segs(a) - segs0, lo_tx_packets(a) - lo0
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
        return (segs, lo), counters(sb.pin_prefix), ic.status()
    finally:
        ic.cleanup()


def test_splice_skips_tcp_for_app_to_sidecar_bytes(node):
    sb, a, b, env = node
    sink = b.spawn([pod_python(), "-c", traffic.BULK_SINK, "9000"], label="sink")
    b.wait_port(9000, listening=True, proc=sink)
    before = outbound_cx(env)
    segs_on, c_on, st = _bulk(sb, a, b, splice=True)
    assert outbound_cx(env) == before + 1
    assert st["ebpf"]["splice"] is True
    assert any(p["program"] == "mb_sk_msg" for p in st["ebpf"]["programs"])
    assert c_on["splice_msgs"] > 0 and c_on["splice_bytes"] >= BULK
    segs_off, c_off, st = _bulk(sb, a, b, splice=False)
    assert st["ebpf"]["splice"] is False
    assert not any(p["program"] == "mb_sk_msg" for p in st["ebpf"]["programs"])
    assert c_off["splice_msgs"] == 0 and c_off["sockhash_add"] == 0
    # app<->Envoy segments on A's loopback are gone with splicing (handshakes remain);
    # Envoy->B segments on eth0 remain, so A's TcpOutSegs falls by about the loopback share
    (segs_on, lo_on), (segs_off, lo_off) = segs_on, segs_off
    assert lo_on * 4 < lo_off, (lo_on, lo_off)
    assert segs_on < segs_off, (segs_on, segs_off)
    sink.stop()


def test_haproxy_as_the_sidecar(node, icpt):
    sb, _, b, _ = node
    h = sb.add_pod("h")
    try:
        hap = h.start_haproxy()
        ic = icpt()
        ic.attach(h.pod, InterceptConfig())
        out = client(h, b.ip4)
        assert out["peer"] == [b.ip4, 8080] and out["reply"]["pod"] == "b"
        assert hap.stats().get("outbound.FRONTEND.stot", 0) >= 1
        assert out["reply"]["peer"][0].replace("::ffff:", "") == h.ip4
    finally:
        sb.remove_pod("h")


def test_app_before_and_after_the_sidecar_listens(node, icpt):
    sb, _, b, _ = node
    p = sb.add_pod("late")
    try:
        ic = icpt()
        ic.attach(p.pod, InterceptConfig())
        r = curl(p, url(b.ip4), timeout=5)
        assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)    # refused: no sidecar
        with Maps(sb.pin_prefix) as m:      # the refused connect left no state behind
            assert len(m["orig_dst"]) == 0
        env = p.start_envoy()
        r = curl(p, url(b.ip4))
        assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "b"
        assert outbound_cx(env) == 1
        # closed connections leave no per-connection state (no LRU reliance)
        deadline = time.monotonic() + 5
        while True:
            with Maps(sb.pin_prefix) as m:
                left = len(m["orig_dst"]), len(m["pairs"])
            if left == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == (0, 0)
    finally:
        sb.remove_pod("late")


def test_attach_twice_adopt_detach_cleanup(node):
    sb, a, b, env = node
    ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
    ids = []
    try:
        rec1 = ic.attach(a.pod, InterceptConfig())
        attached1 = cgroup_prog_ids(sb.cgroup_root)
        rec2 = ic.attach(a.pod, InterceptConfig())
        assert rec1["programs"] == rec2["programs"] and rec1["pod_index"] == rec2["pod_index"]
        assert cgroup_prog_ids(sb.cgroup_root) == attached1
        assert all(len(v) == 1 for v in attached1.values()), attached1
        ids = sorted(rec1["programs"].values())
        # another process adopts the pins: same programs, no second attachment
        code = (f"import json; from meshbpf.service import NodeService as S; "
                f"from meshbpf.config import InterceptConfig as C; from meshbpf.pod import Pod; "
                f"e = S(mode='ebpf', pin_prefix={sb.pin_prefix!r}, cgroup_root={sb.cgroup_root!r}); "
                f"r = e.attach(Pod(netns={a.netns!r}, cgroup={a.cgroup!r}), C()); "
                f"print(json.dumps(sorted(r['programs'].values())))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == ids
        assert cgroup_prog_ids(sb.cgroup_root) == attached1
        # the attaching process is gone; interception goes on
        before = outbound_cx(env)
        assert client(a, b.ip4)["peer"] == [b.ip4, 8080]
        assert outbound_cx(env) == before + 1
        st = ic.status()
        assert [p["name"] for p in st["pods"]] == [a.pod.name]
        assert {p["program"] for p in st["ebpf"]["programs"] if p.get("attached")} >= {
            "mb_connect4", "mb_connect6", "mb_getsockopt", "mb_sockops", "mb_sk_msg",
            "mb_getpeername4", "mb_getpeername6", "mb_sock_release"}
        assert st["ebpf"]["degraded"] == []         # this kernel has every optional hook
        # detach: direct traffic again
        ic.detach(a.pod)
        out = client(a, b.ip4)
        assert out["peer"] == [b.ip4, 8080] and outbound_cx(env) == before + 1
        assert out["local"][0] == a.ip4          # not 127.0.0.1: it really went direct
        ic.detach(a.pod)                          # idempotent
    finally:
        ic.cleanup()
    assert not os.path.exists(sb.pin_prefix)
    assert all(not v for v in cgroup_prog_ids(sb.cgroup_root).values())
    assert ic.status()["pods"] == []
    deadline = time.monotonic() + 10
    alive = ids
    while alive and time.monotonic() < deadline:
        alive = [i for i in ids if _prog_exists(i)]
        time.sleep(0.2)
    assert alive == [], f"programs still loaded after cleanup: {alive}"


def _prog_exists(prog_id):
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True


def test_bad_input_changes_nothing(node, icpt):
    sb, a, _, _ = node
    # the pod's cgroup is not under the attach point: its sockets would not be seen
    ic = icpt(cgroup_root=os.path.join(sb.cgroup_root, "b"))
    with pytest.raises(UsageError):
        ic.attach(a.pod, InterceptConfig())
    assert not os.path.exists(sb.pin_prefix)
    # more proxy uids than the pod struct holds: refused before anything is loaded
    ic = icpt()
    with pytest.raises(UsageError):
        ic.attach(a.pod, InterceptConfig(proxy_uid=",".join(str(i) for i in range(1, 11))))
    assert not os.path.exists(sb.pin_prefix)
    # a valid attach, then a bad re-attach: the first config stays in force
    ic.attach(a.pod, InterceptConfig(outbound_ports_exclude="22"))
    with pytest.raises(UsageError):
        ic.attach(a.pod, InterceptConfig(proxy_uid=",".join(str(i) for i in range(1, 11))))
    with Maps(sb.pin_prefix) as m:
        assert len(m["pods"]) == 1 and len(m["port_rules"]) == 1


def test_detach_by_id_after_the_pod_is_gone(node, icpt):
    sb, _, _, _ = node
    p = sb.add_pod("gone")
    ic = icpt()
    rec = ic.attach(p.pod, InterceptConfig(outbound_ports_exclude="22"), pod_id="uid-gone")
    assert rec["id"] == "uid-gone"
    sb.remove_pod("gone")
    assert ic.detach("uid-gone")["was_attached"] is True
    with Maps(sb.pin_prefix) as m:
        assert len(m["pods"]) == 0 and len(m["port_rules"]) == 0
        assert len(m["cidr_rules"]) == 0 and len(m["local_ips"]) == 0
        assert len(m["netns_addrs"]) == 0 and len(m["netns_src"]) == 0
    assert ic.status()["pods"] == [] and rec["pod_index"] >= 1
    assert ic.detach("uid-gone")["was_attached"] is False


def test_many_pods_with_colliding_loopback_tuples(node, icpt):
    sb, _, b, _ = node
    ports = [8081, 8082, 8083, 8084]
    for port in ports:
        b.start_http_server(port)
    pods = [sb.add_pod(f"m{i}") for i in range(len(ports))]
    try:
        ic = icpt()
        for p in pods:
            p.start_haproxy()
            ic.attach(p.pod, InterceptConfig())
        # every app binds the same local port: the loopback 4-tuple
        # 127.0.0.1:41000 -> 127.0.0.1:15001 exists in all four pods at once
        procs = []
        for p, port in zip(pods, ports):
            procs.append(p.spawn(traffic.connect_argv(b.ip4, port, http="/", bind_port=41000,
                                                      hold=1.5),
                                 uid=APP_UID, label="client"))
        for p, port, proc in zip(pods, ports, procs):
            assert proc.wait(timeout=30) == 0, proc.output()
            out = json.loads(proc.output().strip().splitlines()[-1])
            # the socket is 127.0.0.1:41000; getsockname shows the pod address, as under
            # iptables (cgroup/getsockname4)
            assert out["local"] == [p.ip4, 41000]
            assert out["peer"] == [b.ip4, port]
            assert out["reply"]["local"][1] == port            # B got it on that port
            assert out["reply"]["peer"][0].replace("::ffff:", "") == p.ip4
    finally:
        for p in pods:
            sb.remove_pod(p.name)


def test_ipv6_pods_behave_as_ipv4_pods(node, icpt):
    sb, a, b, env = node
    ic = icpt()
    ic.attach(a.pod, InterceptConfig(enable_ipv6=True))
    before = outbound_cx(env)
    out = client(a, b.ip6)
    assert out["peer"] == [b.ip6, 8080] and out["reply"]["pod"] == "b"
    assert out["reply"]["peer"][0] == a.ip6
    assert outbound_cx(env) == before + 1
    # an AF_INET6 socket dialling a v4-mapped address is an IPv4 connection
    out = client(a, f"::ffff:{b.ip4}")
    assert out["peer"] == [f"::ffff:{b.ip4}", 8080] and out["reply"]["pod"] == "b"
    assert outbound_cx(env) == before + 2
    # excluding the IPv6 range bypasses, as for IPv4
    ic.attach(a.pod, InterceptConfig(enable_ipv6=True, outbound_ip_ranges_exclude="fd00::/8"))
    assert client(a, b.ip6)["peer"] == [b.ip6, 8080]
    assert outbound_cx(env) == before + 2


def test_ipv6_capture_follows_the_pod_unless_turned_off(node, icpt):
    """Like iptables mode: IPv6 is captured when the pod has an IPv6 address (ipv6_auto),
    unless the operator turned it off (enable_ipv6 false with ipv6_auto=False), in which
    case IPv6 connections go direct, as with Istio's no-ip6tables-rules."""
    sb, a, b, env = node
    ic = icpt()
    rec = ic.attach(a.pod, InterceptConfig())
    assert rec["config"]["enable_ipv6"] is True
    before = outbound_cx(env)
    assert client(a, b.ip6)["peer"] == [b.ip6, 8080]
    assert outbound_cx(env) == before + 1
    ic = icpt(ipv6_auto=False)
    rec = ic.attach(a.pod, InterceptConfig())
    assert rec["config"]["enable_ipv6"] is False
    assert client(a, b.ip6)["peer"] == [b.ip6, 8080]
    assert outbound_cx(env) == before + 1
    assert client(a, b.ip4)["peer"] == [b.ip4, 8080]      # IPv4 still captured
    assert outbound_cx(env) == before + 2


def test_meshed_to_meshed_on_one_node_is_spliced_end_to_end(node, icpt):
    """A's app -> A's Envoy -> (pod to pod) -> B's Envoy inbound -> 127.0.0.6 -> B's app:
    every hop on this node is a spliced socket pair, and the bytes arrive intact."""
    sb, a, _, env_a = node
    m = sb.add_pod("mb")
    try:
        sink = m.spawn([pod_python(), "-c", traffic.BULK_SINK, "9000"], label="sink")
        m.wait_port(9000, listening=True, proc=sink)
        env_m = m.start_envoy()
        ic = icpt()
        ic.attach(a.pod, InterceptConfig())
        ic.attach(m.pod, InterceptConfig())
        c0 = counters(sb.pin_prefix)
        before_out = outbound_cx(env_a)
        r = a.exec([pod_python(), "-c", traffic.BULK_SOURCE, m.ip4, "9000", str(BULK)],
                   uid=APP_UID, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
        assert outbound_cx(env_a) == before_out + 1
        assert env_m.stats().get("tcp.inbound.downstream_cx_total", 0) >= 1
        c1 = counters(sb.pin_prefix)
        # three hops of BULK each were spliced (app->Envoy A, Envoy A->Envoy B, Envoy B->app)
        assert c1["splice_bytes"] - c0["splice_bytes"] >= 3 * BULK
        assert c1["redirect_in"] > c0["redirect_in"]
        assert c1["orig_dst_answered"] - c0["orig_dst_answered"] >= 2          # both Envoys asked
    finally:
        sb.remove_pod("mb")


def test_ebpf_commands_show_maps_and_source(node, icpt):
    from click.testing import CliRunner
    from meshbpf.ebpf.commands import ebpf
    sb, a, b, env = node
    ic = icpt()
    ic.attach(a.pod, InterceptConfig(outbound_ip_ranges_exclude="10.99.0.0/16",
                                     outbound_ports_exclude="22"))
    client(a, b.ip4)
    r = CliRunner().invoke(ebpf, ["maps", "--pin-prefix", sb.pin_prefix, "-o", "json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["pods"][0]["netns_cookie"] == a.pod.netns_cookie
    assert {"pod_index": d["pods"][0]["pod_index"], "cidr": "10.99.0.0/16",
            "rule": "exclude"} in d["cidr_rules"]
    assert d["port_rules"] == [{"pod_index": d["pods"][0]["pod_index"], "port": 22,
                                "rule": "exclude"}]
    assert a.ip4 in [i["ip"] for i in d["local_ips"]]
    assert d["counters"]["redirect_out"] >= 1
    r = CliRunner().invoke(ebpf, ["source"])
    assert r.exit_code == 0 and "int mb_connect4(" in r.output
    ic.cleanup()
    r = CliRunner().invoke(ebpf, ["counters", "--pin-prefix", sb.pin_prefix])
    assert r.exit_code != 0 and "not loaded" in str(r.exception)


def test_short_lived_clients_do_not_race_the_proxy_and_leave_no_state(node, icpt):
    """Apps that connect, write and close at once: the sidecar still learns the original
    destination (no SO_ORIGINAL_DST miss), and every per-connection entry goes away."""
    sb, a, b, env = node
    ic = icpt()
    ic.attach(a.pod, InterceptConfig())
    c0 = counters(sb.pin_prefix)
    code = textwrap.dedent(f"""
        import socket
        for _ in range(30):
            s = socket.create_connection(({b.ip4!r}, 8080))
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            s.close()
    """)
    r = a.exec([pod_python(), "-c", code], uid=APP_UID, timeout=60)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while True:
        c1 = counters(sb.pin_prefix)
        with Maps(sb.pin_prefix) as m:
            left = len(m["orig_dst"]), len(m["pairs"])
        if (c1["orig_dst_answered"] - c0["orig_dst_answered"] >= 30 and left == (0, 0)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert c1["redirect_out"] - c0["redirect_out"] == 30
    assert c1["orig_dst_answered"] - c0["orig_dst_answered"] == 30
    assert c1["orig_dst_miss"] == c0["orig_dst_miss"]
    assert left == (0, 0)


# A UDP+TCP responder: replies "<marker>:<query>" (stands in for a DNS server / DNS proxy).
RESPONDER = traffic.SCRIPT_HELPERS + textwrap.dedent("""
    import threading
    port, marker = int(sys.argv[1]), sys.argv[2].encode()
    def udp():
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", port))
        while True:
            data, addr = u.recvfrom(2048)
            u.sendto(marker + b":" + data, addr)
    threading.Thread(target=udp, daemon=True).start()
    t = tcp_listener(port)
    print("ready", flush=True)
    while True:
        c, _ = t.accept()
        c.sendall(marker + b":" + c.recv(2048))
        c.close()
""")
# The app's side: a UDP query (AF_INET and AF_INET6 sockets) and a TCP one.
ASK = textwrap.dedent("""
    import json, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    out = {}
    for name, fam, dst in (("udp4", socket.AF_INET, host), ("udp6", socket.AF_INET6, "::ffff:" + host)):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"q", (dst, port))
        data, addr = s.recvfrom(2048)
        out[name] = [data.decode(), list(addr[:2])]
    t = socket.create_connection((host, port), timeout=5)
    t.sendall(b"q")
    out["tcp"] = [t.recv(2048).decode(), list(t.getpeername()[:2])]
    print(json.dumps(out))
""")


def test_dns_capture(node, icpt):
    sb, _, b, _ = node
    d = sb.add_pod("dns")
    try:
        real = b.spawn([pod_python(), "-c", RESPONDER, "53", "real"], label="dns53")
        b.wait_port(53, listening=True, proc=real)
        proxy = d.spawn([pod_python(), "-c", RESPONDER, "15053", "sidecar"], uid=1337, label="dns15053")
        d.wait_port(15053, listening=True, proc=proxy)
        ic = icpt()

        def ask(uid=APP_UID):
            r = d.exec([pod_python(), "-c", ASK, b.ip4, "53"], uid=uid, timeout=30)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        # not asked for: DNS goes to the server
        # (no outbound range is captured here, so TCP to port 53 only moves for DNS)
        none = {"outbound_ip_ranges_include": ""}
        rec = ic.attach(d.pod, InterceptConfig(**none))
        out = ask()
        assert {k: v[0] for k, v in out.items()} == {"udp4": "real:q", "udp6": "real:q", "tcp": "real:q"}
        # redirect_dns with this server listed: the sidecar answers, as that server
        c0 = counters(sb.pin_prefix)
        rec = ic.attach(d.pod, InterceptConfig(redirect_dns=True, dns_servers_v4=[b.ip4], **none))
        assert rec["not_supported"] == []
        out = ask()
        assert out["udp4"] == ["sidecar:q", [b.ip4, 53]]
        assert out["udp6"] == ["sidecar:q", [f"::ffff:{b.ip4}", 53]]
        assert out["tcp"] == ["sidecar:q", [b.ip4, 53]]
        c1 = counters(sb.pin_prefix)
        assert c1["dns_redirect"] - c0["dns_redirect"] == 3
        assert c1["dns_reply"] - c0["dns_reply"] == 2
        # the DNS proxy's own queries (uid 1337) reach the server
        assert {k: v[0] for k, v in ask(uid=1337).items()} == {
            "udp4": "real:q", "udp6": "real:q", "tcp": "real:q"}
        # another server listed: this one is left alone ...
        ic.attach(d.pod, InterceptConfig(redirect_dns=True, dns_servers_v4=["10.233.99.99"], **none))
        assert ask()["udp4"][0] == "real:q"
        # ... unless every DNS server is captured
        ic.attach(d.pod, InterceptConfig(redirect_dns=True, capture_all_dns=True, **none))
        assert {k: v[0] for k, v in ask().items()} == {
            "udp4": "sidecar:q", "udp6": "sidecar:q", "tcp": "sidecar:q"}
        ic.detach(d.pod)
        assert ask()["udp4"][0] == "real:q"
        with Maps(sb.pin_prefix) as m:
            assert len(m["cidr_rules"]) == 0
        deadline = time.monotonic() + 5
        while True:                    # UDP sockets' entries go when the sockets close
            with Maps(sb.pin_prefix) as m:
                left = len(m["dns_orig"])
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == 0
    finally:
        sb.remove_pod("dns")


def test_proxy_dialling_its_own_pod_goes_through_its_inbound_listener(node, icpt):
    """Istio's ISTIO_IN_REDIRECT: uid 1337 -> own pod IP (not 127.0.0.1, not 15008) is sent
    to the inbound listener; the app dialling its own pod IP goes direct."""
    sb, a, _, env = node
    srv = a.start_http_server(8081)
    try:
        ic = icpt()
        ic.attach(a.pod, InterceptConfig())
        inb = lambda: env.stats().get("tcp.inbound.downstream_cx_total", 0)  # noqa: E731
        before_in, before_out = inb(), outbound_cx(env)
        out = client(a, a.ip4, port=8081, uid=1337)
        assert out["peer"] == [a.ip4, 8081]
        assert out["reply"]["peer"][0] in ("127.0.0.6", "::ffff:127.0.0.6")  # inbound passthrough
        assert inb() == before_in + 1
        out = client(a, a.ip4, port=8081)                       # the app: direct, as Istio
        assert out["reply"]["peer"][0].replace("::ffff:", "") == a.ip4
        assert inb() == before_in + 1 and outbound_cx(env) == before_out
        assert counters(sb.pin_prefix)["redirect_self"] >= 1
    finally:
        srv.stop()
