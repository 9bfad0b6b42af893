"""The sandbox: pods talk over the bridge, processes land in the right netns/cgroup/uid,
teardown leaves nothing, stale runs are cleaned, and an Istio-style REDIRECT into a real
Envoy / HAProxy sidecar reaches the original destination (issue 2 check)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from meshbpf import system
from meshbpf.errors import MeshbpfError, UsageError
from meshbpf.testbed import Sandbox
from meshbpf.testbed.node import _ID_RE

pytestmark = pytest.mark.kernel

OUTBOUND_REDIRECT = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-o", "lo", "-j", "RETURN"], \
    ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "!", "--uid-owner", "1337",
     "-j", "REDIRECT", "--to-ports", "15001"]
INBOUND_REDIRECT = (["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-m", "multiport",
                     "!", "--dports", "15000:15099", "-j", "REDIRECT", "--to-ports", "15006"],)


def _iptables(pod, rules, v6=True):
    for binary in ("iptables", "ip6tables") if v6 else ("iptables",):
        for rule in rules:
            pod.exec([binary, "-w", *rule], check=True)


def _curl(pod, url, uid=0):
    r = pod.exec(["curl", "-sS", "--max-time", "10", url], uid=uid, timeout=20)
    assert r.returncode == 0, f"curl {url} from {pod.name}: {r.stderr}"
    return json.loads(r.stdout)


def _url(ip, port=8080, path="/"):
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def _ns_ident(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ours(names):
    """Drop what belongs to sandbox runs of other processes (other tests may run meanwhile)."""
    mine = f"mbt-{os.getpid()}-"
    return sorted(n for n in names if "mbt-" not in n or mine in n)


def _snapshot():
    """What the machine looks like from the outside: things a sandbox could leave behind."""
    cg_parent = os.path.join(system.cgroup2_mount(), "meshbpf-test")
    return {
        "netns": _ours(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "root_links": sorted(l.split(":")[1].strip().split("@")[0] for l in
                             system.run(["ip", "-o", "link", "show"]).stdout.splitlines()),
        "root_addrs": sorted(system.run(["ip", "-o", "addr", "show"]).stdout.splitlines()),
        "root_routes": sorted(system.run(["ip", "route", "show", "table", "all"]).stdout.splitlines()),
        "cgroups": _ours(os.listdir(cg_parent)) if os.path.isdir(cg_parent) else [],
        "pins": _ours(e for e in os.listdir(system.BPFFS) if e.startswith("meshbpf-test-")),
        "tmp": _ours(e for e in os.listdir("/tmp") if e.startswith("meshbpf-sandbox-")),
        "cgroup_attachments": _ours(l for l in system.run(["bpftool", "cgroup", "tree"]).stdout
                                    .splitlines() if l.startswith("/")),
        "procs_in_test_cgroups": _ours(_test_cgroup_procs(cg_parent)),
    }


def _test_cgroup_procs(cg_parent):
    out = []
    for dirpath, _, files in os.walk(cg_parent):
        if "cgroup.procs" in files:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                out += [f"{dirpath}:{pid}" for pid in f.read().split()]
    return out


def _mine(snapshot_value, sb_id):
    return [x for x in (snapshot_value or []) if sb_id in x]


def test_pods_talk_over_the_bridge_v4_and_v6():
    with Sandbox(name="talk") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        assert a.ip4 != b.ip4 and a.ip6 != b.ip6
        b.start_http_server(8080)
        r4 = _curl(a, _url(b.ip4))
        assert r4["pod"] == "b" and r4["peer"][0].endswith(a.ip4)
        r6 = _curl(a, _url(b.ip6))
        assert r6["peer"][0] == a.ip6
        # addresses as the Pod model sees them
        addrs = {str(x) for x in a.pod.addresses()}
        assert {a.ip4, a.ip6} <= addrs and a.pod.has_ipv6
        assert [i.name for i in a.pod.interfaces()] == ["eth0"]
        # b's own view: the default route goes out eth0
        routes = b.exec(["ip", "route"], check=True).stdout
        assert "default dev eth0" in routes


def test_process_runs_in_pod_netns_cgroup_and_uid():
    with Sandbox() as sb:
        a = sb.add_pod("a")
        p = a.spawn(["sleep", "60"], uid=1337, gid=1338)
        time.sleep(0.1)
        assert _ns_ident(f"/proc/{p.pid}/ns/net") == _ns_ident(a.netns)
        assert _ns_ident(f"/proc/{p.pid}/ns/net") != _ns_ident("/proc/self/ns/net")
        assert system.cgroup_of_pid(p.pid) == a.cgroup
        assert a.cgroup.startswith(sb.cgroup_root + "/")
        with open(f"/proc/{p.pid}/status") as f:
            status = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
        assert status["Uid"].split() == ["1337"] * 4
        assert status["Gid"].split() == ["1338"] * 4
        assert status["Groups"].split() == []
        # exec: same placement, output captured
        r = a.exec(["sh", "-c", "id -u; cat /proc/self/cgroup; echo err >&2"], uid=1337)
        assert r.returncode == 0
        out = r.stdout.splitlines()
        assert out[0] == "1337"
        assert any(l.startswith("0::") and l.endswith(f"/{sb.id}/a") for l in out)
        assert r.stderr.strip() == "err"
        # output() shows what the process printed
        q = a.spawn(["sh", "-c", "echo hello; echo oops >&2"])
        q.wait(5)
        assert "hello" in q.output() and "oops" in q.output()
        assert p.stop() == -signal.SIGTERM


def test_pod_lo_has_no_v6_passthrough_address():
    """Istio's init container adds ::6/128; a sandbox pod gets it only from meshbpf."""
    with Sandbox() as sb:
        a = sb.add_pod("a")
        lo = a.exec(["ip", "-6", "-o", "addr", "show", "dev", "lo"], check=True).stdout
        assert "::1/128" in lo and "::6/128" not in lo


def test_processes_in_the_pod_user_namespace():
    """userns=True: every such process of a pod shares one user namespace, where id n is
    host id userns_base + n (Kubernetes hostUsers: false)."""
    with Sandbox() as sb:
        a = sb.add_pod("a")
        p = a.spawn(["sleep", "60"], uid=1337, userns=True)
        q = a.spawn(["sleep", "60"], userns=True)
        time.sleep(0.1)
        assert _ns_ident(f"/proc/{p.pid}/ns/user") == _ns_ident(f"/proc/{q.pid}/ns/user")
        assert _ns_ident(f"/proc/{p.pid}/ns/user") != _ns_ident("/proc/self/ns/user")
        assert _ns_ident(f"/proc/{p.pid}/ns/net") == _ns_ident(a.netns)
        assert system.cgroup_of_pid(p.pid) == a.cgroup
        with open(f"/proc/{p.pid}/status") as f:
            status = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
        assert status["Uid"].split() == [str(a.userns_base + 1337)] * 4
        assert a.host_id(1337) == a.userns_base + 1337 != 1337
        with open(f"/proc/{p.pid}/uid_map") as f:
            assert f.read().split() == ["0", str(a.userns_base), "65536"]
        r = a.exec(["id", "-u"], uid=1337, userns=True, check=True)
        assert r.stdout.strip() == "1337"                 # as the process sees itself
        assert a.exec(["id", "-u"], check=True).stdout.strip() == "0"   # default: host ids


def test_exec_check_and_timeout_raise_clear_errors():
    with Sandbox() as sb:
        a = sb.add_pod("a")
        with pytest.raises(MeshbpfError, match="exit 3"):
            a.exec(["sh", "-c", "exit 3"], check=True)
        with pytest.raises(MeshbpfError, match="did not finish"):
            a.exec(["sleep", "10"], timeout=0.5)
        with pytest.raises(MeshbpfError, match="exited"):
            a.spawn(["sh", "-c", "exit 0"]).wait_port(9, timeout=5)
        with pytest.raises(MeshbpfError, match="within"):
            a.wait_port(9, timeout=0.3)
        with pytest.raises(UsageError):
            sb.add_pod("a")
        with pytest.raises(UsageError):
            sb.add_pod("Bad Name")


def test_teardown_leaves_nothing():
    before = _snapshot()
    with Sandbox(name="clean") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        sid = sb.id
        os.makedirs(os.path.join(sb.pin_prefix, "sub"))          # as an interceptor would
        system.run(["bpftool", "map", "create", os.path.join(sb.pin_prefix, "sub", "m"),
                    "type", "array", "key", "4", "value", "4", "entries", "1", "name", "mbt_m"])
        procs = [a.spawn(["sleep", "600"], uid=1337), b.start_http_server(8080),
                 a.start_envoy()]
        # a process that escaped the pod cgroup but still lives in its netns
        stray = subprocess.Popen(["nsenter", f"--net={b.netns}", "sleep", "600"])
        pids = [p.pid for p in procs] + [stray.pid]
        during = _snapshot()
        assert len(_mine(during["netns"], sid)) == 3
        assert during["root_links"] == before["root_links"]      # nothing in our own netns
        assert during["root_addrs"] == before["root_addrs"]
        assert during["root_routes"] == before["root_routes"]
        assert _mine(during["cgroups"], sid) == [sid]
        assert _mine(during["pins"], sid)
    stray.wait(10)
    after = _snapshot()
    assert after == before
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    assert Sandbox.leftovers(sid) == {}


def _zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_teardown_when_the_body_raises():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with Sandbox() as sb:
            a = sb.add_pod("a")
            sid = sb.id
            p = a.spawn(["sleep", "600"])
            raise RuntimeError("boom")
    assert _zombie_or_gone(p.pid)
    assert _snapshot() == before
    assert Sandbox.leftovers(sid) == {}


def test_remove_pod():
    with Sandbox() as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        p = b.spawn(["sleep", "600"])
        sb.remove_pod("b")
        assert _zombie_or_gone(p.pid)
        assert not os.path.exists(b.netns) and not os.path.exists(b.cgroup)
        links = system.run(["ip", "-o", "link", "show"], netns=sb.node_netns).stdout
        assert b.peer_ifname + "@" not in links and a.peer_ifname + "@" in links
        assert list(sb.pods) == ["a"]
        c = sb.add_pod("c")           # a new pod gets a fresh address
        assert c.ip4 not in (a.ip4, b.ip4)


def test_cleanup_stale_removes_leftovers_of_dead_runs():
    dead = subprocess.Popen(["true"])
    dead.wait()
    rid = f"mbt-{dead.pid}-0"
    cg = os.path.join(system.cgroup2_mount(), "meshbpf-test", rid, "a")
    pins = os.path.join(system.BPFFS, f"meshbpf-test-{rid}")
    victim = None
    try:
        system.run(["ip", "netns", "add", f"{rid}-node"])
        system.run(["ip", "netns", "add", f"{rid}-a"])
        os.makedirs(cg)
        os.makedirs(pins)
        system.run(["bpftool", "map", "create", os.path.join(pins, "m"), "type", "array",
                    "key", "4", "value", "4", "entries", "1", "name", "mbt_stale"])
        # a process of the dead run, still in its cgroup
        victim = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: open(
            os.path.join(cg, "cgroup.procs"), "w").write(str(os.getpid())))
        # (another test process starting a sandbox meanwhile may clean this up first:
        # only the end state is asserted)
        # a live run (this process) is never touched
        with Sandbox() as sb:
            assert sb.id not in Sandbox.cleanup_stale()
            left = Sandbox.leftovers()
            assert rid not in left               # Sandbox() entry already cleaned it
            assert os.path.exists(sb.node_netns)
        assert victim.wait(10) == -signal.SIGKILL
        assert not os.path.exists(f"/run/netns/{rid}-node")
        assert not os.path.exists(f"/run/netns/{rid}-a")
        assert not os.path.exists(os.path.dirname(cg))
        assert not os.path.exists(pins)
    finally:
        if victim and victim.poll() is None:
            victim.kill()
        for n in ("node", "a"):
            subprocess.run(["ip", "netns", "del", f"{rid}-{n}"], capture_output=True)
        subprocess.run(["rm", "-rf", pins])
        for d in (cg, os.path.dirname(cg)):
            if os.path.isdir(d):
                os.rmdir(d)


def _counter(stats, name):
    return stats.get(name, 0)


@pytest.mark.parametrize("family,listen", [("ip4", "compat"), ("ip6", "compat"),
                                           ("ip4", "dual"), ("ip6", "dual")])
def test_envoy_outbound_redirect_reaches_original_destination(family, listen):
    """Issue-2 check: REDIRECT to 15001 in A -> Envoy -> B's server, shown in Envoy's stats."""
    with Sandbox(name="envout") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy(listen=listen)
        _iptables(a, OUTBOUND_REDIRECT)
        s0 = env.stats()
        dst = getattr(b, family)
        reply = _curl(a, _url(dst))
        s1 = env.stats()
        assert reply["pod"] == "b"
        assert reply["local"][0].endswith(dst)
        # B saw A's address (Envoy dials from the pod's own address), not loopback
        assert reply["peer"][0].endswith(getattr(a, family))
        for name in ("tcp.outbound.downstream_cx_total",
                     "cluster.PassthroughCluster.upstream_cx_total"):
            assert _counter(s1, name) >= _counter(s0, name) + 1, (name, env.log())
        assert _counter(s1, "cluster.PassthroughCluster.upstream_cx_none_healthy") == \
            _counter(s0, "cluster.PassthroughCluster.upstream_cx_none_healthy")
        assert "[virtualOutbound]" in _wait_log(env, "virtualOutbound")


def _wait_log(env, needle, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = env.log()
        if needle in text.split("--- access log ---")[-1]:
            return text
        time.sleep(0.2)
    return env.log()


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_envoy_inbound_redirect_binds_127_0_0_6(family):
    """REDIRECT in B's PREROUTING to 15006 -> Envoy in B -> B's app, from 127.0.0.6 / ::6."""
    with Sandbox(name="envin") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = b.start_envoy()
        _iptables(b, INBOUND_REDIRECT)
        # what istio-init does besides the rules (the sandbox leaves it to meshbpf)
        b.exec(["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"], check=True)
        s0 = env.stats()
        reply = _curl(a, _url(getattr(b, family)))
        s1 = env.stats()
        expected = "127.0.0.6" if family == "ip4" else "::6"
        assert reply["peer"][0].split(":")[-1] == expected or reply["peer"][0] == expected
        for name in ("tcp.inbound.downstream_cx_total",
                     "cluster.InboundPassthroughCluster.upstream_cx_total"):
            assert _counter(s1, name) >= _counter(s0, name) + 1, (name, env.log())
        # the admin port (15000-15099) stays reachable without redirection
        assert b.exec(["curl", "-sS", "http://127.0.0.1:15000/ready"]).stdout.strip() == "LIVE"


def test_haproxy_outbound_and_inbound_redirect():
    """The same checks with HAProxy (`server x 0.0.0.0:0` reads SO_ORIGINAL_DST; IPv4)."""
    with Sandbox(name="hap") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        hap_a = a.start_haproxy()
        hap_b = b.start_haproxy()
        _iptables(a, OUTBOUND_REDIRECT, v6=False)
        _iptables(b, INBOUND_REDIRECT, v6=False)
        a0, b0 = hap_a.stats(), hap_b.stats()
        reply = _curl(a, _url(b.ip4))
        a1, b1 = hap_a.stats(), hap_b.stats()
        assert reply["pod"] == "b"
        assert reply["peer"][0].endswith("127.0.0.6")          # through B's inbound
        assert a1["outbound.FRONTEND.stot"] >= a0["outbound.FRONTEND.stot"] + 1
        assert a1["outbound.x.stot"] >= a0["outbound.x.stot"] + 1
        assert b1["inbound.FRONTEND.stot"] >= b0["inbound.FRONTEND.stot"] + 1
        assert b1["inbound.x.stot"] >= b0["inbound.x.stot"] + 1
        assert a1["outbound.x.econ"] == a0["outbound.x.econ"]


def test_envoy_sidecar_runs_as_1337_and_stops():
    with Sandbox() as sb:
        a = sb.add_pod("a")
        env = a.start_envoy()
        with open(f"/proc/{env.pid}/status") as f:
            uid_line = [l for l in f if l.startswith("Uid:")][0]
        assert uid_line.split()[1:] == ["1337"] * 4
        assert system.cgroup_of_pid(env.pid) == a.cgroup
        assert {15000, 15001, 15006} <= a.listening_ports()
        assert "server.live" in env.stats()
        env.stop()
        assert not env.proc.alive()
        assert 15001 not in a.listening_ports()


def test_spawn_in_removed_pod_is_a_clear_error():
    with Sandbox() as sb:
        a = sb.add_pod("a")
        sb.remove_pod("a")
        with pytest.raises(MeshbpfError, match="no longer exists"):
            a.spawn(["true"])
        with pytest.raises(MeshbpfError, match="not installed"):
            sb.add_pod("b").exec(["no-such-binary-mbt"])


def _cgroup_tree():
    return system.run(["bpftool", "cgroup", "tree"]).stdout


def test_teardown_detaches_programs_and_removes_pins():
    """A program attached to a pod cgroup and pinned under pin_prefix goes with the sandbox."""
    from bcc import BPF, BPFAttachType, libbcc
    with Sandbox() as sb:
        a = sb.add_pod("a")
        sid = sb.id
        b = BPF(text=b"int mbt_pass(struct __sk_buff *skb) { return 1; }")
        try:
            fn = b.load_func(b"mbt_pass", BPF.CGROUP_SKB)
            fd = os.open(a.cgroup, os.O_RDONLY)
            try:
                BPF.attach_func(fn, fd, BPFAttachType.CGROUP_INET_INGRESS)
            finally:
                os.close(fd)
            os.makedirs(sb.pin_prefix)
            assert libbcc.lib.bpf_obj_pin(fn.fd, os.path.join(sb.pin_prefix, "prog").encode()) == 0
        finally:
            b.cleanup()
        assert a.cgroup in _cgroup_tree()
        assert os.path.exists(os.path.join(sb.pin_prefix, "prog"))
    assert sid not in _cgroup_tree()
    assert not os.path.exists(sb.pin_prefix)
    assert Sandbox.leftovers(sid) == {}


CRASHING_RUN = r"""
import os, sys
from meshbpf.testbed import Sandbox
from meshbpf.testbed.node import _ID_RE
sb = Sandbox(name="crash").start()
a = sb.add_pod("a")
a.spawn(["sleep", "600"])
a.start_http_server(8080)
print(sb.id, flush=True)
os.kill(os.getpid(), 9)          # die mid-test: no __exit__, no finally
"""


def test_crashed_run_is_cleaned_by_the_next_one():
    r = subprocess.run([sys.executable, "-c", CRASHING_RUN], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
    assert r.returncode == -signal.SIGKILL, r.stderr
    rid = r.stdout.strip()
    assert _ID_RE.match(rid)
    # Another test process starting a sandbox right now may clean it before we look;
    # normally we find the leftovers and remove them ourselves.
    left = Sandbox.leftovers(rid).get(rid, [])
    cg = os.path.join(system.cgroup2_mount(), "meshbpf-test", rid, "a")
    orphans = []
    with contextlib.suppress(FileNotFoundError):
        orphans = [int(p) for p in open(os.path.join(cg, "cgroup.procs")).read().split()]
    if left:
        assert any(p.endswith(f"{rid}-a") for p in left)
        assert len(orphans) == 2                 # sleep + http server outlived their parent
    Sandbox.cleanup_stale()
    assert Sandbox.leftovers(rid) == {}
    for pid in orphans:
        assert _zombie_or_gone(pid)
