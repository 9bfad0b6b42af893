"""What the CNI kernel tests share (tests/kernel/test_cni.py, test_cni_kube.py): a container
runtime's view of a chained conflist (Runtime: libcni's environment, config on stdin,
prevResult; run from the test bed's node netns), a pod made as the kubelet and the runtime
make it before CNI (new_pod: an empty netns and the cgroup kubepods/pod<uid>), the node agent
with its CNI socket (Agent), and the test node (cni_node: Debian's reference plugins bridge +
host-local, meshbpf-cni installed into the test's own plugin and config directories)."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from meshbpf import system
from meshbpf.cni import install
from meshbpf.ebpf import structs
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox
from meshbpf.testbed.pods import SandboxPod, run_ip

from .agentrt import REPO, AgentProcess

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


class Agent(AgentProcess):
    """`meshbpf daemon` with --cni-socket `sock`: the pods file `pods_file` (or None) and
    `sources` (e.g. --kube --kubeconfig PATH --node-name NODE)."""

    def __init__(self, sb, pods_file, sock, *sources):
        self.sock = sock
        files = ["--pods-file", pods_file] if pods_file else []
        super().__init__(sb, *files, *sources, "--mode", "ebpf", "--resync", "3600",
                         "--cni-socket", sock)
        self.wait(lambda: os.path.exists(sock) and self.doc(), 120, "agent ready")


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


@contextlib.contextmanager
def cni_node(name, pods_doc=None):
    """(sandbox, runtime, conflist, pods file or None, socket, ipam dir, [agents]): the
    agents the test starts are killed and everything meshbpf made is cleaned up after."""
    for tool in ("bridge", "host-local", "loopback"):
        if not os.access(os.path.join(REFERENCE_PLUGINS, tool), os.X_OK):
            pytest.fail(f"{REFERENCE_PLUGINS}/{tool} missing: install containernetworking-plugins "
                        "(scripts/setup.sh does)")
    with Sandbox(name=name) as sb:
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
        pods_file = None
        if pods_doc is not None:
            pods_file = os.path.join(sb.tmpdir, "pods.json")
            with open(pods_file, "w") as f:
                json.dump(pods_doc, f)
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
