"""A throwaway node and pods made of network namespaces, a bridge, veths, cgroups, processes.

    with Sandbox(name="t") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        srv = b.start_http_server(8080)
        a.exec(["curl", "-s", f"http://{b.ip4}:8080/"])

The node is a netns `<id>-node` holding bridge `br0`; a pod is a netns `<id>-<name>` whose
`eth0` is a veth with its peer on that bridge, with 10.233.x.y/16 and fd00:6d62::x/64,
`lo` up, and a cgroup v2 leaf under the per-run test cgroup `<cgroup2>/meshbpf-test/<id>`.
No `::6/128` on lo: Istio's init container adds it, so in a sandbox pod it comes only from
meshbpf (both modes add it when they capture IPv6). Processes are started inside a pod (its
netns, its cgroup, a given uid/gid) by fork + setns, never with `ip netns exec`; with
`userns=True` they run in the pod's own user namespace (Kubernetes `hostUsers: false`),
where id n inside is host id `userns_base + n`.

API (others code against these names):
    Sandbox(name=None): .id (mbt-<pid>-<n>), .node_netns, .cgroup_root, .pin_prefix,
        .add_pod(name) -> SandboxPod, .pod(name), .remove_pod(name), .close(),
        Sandbox.cleanup_stale(), Sandbox.leftovers(run_id=None)
    SandboxPod: .name .netns .cgroup .ip4 .ip6 .ifname (eth0) .peer_ifname .pod (meshbpf.pod.Pod)
        .spawn(cmd, uid=0, gid=None, env=None, userns=False) -> Proc
        .exec(cmd, uid=0, timeout=30, check=False, userns=False)   .userns_base .host_id(n)
        .wait_port(port, host=None, timeout=10, listening=False)   .listening_ports()
        .start_envoy(uid=1337, listen="compat"|"dual"|"ipv4", userns=False) -> Sidecar
        .start_haproxy(uid=1337) -> HAProxy   .start_http_server(port=8080, uid=0) -> Proc
    Proc: .pid .wait_port(port, host, timeout) .output() .stop() .alive() .wait()
    Sidecar (Envoy): .proc .admin_url .admin(path) .stats() -> {name: int} .log() .stop()
    HAProxy: .proc .stats() -> {"outbound.FRONTEND.stot": n, ...} .log() .stop()

wait_port() connects from this (root, root-cgroup) process inside the pod's netns: rules in
the pod's nat OUTPUT chain apply to it, cgroup programs on the pod's cgroup do not.

Nothing is created in the machine's own network namespace or cgroup: veths are made inside
the node netns and moved straight into the pod. Teardown (on exit, also after an
exception) kills every process in the run's cgroups and namespaces, deletes the
namespaces, cgroups, pins under `pin_prefix`, state under /run/meshbpf and temp files;
`Sandbox.cleanup_stale()` (called on every enter) does the same for earlier runs whose
process died.
"""

import contextlib
import ctypes
import errno
import itertools
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from . import sidecar, system
from .errors import MeshbpfError, NotFoundError, UnsupportedError, UsageError
from .state import STATE_ROOT as STATE_DIR

ID_PREFIX = "mbt-"
USERNS_BASE = 100000      # pod n's user namespace maps 0..65535 inside to this + (n-1)*65536
USERNS_SIZE = 65536
STALE_FOREIGN_AGE = 600   # seconds before a run seen only through shared cgroups is stale
NETNS_DIR = "/run/netns"
TEST_CGROUP = "meshbpf-test"
PIN_PARENT = system.BPFFS
PIN_PREFIX = "meshbpf-test-"
TMP_PREFIX = "meshbpf-sandbox-"
BRIDGE = "br0"
POD_IFNAME = "eth0"
IPV4_NET = "10.233.0.0/16"
IPV6_NET = "fd00:6d62::/64"

_ID_RE = re.compile(r"^mbt-(\d+)-(\d+)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,30}$")
_counter = itertools.count()
_counter_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)


def _new_id():
    """mbt-<pid>-<n>; n is offset by our pid namespace so that runs of two containers
    sharing the cgroup hierarchy (each with its own pid numbers) do not share ids."""
    with _counter_lock:
        n = next(_counter)
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino % 1000
    except OSError:
        ns = 0
    return f"{ID_PREFIX}{os.getpid()}-{ns * 1000 + n}"


def pod_addresses(index):
    """(ipv4, ipv6) of pod number `index` (1-based): pod 1 -> 10.233.0.11, fd00:6d62::11."""
    n = 10 + index
    if not 0 < index or n > 9999:
        raise UsageError(f"pod index {index} out of range (1..9989)")
    return f"10.233.{n >> 8}.{n & 255}", f"fd00:6d62::{n}"


def _ip(args, netns=None, check=True):
    cmd = ["ip"]
    if netns:
        cmd += ["-n", netns]
    return system.run(cmd + list(args), check=check)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------
# processes


CLONE_NEWUSER = 0x10000000


def _enter_pod(netns_path, cgroup, uid, gid, userns=None):
    """The preexec of a pod process: join cgroup, then netns, then (optionally) a user
    namespace, then drop to uid/gid. `userns`: the path of a user namespace to join, or
    "new" for a new one (its maps are written by the parent; the process stays unmapped
    root until then, so it must not change ids)."""
    def preexec():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if netns_path:
            fd = os.open(netns_path, os.O_RDONLY)
            if _libc.setns(fd, system.CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({netns_path}): {os.strerror(e)}")
            os.close(fd)
        # the netns is joined first: inside the new user namespace we hold no capability
        # over the netns (it belongs to the initial one)
        if userns == "new":
            if _libc.unshare(CLONE_NEWUSER) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"unshare(CLONE_NEWUSER): {os.strerror(e)}")
            return
        if userns:
            fd = os.open(userns, os.O_RDONLY)
            if _libc.setns(fd, CLONE_NEWUSER) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({userns}): {os.strerror(e)}")
            os.close(fd)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return preexec


_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def _pod_env(env):
    """The environment of a pod process: given one as is, else ours minus proxy settings
    (traffic in a sandbox goes to pod addresses, never through a proxy of the machine)."""
    if env is not None:
        return dict(env)
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


def _popen_in_pod(pod, cmd, uid, gid, userns=None, **kw):
    try:
        return subprocess.Popen([str(c) for c in cmd], start_new_session=True,
                                preexec_fn=_enter_pod(pod.netns, pod.cgroup, uid, gid, userns),
                                **kw)
    except FileNotFoundError:
        raise UnsupportedError(f"{cmd[0]} is not installed")
    except PermissionError as e:
        raise MeshbpfError(f"cannot run {cmd[0]} as uid {uid} in pod {pod.name}: {e}")
    except subprocess.SubprocessError as e:
        # the preexec failed: the pod's netns or cgroup is gone, or uid/gid are invalid
        state = [what for what, path in (("netns", pod.netns), ("cgroup", pod.cgroup))
                 if not os.path.exists(path)]
        why = f"its {' and '.join(state)} no longer exist" if state else str(e)
        raise MeshbpfError(f"cannot start {cmd[0]} in pod {pod.name}: {why}")


class Proc:
    """A process running in a pod; its stdout+stderr go to a file (see `output()`)."""

    def __init__(self, popen, log_path, pod, cmd):
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.pod = pod
        self.cmd = cmd

    def __repr__(self):
        return f"<Proc {self.pid} {' '.join(map(str, self.cmd))!r} in {self.pod.name}>"

    @property
    def returncode(self):
        return self.popen.poll()

    def alive(self):
        return self.popen.poll() is None

    def output(self):
        """Everything the process wrote to stdout and stderr so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_port(self, port, host="127.0.0.1", timeout=10):
        """Wait until `host`:`port` accepts TCP connections inside the pod; fail early if we die."""
        self.pod.wait_port(port, host=host, timeout=timeout, proc=self)
        return self

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    def stop(self, timeout=5):
        """SIGTERM, then SIGKILL after `timeout` seconds. Returns the exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
        return self.popen.returncode


class Sidecar:
    """An Envoy running in a pod: `.proc`, `.admin_url`, `.stats()`, `.log()`, `.stop()`."""

    kind = "envoy"

    def __init__(self, proc, pod, config_path, admin_port, access_log=None):
        self.proc = proc
        self.pod = pod
        self.config_path = config_path
        self.admin_port = admin_port
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.access_log = access_log

    @property
    def pid(self):
        return self.proc.pid

    def admin(self, path, timeout=5):
        """GET `path` from the admin endpoint (inside the pod's netns); returns text."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with system.in_netns(self.pod.netns):
                with opener.open(self.admin_url + path, timeout=timeout) as r:
                    return r.read().decode()
        except OSError as e:
            raise MeshbpfError(f"Envoy admin {self.admin_url}{path} in pod {self.pod.name} "
                               f"failed: {e}; log tail:\n{self.proc.output()[-2000:]}")

    def stats(self):
        """All counters and gauges, {name: int} (from /stats?format=json)."""
        return sidecar.parse_envoy_stats(self.admin("/stats?format=json"))

    def log(self):
        """Envoy's own log (stderr) plus the access log, when one is written."""
        text = self.proc.output()
        if self.access_log and os.path.exists(self.access_log):
            with open(self.access_log, errors="replace") as f:
                text += "\n--- access log ---\n" + f.read()
        return text

    def stop(self, timeout=5):
        return self.proc.stop(timeout)


class HAProxy:
    """An HAProxy running in a pod; `.stats()` reads `show stat` from its stats socket."""

    kind = "haproxy"

    def __init__(self, proc, pod, config_path, stats_socket):
        self.proc = proc
        self.pod = pod
        self.config_path = config_path
        self.stats_socket = stats_socket

    @property
    def pid(self):
        return self.proc.pid

    def command(self, line, timeout=5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            s.close()
        return b"".join(chunks).decode()

    def stats(self):
        """{"outbound.FRONTEND.stot": n, "inbound.x.stot": n, ...} (numeric `show stat` fields)."""
        return sidecar.parse_haproxy_stat(self.command("show stat"))

    def log(self):
        return self.proc.output()

    def stop(self, timeout=5):
        return self.proc.stop(timeout)


# ---------------------------------------------------------------------------------------
# pods


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
        _ip(["netns", "add", self.netns_name])
        # The veth is created inside the node netns and its eth0 end goes straight into
        # the pod: neither end ever exists in the machine's own namespace.
        _ip(["link", "add", self.peer_ifname, "type", "veth", "peer", "name", POD_IFNAME,
             "netns", self.netns_name], netns=node)
        _ip(["link", "set", self.peer_ifname, "master", BRIDGE, "up"], netns=node)
        n = self.netns_name
        _ip(["link", "set", "lo", "up"], netns=n)
        _ip(["addr", "add", f"{self.ip4}/16", "dev", POD_IFNAME], netns=n)
        _ip(["-6", "addr", "add", f"{self.ip6}/64", "dev", POD_IFNAME, "nodad"], netns=n)
        _ip(["link", "set", POD_IFNAME, "up"], netns=n)
        _ip(["route", "add", "default", "dev", POD_IFNAME], netns=n)
        _ip(["-6", "route", "add", "default", "dev", POD_IFNAME], netns=n)

    @property
    def pod(self):
        """This pod as meshbpf.pod.Pod (what interceptors attach to)."""
        if self._pod is None:
            from .pod import Pod
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
            popen = _popen_in_pod(self, ["sleep", "infinity"], 0, 0, userns="new",
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
            popen = _popen_in_pod(self, cmd, uid, gid, userns=ns, stdin=subprocess.DEVNULL,
                                  stdout=logf, stderr=subprocess.STDOUT, env=_pod_env(env),
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
        proc = _popen_in_pod(self, cmd, uid, gid, userns=self._userns_path(userns),
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_pod_env(env), cwd=self.tmpdir)
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
    def _sidecar_dir(self, kind, uid, gid, userns=False):
        d = tempfile.mkdtemp(prefix=f"{kind}-", dir=self.tmpdir)
        os.chown(d, self.host_id(uid, userns), self.host_id(gid, userns))
        os.chmod(d, 0o755)
        return d

    def start_envoy(self, uid=sidecar.PROXY_UID, gid=None, listen="compat", access_log=True,
                    log_level="info", admin_port=sidecar.ADMIN_PORT, timeout=30, extra_args=(),
                    bootstrap=None, userns=False):
        """Start an Istio-like Envoy sidecar (15001 out, 15006 in, admin 127.0.0.1:15000);
        `bootstrap` (a dict) replaces the generated configuration; `userns`: run it in the
        pod's user namespace (uid/gid as seen inside)."""
        gid = uid if gid is None else gid
        binary = sidecar.envoy_binary()
        d = self._sidecar_dir("envoy", uid, gid, userns)
        access_path = os.path.join(d, "access.log") if access_log and bootstrap is None else None
        boot = bootstrap or sidecar.envoy_bootstrap(
            listen=listen, admin_port=admin_port, access_log_path=access_path,
            node_id=f"sidecar~{self.ip4}~{self.netns_name}")
        cfg = os.path.join(d, "envoy.json")
        with open(cfg, "w") as f:
            f.write(sidecar.envoy_config_text(boot))
        os.chmod(cfg, 0o644)
        proc = self.spawn([binary, "-c", cfg, "--disable-hot-restart", "--concurrency", "1",
                           "-l", log_level, "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v",
                           # access log lines are evidence tests read: write them promptly
                           "--file-flush-interval-msec", "100",
                           *extra_args],
                          uid=uid, gid=gid, label="envoy", cwd=d, userns=userns)
        env = Sidecar(proc, self, cfg, admin_port, access_path)
        try:
            self.wait_port(admin_port, timeout=timeout, proc=proc)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if env.admin("/ready", timeout=2).strip() == "LIVE":
                        break
                except MeshbpfError:
                    pass
                if not proc.alive() or time.monotonic() > deadline:
                    raise MeshbpfError(f"Envoy in pod {self.name} did not become ready; "
                                       f"log:\n{proc.output()[-3000:]}")
                time.sleep(0.05)
            for port in (sidecar.OUTBOUND_PORT, sidecar.INBOUND_PORT):
                self.wait_port(port, timeout=timeout, proc=proc, listening=True)
        except BaseException:
            proc.stop()
            raise
        return env

    def start_haproxy(self, uid=sidecar.PROXY_UID, gid=None, timeout=15):
        """Start HAProxy (listen 15001/15006, `server x 0.0.0.0:0`, IPv4) as `uid`."""
        gid = uid if gid is None else gid
        binary = sidecar.haproxy_binary()
        d = self._sidecar_dir("haproxy", uid, gid)
        sock = os.path.join(d, "stats.sock")
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(sidecar.haproxy_config(stats_socket=sock))
        os.chmod(cfg, 0o644)
        proc = self.spawn([binary, "-db", "-f", cfg], uid=uid, gid=gid, label="haproxy", cwd=d)
        hap = HAProxy(proc, self, cfg, sock)
        try:
            for port in (sidecar.OUTBOUND_PORT, sidecar.INBOUND_PORT):
                self.wait_port(port, timeout=timeout, proc=proc, listening=True)
            deadline = time.monotonic() + timeout
            while not os.path.exists(sock):
                if time.monotonic() > deadline:
                    raise MeshbpfError(f"HAProxy in pod {self.name} made no stats socket; "
                                       f"log:\n{proc.output()[-3000:]}")
                time.sleep(0.05)
        except BaseException:
            proc.stop()
            raise
        return hap

    def start_http_server(self, port=8080, uid=0, gid=None, host="::", timeout=10, userns=False):
        """A tiny HTTP app replying with JSON {pod, peer, local} for every GET."""
        proc = self.spawn([_python(), "-c", _HTTP_APP, str(port), self.name, host],
                          uid=uid, gid=gid, label=f"http{port}", userns=userns)
        proc.wait_port(port, host="127.0.0.1" if host in ("::", "0.0.0.0") else host,
                       timeout=timeout)
        return proc

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


def _python():
    """A Python (stdlib is all pod apps need) that any uid in a pod can run: ours, or the
    interpreter our venv links to when the venv sits in a directory others cannot enter."""
    import sys
    for cand in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        if os.path.exists(cand) and system.reachable_by_all(cand):
            return cand
    return sys.executable


# Serves on [::] (dual stack) by default; replies with the peer and local address it saw.
_HTTP_APP = r"""
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


# ---------------------------------------------------------------------------------------
# the node


class Sandbox:
    """A throwaway node: netns with a bridge, a per-run test cgroup, pin prefix, pods."""

    def __init__(self, name=None):
        if name is not None and not _NAME_RE.match(name):
            raise UsageError(f"sandbox name {name!r} must be short lowercase letters/digits")
        self.name = name
        self.id = _new_id()
        self.node_netns_name = f"{self.id}-node"
        self.node_netns = os.path.join(NETNS_DIR, self.node_netns_name)
        self.cgroup_root = os.path.join(system.cgroup2_mount(), TEST_CGROUP, self.id)
        self.pin_prefix = os.path.join(PIN_PARENT, PIN_PREFIX + self.id)
        self.state_dir = os.path.join(STATE_DIR, PIN_PREFIX + self.id)
        self.tmpdir = os.path.join(tempfile.gettempdir(), TMP_PREFIX + self.id)
        self.pods = {}
        self._next_index = 1
        self._up = False

    def __repr__(self):
        return f"<Sandbox {self.id} pods={list(self.pods)}>"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
            return False
        try:                            # never hide the body's own exception
            self.close()
        except Exception as e:  # noqa: BLE001
            exc.add_note(f"and the sandbox teardown failed too: {e}")
        return False

    def start(self):
        if os.geteuid() != 0:
            raise UnsupportedError("the sandbox needs root (network namespaces, cgroups)")
        Sandbox.cleanup_stale()
        _remove_run(self.id)            # a leftover of a dead process that had our pid
        self._up = True
        try:
            os.makedirs(self.tmpdir, mode=0o755)
            os.chmod(self.tmpdir, 0o755)
            for attempt in range(5):     # another run may remove an empty parent meanwhile
                os.makedirs(os.path.dirname(self.cgroup_root), exist_ok=True)
                try:
                    os.mkdir(self.cgroup_root)
                    break
                except FileNotFoundError:
                    if attempt == 4:
                        raise
            _ip(["netns", "add", self.node_netns_name])
            n = self.node_netns_name
            _ip(["link", "set", "lo", "up"], netns=n)
            _ip(["link", "add", BRIDGE, "type", "bridge"], netns=n)
            _ip(["link", "set", BRIDGE, "up"], netns=n)
        except BaseException:
            self.close()
            raise
        return self

    def add_pod(self, name, ip4=None, ip6=None):
        """Create pod `name` (netns, veth on br0, addresses, cgroup leaf). Its addresses are
        the next free pair (pod_addresses) unless `ip4`/`ip6` choose them, e.g. another
        pod's, to reuse an address. Chosen ones must lie in the sandbox's ranges."""
        if not self._up:
            raise MeshbpfError("the sandbox is not started (use `with Sandbox() as sb`)")
        if not _NAME_RE.match(name or "") or name == "node":
            raise UsageError(f"pod name {name!r} must be short lowercase letters/digits (not 'node')")
        if name in self.pods:
            raise UsageError(f"pod {name!r} already exists in sandbox {self.id}")
        for ip, net in ((ip4, IPV4_NET), (ip6, IPV6_NET)):
            try:
                inside = ip is None or ipaddress.ip_address(ip) in ipaddress.ip_network(net)
            except ValueError:
                inside = False
            if not inside:
                raise UsageError(f"pod address {ip!r} must be an address in {net}")
        pod = SandboxPod(self, name, self._next_index, ip4=ip4, ip6=ip6)
        self._next_index += 1
        self.pods[name] = pod
        try:
            pod._create()
        except BaseException:
            self._remove_pod(pod)
            del self.pods[name]
            raise
        return pod

    def pod(self, name):
        try:
            return self.pods[name]
        except KeyError:
            raise NotFoundError(f"no pod {name!r} in sandbox {self.id}")

    def remove_pod(self, name):
        """Kill the pod's processes, delete its netns (and veth) and cgroup."""
        pod = self.pod(name)
        del self.pods[name]
        self._remove_pod(pod)

    def _remove_pod(self, pod):
        pod.removed = True
        pod.stop_processes()
        _kill_cgroup_tree(pod.cgroup)
        _kill_netns_procs([pod.netns])
        pod.reap()
        _ip(["netns", "del", pod.netns_name], check=False)
        # The peer end dies with the pod's netns; make sure in case something held it.
        if os.path.exists(self.node_netns):
            _ip(["link", "del", pod.peer_ifname], netns=self.node_netns_name, check=False)
        _rmdir_cgroup_tree(pod.cgroup)
        shutil.rmtree(pod.tmpdir, ignore_errors=True)

    def close(self):
        """Tear everything down; safe to call twice and after a partial start."""
        errors = []
        for pod in list(self.pods.values()):
            try:
                pod.stop_processes()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        for pod in self.pods.values():
            pod.removed = True
        self.pods.clear()
        self._up = False
        try:
            _remove_run(self.id)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        if errors:
            raise MeshbpfError(f"sandbox {self.id} teardown had errors: {errors}")

    # -- leftovers ---------------------------------------------------------------------
    @staticmethod
    def leftovers(run_id=None):
        """What sandbox runs left on the machine: {run_id: [paths/names]} (all runs or one)."""
        found = {}

        def add(rid, what):
            if run_id is None or rid == run_id:
                found.setdefault(rid, []).append(what)

        if os.path.isdir(NETNS_DIR):
            for ent in os.listdir(NETNS_DIR):
                rid = _run_id_of(ent)
                if rid:
                    add(rid, os.path.join(NETNS_DIR, ent))
        try:
            root = os.path.join(system.cgroup2_mount(), TEST_CGROUP)
        except MeshbpfError:
            root = None
        if root and os.path.isdir(root):
            for ent in os.listdir(root):
                if _ID_RE.match(ent):
                    add(ent, os.path.join(root, ent))
        for parent, prefix in ((PIN_PARENT, PIN_PREFIX), (STATE_DIR, PIN_PREFIX),
                               (tempfile.gettempdir(), TMP_PREFIX)):
            if os.path.isdir(parent):
                for ent in os.listdir(parent):
                    if ent.startswith(prefix) and _ID_RE.match(ent[len(prefix):]):
                        add(ent[len(prefix):], os.path.join(parent, ent))
        return found

    @staticmethod
    def cleanup_stale():
        """Remove leftovers of earlier runs whose owning process is dead; returns their ids.

        A run belongs to the pid in its id; if that pid now names a process started after
        the run's leftovers were made, the pid was reused and the owner is dead too.
        """
        removed = []
        now = time.time()
        for rid, paths in Sandbox.leftovers().items():
            pid = int(_ID_RE.match(rid).group(1))
            if pid == os.getpid() or _owner_alive(pid, paths, rid):
                continue
            # A live run always has a netns or a temp dir in its own mount namespace. If we
            # see neither, it may be another container's run (it shares only the cgroup
            # hierarchy with us) whose pid means nothing here: leave it unless it is old.
            private = [p for p in paths if p.startswith((NETNS_DIR + "/", tempfile.gettempdir() + "/"))]
            if not private and any(now - os.lstat(p).st_mtime < STALE_FOREIGN_AGE
                                   for p in paths if os.path.lexists(p)):
                continue
            _remove_run(rid)
            removed.append(rid)
        return removed


def _process_start_time(pid):
    """Wall-clock start time of `pid` (seconds since the epoch), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _foreign(rid):
    """True if run `rid` has processes in another pid namespace (a container's run sharing
    this cgroup hierarchy): its owner pid means nothing here, so it is never stale to us."""
    try:
        root = os.path.join(system.cgroup2_mount(), TEST_CGROUP, rid)
        mine = os.stat("/proc/self/ns/pid").st_ino
    except (MeshbpfError, OSError):
        return False
    for d in _cgroup_dirs_bottom_up(root):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for p in pids:
            if p == 0:
                return True     # invisible from our pid namespace
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{p}/ns/pid").st_ino != mine:
                    return True
    return False


def _owner_alive(pid, paths, rid=None):
    if rid and _foreign(rid):
        return True
    if not _pid_alive(pid):
        return False
    started = _process_start_time(pid)
    made = [os.lstat(p).st_ctime for p in paths if os.path.lexists(p)]
    if started is None or not made:
        return True
    # generous margin: btime has 1 s resolution and the clock may have been stepped
    return started <= min(made) + 30


def _run_id_of(netns_name):
    m = re.match(r"^(mbt-\d+-\d+)-[a-z0-9][a-z0-9_.-]*$", netns_name)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------
# teardown helpers (work from names alone, so stale runs can be removed too)


def _cgroup_dirs_bottom_up(root):
    if not os.path.isdir(root):
        return []
    dirs = [dp for dp, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda d: d.count("/"), reverse=True)


def _procs_in_cgroup(cg):
    try:
        with open(os.path.join(cg, "cgroup.procs")) as f:
            # A process outside our pid namespace reads as 0 here: never "kill 0" (that
            # is our own process group).
            return [int(x) for x in f.read().split() if int(x) > 0]
    except (FileNotFoundError, ProcessLookupError, OSError):
        return []


def _kill_cgroup_tree(root, timeout=5):
    """Kill every process in cgroup `root` and below; wait until they are gone."""
    if not os.path.isdir(root):
        return
    killf = os.path.join(root, "cgroup.kill")
    if os.path.exists(killf):
        try:
            with open(killf, "w") as f:
                f.write("1")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for d in _cgroup_dirs_bottom_up(root) for p in _procs_in_cgroup(d)]
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise MeshbpfError(f"processes {pids} in {root} survived SIGKILL")
        time.sleep(0.02)


def _rmdir_cgroup_tree(root, timeout=5):
    deadline = time.monotonic() + timeout
    for d in _cgroup_dirs_bottom_up(root):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise MeshbpfError(f"cannot remove cgroup {d}: {e.strerror}")
                _kill_cgroup_tree(d)
                time.sleep(0.02)


def _netns_ident(path):
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def _kill_netns_procs(netns_paths, timeout=5):
    """SIGKILL every process whose network namespace is one of `netns_paths`."""
    idents = {i for i in (_netns_ident(p) for p in netns_paths) if i}
    if not idents:
        return
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        victims = []
        for ent in os.listdir("/proc"):
            if not ent.isdigit() or int(ent) == me:
                continue
            if _netns_ident(f"/proc/{ent}/ns/net") in idents:
                victims.append(int(ent))
        if not victims:
            return
        for p in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise MeshbpfError(f"processes {victims} in the sandbox namespaces survived SIGKILL")
        time.sleep(0.02)


def _remove_run(rid):
    """Remove everything run `rid` may have created (idempotent)."""
    errors = []
    netns_names = [e for e in (os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else [])
                   if _run_id_of(e) == rid]
    try:
        cg_root = os.path.join(system.cgroup2_mount(), TEST_CGROUP, rid)
    except MeshbpfError:
        cg_root = None
    # 1. processes: in the run's cgroups, then anything else still inside its namespaces
    for step in (lambda: cg_root and _kill_cgroup_tree(cg_root),
                 lambda: _kill_netns_procs([os.path.join(NETNS_DIR, n) for n in netns_names])):
        try:
            step()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    # 2. namespaces: pods first, the node (with the bridge and veth peers) last
    for n in sorted(netns_names, key=lambda n: n.endswith("-node")):
        r = _ip(["netns", "del", n], check=False)
        if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, n)):
            errors.append(MeshbpfError(f"ip netns del {n}: {r.stderr.strip()}"))
    # 3. pins (releasing pinned links and maps), state, temp files; then the cgroups
    for path in (os.path.join(PIN_PARENT, PIN_PREFIX + rid), os.path.join(STATE_DIR, PIN_PREFIX + rid),
                 os.path.join(tempfile.gettempdir(), TMP_PREFIX + rid)):
        if os.path.lexists(path):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as e:
                errors.append(MeshbpfError(f"cannot remove {path}: {e.strerror}"))
    if cg_root:
        try:
            _rmdir_cgroup_tree(cg_root)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        parent = os.path.dirname(cg_root)
        with contextlib.suppress(OSError):
            os.rmdir(parent)            # only succeeds when no other run uses it
    if errors:
        raise MeshbpfError(f"removing sandbox run {rid}: " + "; ".join(map(str, errors)))


__all__ = ["Sandbox", "SandboxPod", "Proc", "Sidecar", "HAProxy", "pod_addresses"]
