"""meshbpf-cni as a container runtime runs it: Debian's reference plugins (bridge +
host-local, /usr/lib/cni) and meshbpf-cni chained in one conflist, each invoked exactly as
libcni invokes a chain (CNI_* environment, the plugin's config on stdin with the list's
name and cniVersion and the previous plugin's result as prevResult; DEL in reverse with the
cached result), from inside the test bed's node netns (the bridge is made there, never in
the machine's network), for pod netns the test made, with the node agent running (a pods
file with a pending "shop/web-0" entry) and a real Envoy sidecar run as uid 1337.

- The app's first connection, made the moment ADD returns, goes through Envoy to the right
  original destination: the ADD itself enrolled the pod (nothing else tells the agent).
- CHECK passes; an agent restart keeps the pod enrolled (the binding and the record).
- DEL leaves nothing: no record, no map entry, no binding, no pins beyond the node's, no
  veth or address lease left by bridge's DEL.
- Agent down: ADD fails with the spec's error (code 11) and the runtime's DEL succeeds;
  with fail_open ADD succeeds and passes bridge's result through unchanged.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from meshbpf import system
from meshbpf.cni import install
from meshbpf.ebpf import structs
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox, traffic
from meshbpf.testbed.pods import SandboxPod, run_ip

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_PLUGINS = "/usr/lib/cni"
BRIDGE = "mbtcni0"
SUBNET = "10.234.7.0/24"
OUT_CX = "tcp.outbound.downstream_cx_total"


class CniFailed(Exception):
    def __init__(self, plugin, rc, out, err):
        super().__init__(f"{plugin} failed (exit {rc}): {out} {err}")
        self.plugin, self.rc, self.out, self.err = plugin, rc, out, err


class Runtime:
    """What libcni does with a conflist, run from the node netns."""

    def __init__(self, node_netns, path):
        self.node_netns, self.path = node_netns, path
        self.calls = []

    def _find(self, kind):
        for d in self.path:
            p = os.path.join(d, kind)
            if os.access(p, os.X_OK):
                return p
        raise AssertionError(f"CNI plugin {kind} not found in {self.path}")

    def exec(self, conf, command, cid, netns, ifname, args):
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
               "CNI_ARGS": args, "CNI_PATH": ":".join(self.path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if netns:
            env["CNI_NETNS"] = netns
        binary = self._find(conf["type"])
        t0 = time.monotonic()
        r = subprocess.run(["nsenter", f"--net={self.node_netns}", binary], input=json.dumps(conf),
                           env=env, capture_output=True, text=True, timeout=120)
        self.calls.append((conf["type"], command, r.returncode, time.monotonic() - t0))
        out = json.loads(r.stdout) if r.stdout.strip() else None
        if r.returncode != 0:
            raise CniFailed(conf["type"], r.returncode, out, r.stderr)
        return out

    @staticmethod
    def plugin_conf(conflist, plugin, prev):
        conf = dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(self, conflist, cid, netns, args, ifname="eth0"):
        """Each plugin in order; returns every plugin's result (the last is the chain's)."""
        results, prev = [], None
        for p in conflist["plugins"]:
            prev = self.exec(self.plugin_conf(conflist, p, prev), "ADD", cid, netns, ifname, args)
            results.append(prev)
        return results

    def check(self, conflist, cid, netns, args, cached, ifname="eth0"):
        for p in conflist["plugins"]:
            self.exec(self.plugin_conf(conflist, p, cached), "CHECK", cid, netns, ifname, args)

    def delete(self, conflist, cid, netns, args, cached, ifname="eth0"):
        for p in reversed(conflist["plugins"]):
            self.exec(self.plugin_conf(conflist, p, cached), "DEL", cid, netns, ifname, args)

    def loopback(self, cid, netns):
        """containerd brings lo up with the loopback plugin, its own network."""
        self.exec({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}, "ADD",
                  cid, netns, "lo", "")


def cni_args(ns, name, uid, cid):
    return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}")


def new_pod(sb, name, index, uid):
    """A pod as the kubelet and the runtime make it before CNI: a netns with nothing in it
    and the pod's cgroup kubepods/pod<uid> (no process yet)."""
    pod = SandboxPod(sb, name, index)
    pod.cgroup = os.path.join(sb.cgroup_root, "kubepods", f"pod{uid}")
    os.makedirs(pod.cgroup)
    os.makedirs(pod.tmpdir, mode=0o755)
    run_ip(["netns", "add", pod.netns_name])
    sb.pods[name] = pod
    return pod


class Agent:
    def __init__(self, sb, pods_file, sock):
        self.sb, self.sock = sb, sock
        self.state = os.path.join(sb.state_dir, "agent.json")
        self.log = open(os.path.join(sb.tmpdir, f"agent-{time.monotonic_ns()}.log"), "w+")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshbpf", "daemon", "--pods-file", pods_file,
             "--pin-prefix", sb.pin_prefix, "--cgroup-root", sb.cgroup_root, "--mode", "ebpf",
             "--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json", "--resync", "3600",
             "--cni-socket", sock], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: os.path.exists(sock) and self.doc(), 120, "agent ready")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def doc(self):
        with contextlib.suppress(OSError, ValueError):
            with open(self.state) as f:
                d = json.load(f)
            if d.get("pid") == self.proc.pid:
                return d
        return None

    def pods(self):
        return {p["name"]: p for p in (self.doc() or {}).get("pods", [])}

    def wait(self, pred, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.output()}"
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)


def pins(sb):
    out = set()
    for dirpath, dirs, files in os.walk(sb.pin_prefix):
        out |= {os.path.relpath(os.path.join(dirpath, n), sb.pin_prefix) for n in dirs + files}
    return out


def map_entry(sb, cookie):
    with Maps(sb.pin_prefix) as m:
        return m["pods"].lookup(structs.U64(cookie))


def links_on_bridge(sb):
    r = system.run(["ip", "-n", sb.node_netns_name, "-o", "link", "show", "master", BRIDGE],
                   check=False)
    return [l.split(":")[1].strip() for l in r.stdout.splitlines() if l.strip()]


@pytest.fixture
def node():
    for tool in ("bridge", "host-local", "loopback"):
        if not os.access(os.path.join(REFERENCE_PLUGINS, tool), os.X_OK):
            pytest.fail(f"{REFERENCE_PLUGINS}/{tool} missing: install containernetworking-plugins "
                        "(scripts/setup.sh does)")
    with Sandbox(name="cni") as sb:
        bin_dir, conf_dir = os.path.join(sb.tmpdir, "bin"), os.path.join(sb.tmpdir, "net.d")
        ipam_dir = os.path.join(sb.tmpdir, "ipam")
        for d in (bin_dir, conf_dir):
            os.makedirs(d)
        sock = os.path.join(sb.tmpdir, "cni.sock")
        with open(os.path.join(conf_dir, "10-mbt.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "mbt-pods", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                          "dataDir": ipam_dir}}]}, f)
        # the DaemonSet's install step, into this test's own plugin and config dirs
        install.install(bin_dir, conf_dir, python=sys.executable, agent_socket=sock)
        first = install.conf_files(os.listdir(conf_dir))[0]
        with open(os.path.join(conf_dir, first)) as f:
            conflist = json.load(f)
        assert [p["type"] for p in conflist["plugins"]] == ["bridge", "meshbpf-cni"]
        pods_file = os.path.join(sb.tmpdir, "pods.json")
        with open(pods_file, "w") as f:
            json.dump({"pods": [{"name": "shop/web-0"}]}, f)
        rt = Runtime(sb.node_netns, [bin_dir, REFERENCE_PLUGINS])
        agents = []
        try:
            yield sb, rt, conflist, pods_file, sock, ipam_dir, agents
        finally:
            for a in agents:
                with contextlib.suppress(Exception):
                    a.kill()
            subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix",
                            sb.pin_prefix, "--cgroup-root", sb.cgroup_root], cwd=REPO,
                           capture_output=True, timeout=60)


def test_first_connection_after_add_goes_through_envoy_and_del_leaves_nothing(node):
    sb, rt, conflist, pods_file, sock, ipam_dir, agents = node
    agent = Agent(sb, pods_file, sock)
    agents.append(agent)
    assert agent.pods()["shop/web-0"]["state"] == "pending"

    # the server: a pod that is not meshed (its ADD is answered "not meshed")
    db_uid, db_cid = str(uuid.uuid4()), uuid.uuid4().hex
    db = new_pod(sb, "db", 2, db_uid)
    rt.loopback(db_cid, db.netns)
    db_res = rt.add(conflist, db_cid, db.netns, cni_args("shop", "db-0", db_uid, db_cid))
    assert db_res[1] == db_res[0]                    # passed through unchanged
    db.ip4 = db_res[-1]["ips"][0]["address"].split("/")[0]
    db.start_http_server(8080)

    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    web = new_pod(sb, "web", 1, uid)
    rt.loopback(cid, web.netns)
    web.ip4 = "0.0.0.0"
    env = web.start_envoy()                          # the sidecar, as uid 1337, in the pod
    pins_before = pins(sb)
    args = cni_args("shop", "web-0", uid, cid)

    results = rt.add(conflist, cid, web.netns, args)
    # ---- ADD has returned: nothing else has told the agent about this pod ----
    first = traffic.http_get(web, db.ip4, 8080)
    took = [t for kind, cmd, rc, t in rt.calls if kind == "meshbpf-cni" and cmd == "ADD"][-1]
    print(f"meshbpf-cni ADD (process start to exit, attach included): {took * 1000:.0f} ms")
    assert took < 5, took          # a plugin that waited out a timeout would show here
    assert results[1] == results[0]                  # bridge's result, unchanged
    assert first["status"].endswith("200 OK") and first["reply"]["pod"] == "db"
    assert first["reply"]["local"][1] == 8080 and first["reply"]["local"][0].endswith(db.ip4)
    assert env.stats().get(OUT_CX, 0) == 1, "the first connection did not go through Envoy"
    assert first["peer"][0].endswith(db.ip4)         # the app sees the peer it dialled

    rec_path = os.path.join(sb.state_dir, "pods", "shop:web-0.json")
    rec = json.load(open(rec_path))
    cookie = system.netns_cookie(web.netns)
    assert rec["netns"] == web.netns and rec["netns_cookie"] == cookie and rec["mode"] == "ebpf"
    assert rec["cgroup"] == os.path.realpath(web.cgroup)          # found by the pod's UID
    assert map_entry(sb, cookie) is not None
    assert agent.pods()["shop/web-0"]["state"] == "attached"
    assert not os.path.exists(os.path.join(sb.state_dir, "pods", "shop:db-0.json"))
    rt.check(conflist, cid, web.netns, args, results[-1])

    # a restarted agent keeps it: the binding and the record survive, no re-attach
    agent.kill()
    agent = Agent(sb, pods_file, sock)
    agents.append(agent)
    assert agent.pods()["shop/web-0"]["state"] == "attached"
    assert json.load(open(rec_path))["updated"] == rec["updated"]
    assert traffic.http_get(web, db.ip4, 8080)["reply"]["pod"] == "db"
    assert env.stats().get(OUT_CX, 0) == 2

    host_end = links_on_bridge(sb)
    assert len(host_end) == 2
    rt.delete(conflist, cid, web.netns, args, results[-1])
    assert not os.path.exists(rec_path)
    assert map_entry(sb, cookie) is None
    assert not os.path.exists(os.path.join(sb.state_dir, "by-cookie", str(cookie)))
    bindings = json.load(open(os.path.join(sb.state_dir, "cni.json")))["bindings"]
    assert "shop/web-0" not in bindings
    assert pins(sb) == pins_before
    assert agent.pods()["shop/web-0"]["state"] == "pending"
    leases = [n for n in os.listdir(os.path.join(ipam_dir, "mbt-pods")) if n[0].isdigit()]
    assert leases == [db.ip4]                        # web's address released
    assert len(links_on_bridge(sb)) == 1             # only db's veth stays on the bridge
    links = system.run(["ip", "-n", web.netns_name, "-o", "link", "show"]).stdout
    assert [l.split(":")[1].strip() for l in links.splitlines()] == ["lo"]     # eth0 gone
    assert traffic.connect(web, db.ip4, 8080, http="/", allow_error="connect")["error"]
    rt.delete(conflist, cid, web.netns, args, results[-1])           # a second DEL: fine
    rt.delete(conflist, db_cid, db.netns, cni_args("shop", "db-0", db_uid, db_cid), db_res[-1])
    assert json.load(open(os.path.join(sb.state_dir, "cni.json")))["bindings"] == {}
    assert os.listdir(os.path.join(sb.state_dir, "pods")) == []


def test_agent_down_add_fails_del_succeeds_fail_open_passes_through(node):
    sb, rt, conflist, pods_file, sock, ipam_dir, agents = node
    assert not os.path.exists(sock)                  # no agent
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    web = new_pod(sb, "web", 1, uid)
    args = cni_args("shop", "web-0", uid, cid)
    with pytest.raises(CniFailed) as e:
        rt.add(conflist, cid, web.netns, args)
    assert e.value.plugin == "meshbpf-cni" and e.value.rc != 0
    assert e.value.out["code"] == 11 and e.value.out["cniVersion"] == "1.0.0"
    assert "not reachable" in e.value.out["msg"] and sock in e.value.out["details"]
    # the runtime tears the half-made network down: DEL succeeds without the agent
    rt.delete(conflist, cid, web.netns, args, None)
    assert links_on_bridge(sb) == []

    open_list = json.loads(json.dumps(conflist))
    open_list["plugins"][-1]["fail_open"] = True
    cid2 = uuid.uuid4().hex
    results = rt.add(open_list, cid2, web.netns, args)
    assert results[1] == results[0] and results[0]["ips"][0]["address"].startswith("10.234.7.")
    rt.delete(open_list, cid2, web.netns, args, results[-1])
    assert links_on_bridge(sb) == []
    assert not os.path.exists(os.path.join(sb.state_dir, "pods"))
