"""The node of the test bed: a throwaway netns `<id>-node` holding bridge `br0`, a per-run
test cgroup `<cgroup2>/meshbpf-test/<id>`, a pin prefix and a state dir, the pods on it, and
the removal of all of it, for this run and for earlier runs whose process died.

    with Sandbox(name="t") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        srv = b.start_http_server(8080)
        a.exec(["curl", "-s", f"http://{b.ip4}:8080/"])

API (others code against these names):
    Sandbox(name=None): .id (mbt-<pid>-<n>), .node_netns, .cgroup_root, .pin_prefix,
        .add_pod(name) -> pods.SandboxPod, .pod(name), .remove_pod(name), .close(),
        Sandbox.cleanup_stale(), Sandbox.leftovers(run_id=None)
    SandboxPod: .name .netns .cgroup .ip4 .ip6 .ifname (eth0) .peer_ifname .pod (meshbpf.pod.Pod)
        .spawn(cmd, uid=0, gid=None, env=None, userns=False) -> procs.Proc
        .exec(cmd, uid=0, timeout=30, check=False, userns=False)   .userns_base .host_id(n)
        .wait_port(port, host=None, timeout=10, listening=False)   .listening_ports()
        .start_envoy(uid=1337, listen="compat"|"dual"|"ipv4", userns=False) -> sidecar.Sidecar
        .start_haproxy(uid=1337) -> sidecar.HAProxy   .start_http_server(port=8080, uid=0) -> Proc
    Proc: .pid .wait_port(port, host, timeout) .output() .stop() .alive() .wait()
    Sidecar (Envoy): .proc .admin_url .admin(path) .stats() -> {name: int} .log() .stop()
    HAProxy: .proc .stats() -> {"outbound.FRONTEND.stot": n, ...} .log() .stop()

Processes are started inside a pod (its netns, its cgroup, a given uid/gid) by fork + setns,
never with `ip netns exec`; with `userns=True` they run in the pod's own user namespace
(Kubernetes `hostUsers: false`), where id n inside is host id `userns_base + n`.
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
import errno
import ipaddress
import itertools
import os
import re
import shutil
import signal
import tempfile
import threading
import time

from .. import system
from ..errors import MeshbpfError, NotFoundError, UnsupportedError, UsageError
from ..state import STATE_ROOT as STATE_DIR
from .pods import BRIDGE, IPV4_NET, IPV6_NET, NETNS_DIR, SandboxPod, run_ip

ID_PREFIX = "mbt-"
STALE_FOREIGN_AGE = 600   # seconds before a run seen only through shared cgroups is stale
TEST_CGROUP = "meshbpf-test"
PIN_PARENT = system.BPFFS
PIN_PREFIX = "meshbpf-test-"
TMP_PREFIX = "meshbpf-sandbox-"

_ID_RE = re.compile(r"^mbt-(\d+)-(\d+)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,30}$")
_counter = itertools.count()
_counter_lock = threading.Lock()


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


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            run_ip(["netns", "add", self.node_netns_name])
            n = self.node_netns_name
            run_ip(["link", "set", "lo", "up"], netns=n)
            run_ip(["link", "add", BRIDGE, "type", "bridge"], netns=n)
            run_ip(["link", "set", BRIDGE, "up"], netns=n)
        except BaseException:
            self.close()
            raise
        return self

    def add_pod(self, name, ip4=None, ip6=None, cgroup=None):
        """Create pod `name` (netns, veth on br0, addresses, cgroup leaf). Its addresses are
        the next free pair (pod_addresses) unless `ip4`/`ip6` choose them, e.g. another
        pod's, to reuse an address. Chosen ones must lie in the sandbox's ranges. `cgroup`:
        its cgroup's path below the sandbox's test cgroup (default `name`), e.g.
        "node/kubepods/app" for a node-like tree; missing parents are made."""
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
        if cgroup is not None:
            parts = cgroup.split("/")
            if cgroup.startswith("/") or not all(_NAME_RE.match(p) for p in parts):
                raise UsageError(f"pod cgroup {cgroup!r} must be a relative path of short "
                                 "lowercase names")
        pod = SandboxPod(self, name, self._next_index, ip4=ip4, ip6=ip6, cgroup=cgroup)
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
        run_ip(["netns", "del", pod.netns_name], check=False)
        # The peer end dies with the pod's netns; make sure in case something held it.
        if os.path.exists(self.node_netns):
            run_ip(["link", "del", pod.peer_ifname], netns=self.node_netns_name, check=False)
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
    _kill_until_gone(lambda: [p for d in _cgroup_dirs_bottom_up(root) for p in _procs_in_cgroup(d)],
                     f"in {root}", timeout)


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
    me = os.getpid()
    _kill_until_gone(lambda: [int(ent) for ent in os.listdir("/proc")
                              if ent.isdigit() and int(ent) != me
                              and _netns_ident(f"/proc/{ent}/ns/net") in idents],
                     "in the sandbox namespaces", timeout)


def _kill_until_gone(find, where, timeout):
    """SIGKILL the pids `find()` lists until it lists none; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pids = find()
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise MeshbpfError(f"processes {pids} {where} survived SIGKILL")
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
        r = run_ip(["netns", "del", n], check=False)
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
