"""Pods of the test bed: a netns whose `eth0` is a veth with its peer on the node bridge,
10.233.x.y/16 and fd00:6d62::x/64 addresses, `lo` up, a cgroup v2 leaf, and the processes
(apps, sidecars) started in it. A pod is made and removed by its node (`node.Sandbox`).

No `::6/128` on lo: Istio's init container adds it, so in a test-bed pod it comes only from
meshbpf (both modes add it when they capture IPv6).
"""

import contextlib
import itertools
import os
import socket
import subprocess
import time

from .. import system
from ..errors import MeshbpfError, NotFoundError, UsageError
from . import sidecar, traffic
from .procs import Proc, pod_env, popen_in_pod

USERNS_BASE = 100000      # pod n's user namespace maps 0..65535 inside to this + (n-1)*65536
USERNS_SIZE = 65536
NETNS_DIR = "/run/netns"
BRIDGE = "br0"
POD_IFNAME = "eth0"
IPV4_NET = "10.233.0.0/16"
IPV6_NET = "fd00:6d62::/64"


def pod_addresses(index):
    """(ipv4, ipv6) of pod number `index` (1-based): pod 1 -> 10.233.0.11, fd00:6d62::11."""
    n = 10 + index
    if not 0 < index or n > 9999:
        raise UsageError(f"pod index {index} out of range (1..9989)")
    return f"10.233.{n >> 8}.{n & 255}", f"fd00:6d62::{n}"


def run_ip(args, netns=None, check=True):
    cmd = ["ip"]
    if netns:
        cmd += ["-n", netns]
    return system.run(cmd + list(args), check=check)


class SandboxPod:
    """A pod of a sandbox: netns + eth0 on the node bridge + addresses + cgroup leaf."""

    def __init__(self, sandbox, name, index, ip4=None, ip6=None):
        self.sandbox = sandbox
        self.name = name
        self.index = index
        self.netns_name = f"{sandbox.id}-{name}"
        self.netns = os.path.join(NETNS_DIR, self.netns_name)
        self.cgroup = os.path.join(sandbox.cgroup_root, name)
        self.ip4, self.ip6 = pod_addresses(index)
        self.ip4, self.ip6 = ip4 or self.ip4, ip6 or self.ip6
        self.userns_base = USERNS_BASE + (index - 1) * USERNS_SIZE
        self._userns_holder = None
        self.ifname = POD_IFNAME
        self.peer_ifname = f"vp{index}"          # the veth end on the node bridge
        self.tmpdir = os.path.join(sandbox.tmpdir, name)
        self.procs = []
        self.removed = False
        self._pod = None
        self._seq = itertools.count()

    def __repr__(self):
        return f"<SandboxPod {self.name} {self.ip4} {self.ip6} netns={self.netns}>"

    # -- construction ---------------------------------------------------------------
    def _create(self):
        node = self.sandbox.node_netns_name
        os.makedirs(self.tmpdir, mode=0o755, exist_ok=True)
        os.chmod(self.tmpdir, 0o755)
        os.mkdir(self.cgroup)
        run_ip(["netns", "add", self.netns_name])
        # The veth is created inside the node netns and its eth0 end goes straight into
        # the pod: neither end ever exists in the machine's own namespace.
        run_ip(["link", "add", self.peer_ifname, "type", "veth", "peer", "name", POD_IFNAME,
             "netns", self.netns_name], netns=node)
        run_ip(["link", "set", self.peer_ifname, "master", BRIDGE, "up"], netns=node)
        n = self.netns_name
        run_ip(["link", "set", "lo", "up"], netns=n)
        run_ip(["addr", "add", f"{self.ip4}/16", "dev", POD_IFNAME], netns=n)
        run_ip(["-6", "addr", "add", f"{self.ip6}/64", "dev", POD_IFNAME, "nodad"], netns=n)
        run_ip(["link", "set", POD_IFNAME, "up"], netns=n)
        run_ip(["route", "add", "default", "dev", POD_IFNAME], netns=n)
        run_ip(["-6", "route", "add", "default", "dev", POD_IFNAME], netns=n)

    @property
    def pod(self):
        """This pod as meshbpf.pod.Pod (what interceptors attach to)."""
        if self._pod is None:
            from ..pod import Pod
            self._pod = Pod(netns=self.netns, cgroup=self.cgroup, name=self.netns_name)
        return self._pod

    def _check_exists(self):
        if self.removed or not os.path.exists(self.netns):
            raise NotFoundError(f"pod {self.name} of sandbox {self.sandbox.id} no longer exists "
                                "(removed or torn down)")

    # -- processes --------------------------------------------------------------------
    def host_id(self, n, userns=True):
        """The host uid/gid that id `n` of a process in this pod is (userns: in the pod's
        user namespace)."""
        if not userns:
            return n
        if not 0 <= n < USERNS_SIZE:
            raise UsageError(f"id {n} is outside pod {self.name}'s user namespace (0..{USERNS_SIZE - 1})")
        return self.userns_base + n

    def _userns_path(self, userns):
        """The pod's user namespace (made on first use by a holder process that lives as
        long as the pod), or None when `userns` is false."""
        if not userns:
            return None
        if self._userns_holder is None or not self._userns_holder.alive():
            self._check_exists()
            popen = popen_in_pod(self, ["sleep", "infinity"], 0, 0, userns="new",
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
            holder = Proc(popen, os.devnull, self, ["sleep", "infinity"])
            self.procs.append(holder)
            mapping = f"0 {self.userns_base} {USERNS_SIZE}\n"
            try:
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{popen.pid}/{name}", "w") as f:
                        f.write(mapping)
            except OSError as e:
                holder.stop()
                raise MeshbpfError(f"cannot map pod {self.name}'s user namespace: {e}")
            self._userns_holder = holder
        return f"/proc/{self._userns_holder.pid}/ns/user"

    def spawn(self, cmd, uid=0, gid=None, env=None, cwd=None, label=None, userns=False):
        """Start `cmd` in this pod (netns, cgroup, uid/gid; with userns=True in the pod's
        user namespace, uid/gid as seen inside it); returns a Proc."""
        if not cmd:
            raise UsageError("spawn needs a command")
        self._check_exists()
        gid = uid if gid is None else gid
        label = label or os.path.basename(str(cmd[0]))
        log_path = os.path.join(self.tmpdir, f"{label}-{next(self._seq)}.log")
        ns = self._userns_path(userns)
        logf = open(log_path, "wb")
        try:
            popen = popen_in_pod(self, cmd, uid, gid, userns=ns, stdin=subprocess.DEVNULL,
                                  stdout=logf, stderr=subprocess.STDOUT, env=pod_env(env),
                                  cwd=cwd or self.tmpdir)
        finally:
            logf.close()
        proc = Proc(popen, log_path, self, list(cmd))
        self.procs.append(proc)
        return proc

    def exec(self, cmd, uid=0, gid=None, timeout=30, check=False, input=None, env=None,
             userns=False):
        """Run `cmd` to completion in this pod; returns CompletedProcess (text)."""
        if not cmd:
            raise UsageError("exec needs a command")
        self._check_exists()
        gid = uid if gid is None else gid
        proc = popen_in_pod(self, cmd, uid, gid, userns=self._userns_path(userns),
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=pod_env(env), cwd=self.tmpdir)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise MeshbpfError(f"`{' '.join(map(str, cmd))}` in pod {self.name} did not finish "
                               f"within {timeout}s; output: {(out + err).strip()[-2000:]}")
        res = subprocess.CompletedProcess([str(c) for c in cmd], proc.returncode, out, err)
        if check and res.returncode != 0:
            raise MeshbpfError(f"`{' '.join(map(str, cmd))}` in pod {self.name} failed "
                               f"(exit {res.returncode}): {(err or out).strip()}")
        return res

    def listening_ports(self):
        """TCP ports something listens on in this pod (from the netns' /proc/net/tcp{,6})."""
        ports = set()
        with system.in_netns(self.netns):
            for table in ("tcp", "tcp6"):
                try:
                    with open(f"/proc/thread-self/net/{table}") as f:
                        lines = f.readlines()[1:]
                except FileNotFoundError:
                    continue
                for line in lines:
                    cols = line.split()
                    if len(cols) > 3 and cols[3] == "0A":          # TCP_LISTEN
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        return ports

    def wait_port(self, port, host=None, timeout=10, proc=None, listening=False):
        """Wait until `host` (default 127.0.0.1):`port` accepts TCP inside this pod.

        With listening=True only wait for a listening socket on `port` (no connection is
        made, so a proxy's statistics are not disturbed).
        """
        host = host or "127.0.0.1"
        # An emulated VM guest (tests/vm, TCG) starts Python and Envoy many times slower.
        timeout *= float(os.environ.get("MESHBPF_TEST_TIMEOUT_SCALE") or 1)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if proc is not None and not proc.alive():
                raise MeshbpfError(f"{proc!r} exited with {proc.returncode} before port {port} "
                                   f"opened; output:\n{proc.output()[-3000:]}")
            if listening:
                if port in self.listening_ports():
                    return
                last = "not listening"
            else:
                with system.in_netns(self.netns):
                    s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(0.5)
                try:
                    s.connect((host, port))
                    return
                except OSError as e:
                    last = e
                finally:
                    s.close()
            if time.monotonic() > deadline:
                extra = f"; output:\n{proc.output()[-3000:]}" if proc is not None else ""
                raise MeshbpfError(f"nothing accepted {host}:{port} in pod {self.name} within "
                                   f"{timeout}s ({last}){extra}")
            time.sleep(0.05)

    # -- sidecars and apps -------------------------------------------------------------
    def start_envoy(self, uid=sidecar.PROXY_UID, **kw):
        """An Istio-like Envoy sidecar in this pod (see `sidecar.start_envoy`)."""
        return sidecar.start_envoy(self, uid=uid, **kw)

    def start_haproxy(self, uid=sidecar.PROXY_UID, **kw):
        """HAProxy as the sidecar of this pod (see `sidecar.start_haproxy`)."""
        return sidecar.start_haproxy(self, uid=uid, **kw)

    def start_http_server(self, port=8080, **kw):
        """The JSON-echoing HTTP app on `port` (see `traffic.start_http_server`)."""
        return traffic.start_http_server(self, port, **kw)

    def stop_processes(self, graceful=False):
        """Stop this pod's processes (SIGTERM first if `graceful`, else SIGKILL)."""
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                if graceful:
                    p.stop(timeout=2)
                elif p.popen.poll() is None:
                    p.popen.kill()
        self.reap()

    def reap(self, timeout=5):
        """Collect the exit status of this pod's processes once they are gone."""
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.popen.wait(timeout)

