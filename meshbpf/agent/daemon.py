"""The agent's loop: watch its pod sources (the pods file, the Kubernetes source), act on
every change, check every pod for drift every `resync` seconds, write agent.json, stop on
SIGTERM/SIGINT.

The desired state is the union of the sources (an id two sources serve is an error for
both); nothing is acted on until every source has said what it wants once (a Kubernetes
source that has not listed yet would otherwise detach its pods). A source is an object with
`fileno()` (readable when it changed; None: polled every `interval`), `changed()`,
`desired()` ((pods, errors), or None while unknown), `report()`, `start()` and `close()`.

A change is never kept waiting behind the drift check: a change touches only the entries
that changed (and pods whose backoff is over), and the drift check runs in slices of
DRIFT_CHUNK pods with the sources looked at between two slices. The first full reconcile
(every pod, drift checks included) runs at start; /readyz says ready after it.

The file is watched through its directory (inotify IN_CLOSE_WRITE, IN_MOVED_TO,
IN_CREATE, IN_DELETE via ctypes), so an editor's or a config manager's atomic rename is
seen; where inotify is not available the file's stat is polled every 50 ms. A change is
read at once, but a file that does not parse is not acted on: the last good desired state
stays (a writer that writes in place is caught half way; the next complete write fixes it).

Stopping leaves every pod's interception in place (an upgrade or restart of the agent
does not open a window), unless `cleanup_on_exit`. A killed agent loses nothing: the
records, pins and rules are the state, and the next agent adopts them and reconciles.
"""

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import select
import signal
import struct
import threading
import time

from ..errors import MeshbpfError
from . import cniserver, source
from .reconcile import Reconciler

log = logging.getLogger("meshbpf.agent")

POLL_INTERVAL = 0.05
# Pods one slice of the drift check covers: a slice is a few milliseconds (one visit of
# each pod's netns), the longest a file change can wait.
DRIFT_CHUNK = 10
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x8, 0x80, 0x100, 0x200
IN_MOVED_FROM, IN_DELETE_SELF, IN_Q_OVERFLOW = 0x40, 0x400, 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = "iIII"                     # struct inotify_event: wd, mask, cookie, len
_EVENT_SIZE = struct.calcsize(_EVENT)


_LOAD = """
import json, sys
from meshbpf.errors import MeshbpfError
from meshbpf.service import NodeService
kw = json.loads(sys.argv[1])
svc = NodeService(**kw)
try:
    with svc.store.locked():
        res = svc.backend("ebpf").adopt()
    up = res.get("upgraded") or {}
    print(json.dumps({"from": up.get("from"), "to": up.get("to"),
                      "replaced": len(up.get("replaced") or [])} if up else {}))
except MeshbpfError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def load_in_child(svc):
    """Load, adopt or upgrade the node's eBPF programs in a child process with `svc`'s
    node options (the child compiles; this process keeps no compiler). Returns the
    upgrade ({"from", "to", "replaced"}) if pinned programs were replaced, else None."""
    import subprocess
    import sys
    kw = dict(svc.options, pin_prefix=svc.pin_prefix, cgroup_root=svc.cgroup_root,
              mode="ebpf", assume_kernel=svc.assume_kernel)
    kw.pop("features", None)
    r = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(kw)], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise MeshbpfError(f"loading the node's eBPF programs failed: {last}")
    try:
        return json.loads((r.stdout.strip().splitlines() or ["{}"])[-1]) or None
    except ValueError:
        return None


class InotifyWatch:
    """Events on one file, watched through its directory; fileno() for select()."""

    def __init__(self, path):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.dir, self.name = os.path.split(os.path.abspath(path))
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF
        if libc.inotify_add_watch(self.fd, os.fsencode(self.dir), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {self.dir}")

    def fileno(self):
        return self.fd

    def changed(self):
        """Drain the queue: did anything happen to our file (or did the queue overflow)?"""
        hit = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            off = 0
            while off + _EVENT_SIZE <= len(buf):
                _wd, mask, _cookie, length = struct.unpack_from(_EVENT, buf, off)
                name = buf[off + _EVENT_SIZE: off + _EVENT_SIZE + length].rstrip(b"\0")
                off += _EVENT_SIZE + length
                if mask & IN_Q_OVERFLOW or os.fsdecode(name) == self.name:
                    hit = True

    def close(self):
        os.close(self.fd)


class StatWatch:
    """The fallback: the file's (inode, size, mtime) polled every POLL_INTERVAL."""

    interval = POLL_INTERVAL

    def __init__(self, path):
        self.path = path
        self.last = self._stat()

    def _stat(self):
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def fileno(self):
        return None

    def changed(self):
        now = self._stat()
        hit, self.last = now != self.last, now
        return hit

    def close(self):
        pass


def watch(path):
    try:
        return InotifyWatch(path)
    except (OSError, AttributeError) as e:
        log.warning("inotify unavailable (%s): polling %s every %d ms", e, path,
                    POLL_INTERVAL * 1000)
        return StatWatch(path)


def _locked(method):
    """One at a time with the CNI server's requests (they run in its threads)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper


class Daemon:
    def __init__(self, svc, pods_file=None, metrics=None, resync=10.0, cleanup_on_exit=False,
                 sources=(), cni_socket=None):
        self.svc = svc
        self.pods_file = os.path.abspath(pods_file) if pods_file else None
        self.sources = list(sources)           # besides the pods file (e.g. Kubernetes)
        self.file_state = None                 # the pods file's last good (pods, errors)
        self.source_state = {}                 # source -> its last known (pods, errors)
        self.metrics, self.resync = metrics, resync
        self.cleanup_on_exit = cleanup_on_exit
        self.reconciler = Reconciler(svc, metrics)
        self.reconciler.checkpoint = self.write_state
        self.desired, self.file_error, self.entry_errors = None, None, []
        self.state_path = os.path.join(svc.store.instance_dir, "agent.json")
        self.started = time.time()
        self.mode = None
        self.ready = False       # after the first full reconcile
        self.lock = threading.RLock()
        # CNI: what each pod's ADD said (completes pending entries) and the socket it comes on
        self.bindings = cniserver.Bindings(os.path.join(svc.store.instance_dir, "cni.json"))
        self.cni_socket, self.cni = cni_socket, None

    # ---- the pods file ---------------------------------------------------------------------
    @_locked
    def load(self):
        """Read the pods file; on success it becomes the desired state. Returns whether it
        did (a missing or unusable file keeps the last good state)."""
        try:
            with open(self.pods_file) as f:
                text = f.read()
            pods, errors = source.parse(text)
        except FileNotFoundError:
            self._file_problem(f"pods file {self.pods_file} does not exist")
            return False
        except OSError as e:
            self._file_problem(f"cannot read {self.pods_file}: {e.strerror}")
            return False
        except MeshbpfError as e:
            self._file_problem(str(e))
            return False
        self.file_error = None
        self.file_state = (pods, errors)
        self.merge()
        for e in errors:
            log.error("%s: bad entry #%d in the pods file: %s", e.name or f"entry #{e.index}",
                      e.index, e.reason, extra={"pod": e.name, "pod_id": e.id, "action": "parse",
                                                "error": e.reason})
        return True

    @_locked
    def merge(self):
        """The desired state from every source's last known state (None while one has
        never said)."""
        parts = []
        if self.pods_file is not None:
            if self.file_state is None:
                return
            parts.append(self.file_state)
        for s in self.sources:
            now = s.desired()
            if now is not None:
                self.source_state[s] = now
            if s not in self.source_state:
                return
            parts.append(self.source_state[s])
        self.desired, self.entry_errors = source.union(parts)

    def _file_problem(self, msg):
        if msg != self.file_error:
            kept = "keeping the last good pods" if self.desired is not None else "nothing to do yet"
            log.error("%s; %s", msg, kept, extra={"action": "load", "error": msg})
        self.file_error = msg

    # ---- agent.json --------------------------------------------------------------------------
    def write_state(self, running=True):
        doc = {"pid": os.getpid(), "running": running, "started": self.started,
               "updated": time.time(), "pods_file": self.pods_file, "mode": self.mode,
               "file_error": self.file_error,
               "pods": self.reconciler.report() + self._waiting_for_cni(),
               "sources": ([{"name": "pods-file", "path": self.pods_file,
                             "error": self.file_error}] if self.pods_file else []) +
               [s.report() for s in self.sources],
               "owned": sorted(self.reconciler.owned)}
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, sort_keys=True)      # no indent: the C encoder (200 pods: 1 ms)
        os.replace(tmp, self.state_path)

    def _read_owned(self):
        try:
            with open(self.state_path) as f:
                return set(json.load(f).get("owned", []))
        except (OSError, ValueError, AttributeError):
            return set()

    # ---- CNI ---------------------------------------------------------------------------------
    def served(self):
        """The desired pods the reconciler acts on: pending entries completed by their CNI
        ADD's binding (a binding whose netns is gone is dropped first)."""
        self.bindings.prune()
        return source.complete(self.desired, self.bindings.data)[0]

    def _waiting_for_cni(self):
        return [{"id": p.id, "name": p.name, "source": p.source, "state": "pending",
                 "mode": None, "last_error": None, "waiting_for": "its CNI ADD"}
                for p in source.complete(self.desired, self.bindings.data)[1]]

    # ---- the loop ----------------------------------------------------------------------------
    @_locked
    def sync(self, ids=None, check_drift=False, write=False):
        """One pass over `ids` (None: every pod); agent.json is written when a pod's state
        changed, the pass was a full one or `write`. A pass that fails as a whole (not one
        pod) is logged and retried in a second rather than ending the agent."""
        if self.desired is not None:
            try:
                due = self.reconciler.run(self.served(), self.entry_errors,
                                          check_drift=check_drift, ids=ids)
            except Exception as e:  # noqa: BLE001 - the loop outlives one bad pass
                log.exception("reconcile failed: %s", e, extra={"action": "reconcile",
                                                                  "error": str(e)})
                return 1.0
        else:
            due = None
        if ids is None or write or self.reconciler.dirty:
            self.reconciler.dirty = False
            self.write_state()
        return due

    @_locked
    def sync_changed(self):
        """A pass over what changed since the last pass over each pod (and pods whose
        backoff is over)."""
        if self.desired is None:
            self.write_state()          # e.g. the file's problem is reported
            return None
        # written also when no pod's state changed: entries pending their CNI ADD show
        return self.sync(self.reconciler.changed(self.served()), write=True)

    @_locked
    def drift_ids(self):
        """Every pod one drift check covers (also looks again for pods not found on the
        node)."""
        self.merge()
        return self.reconciler.drift_ids(self.served() if self.desired is not None else {})

    @_locked
    def reconcile(self, check_drift):
        """A full pass over every pod (with drift checks: a full reconcile, after which
        the agent is ready, once every source has said what it wants)."""
        due = self.sync(None, check_drift=check_drift)
        if check_drift and not self.ready and (self.desired is not None or not self.sources):
            self.ready = True
            if self.metrics is not None:
                self.metrics.set_ready(True)
        return due

    @_locked
    def _drift_checked(self):
        """A drift check went over every pod: its time is one full reconcile's."""
        if self.metrics is not None:
            self.metrics.reconcile_done(self.reconciler.busy, self.reconciler.pods_by_state())
        self.reconciler.dirty = False
        self.write_state()

    def start(self):
        """Probe, adopt what an earlier agent left, first full reconcile."""
        report = self.svc.probe()
        self.mode, reason = self.svc.choose_mode()
        log.info("kernel probed: %s mode (%s)", self.mode, reason,
                 extra={"action": "probe", "mode": self.mode})
        if self.metrics is not None:
            self.metrics.set_features(report)
            self.metrics.set_mode(self.mode)
        self.reconciler.owned = self._read_owned()
        self.bindings.load()
        if self.mode == "ebpf":
            # Load (or upgrade) the node programs now, not with the first pod: compiling
            # them takes seconds, and a new pod is to be intercepted within 100 ms. The
            # compiling happens in a child, so bcc's LLVM (over 100 MB) never stays in the
            # agent, which then only adopts the pins.
            ebpf = self.svc.backend("ebpf")
            from ..ebpf import upgrade
            if not upgrade.is_current(self.svc.pin_prefix, ebpf.features, ebpf.splice):
                up = load_in_child(self.svc)
                if up:
                    log.info("node programs upgraded in place from version %s to %s (%d "
                             "replaced)", up["from"], up["to"], up["replaced"],
                             extra={"action": "upgrade"})
            with self.svc.store.locked():
                self.svc.backend("ebpf").adopt()
        # After the programs are this code's: adopting the records adopts the pins too,
        # and with pins of another version that would compile here, in the agent.
        if self.svc.store.ids():
            adopted = self.svc.adopt()
            log.info("adopted %d pod record(s) (%d stale)", len(adopted["pods"]),
                     len(adopted["stale"]), extra={"action": "adopt"})
        if self.pods_file is not None:
            self.load()
        self.merge()
        return self.reconcile(check_drift=True)

    def run(self):
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd)
        stop = []
        handlers = {s: signal.signal(s, lambda signum, _f: stop.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
        w = watch(self.pods_file) if self.pods_file is not None else _NoWatch()
        for s in self.sources:
            s.start()
        try:
            due_at = _at(self.start())
            if self.cni_socket:
                self.cni = cniserver.Server(self.cni_socket, cniserver.Handler(self)).start()
            if self.mode == "ebpf":
                # after ready and after the CNI socket listens: neither waits for it
                _warm_attach_path()
            next_resync = time.monotonic() + self.resync
            cycle = []                  # pods the running drift check has still to look at
            while not stop:
                if cycle:
                    timeout = 0.0       # only a look at the file between two slices
                else:
                    wake = min(next_resync, due_at if due_at is not None else next_resync)
                    timeout = wake - time.monotonic()
                if w.fileno() is None:
                    timeout = min(timeout, w.interval)
                fds = [rfd] + ([w.fileno()] if w.fileno() is not None else []) + \
                    [s.fileno() for s in self.sources]
                ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
                if rfd in ready:
                    with _suppress_again():
                        os.read(rfd, 512)
                if stop:
                    break
                file_changed = w.changed() if (w.fileno() is None or w.fileno() in ready) \
                    else False
                if file_changed:
                    if not self.load():
                        self.write_state()          # the file's problem is reported
                if [s for s in self.sources if s.fileno() in ready and s.changed()]:
                    self.merge()
                    file_changed = True
                now = time.monotonic()
                if not self.ready and file_changed:
                    self.merge()          # every source has said: the first full reconcile
                    due_at = _at(self.reconcile(check_drift=True))
                elif file_changed or (due_at is not None and now >= due_at):
                    due_at = _at(self.sync_changed())
                if not cycle and now >= next_resync:
                    cycle = self.drift_ids()
                    self.reconciler.busy = 0.0
                if cycle:
                    chunk, cycle = cycle[:DRIFT_CHUNK], cycle[DRIFT_CHUNK:]
                    due_at = _at(self.sync(chunk, check_drift=True))
                if not cycle and now >= next_resync:
                    if not self.ready:
                        self.reconcile(check_drift=True)
                    self._drift_checked()
                    next_resync = time.monotonic() + self.resync
            log.info("stopping on %s", signal.Signals(stop[0]).name, extra={"action": "stop"})
        finally:
            if self.cni is not None:
                self.cni.stop()
            w.close()
            for s in self.sources:
                s.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
        self.stop()

    @_locked
    def stop(self):
        if self.cleanup_on_exit:
            log.info("--cleanup-on-exit: removing every pod's interception",
                     extra={"action": "cleanup"})
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                pass
            self.bindings.remove_file()
            self.svc.cleanup()
            return
        log.info("interception stays in place for %d pod(s)", len(self.reconciler.owned),
                 extra={"action": "stop"})
        self.write_state(running=False)


def _warm_attach_path():
    """Import what attaching a pod needs (netlink, the inbound modules) at start, not on
    the first new pod's clock: a fresh agent's first attach took about 90 ms more than
    the next ones."""
    from pyroute2 import IPRoute
    from ..ebpf.inbound import attach  # noqa: F401
    with IPRoute():             # its first use loads the rest (a socket in our netns only)
        pass


class _NoWatch:
    """No pods file: nothing to watch."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_CLOEXEC)       # never written: select() waits on

    def fileno(self):
        return self.r

    def changed(self):
        return False

    def close(self):
        os.close(self.r)
        os.close(self.w)


def _at(delay):
    return None if delay is None else time.monotonic() + delay


class _suppress_again:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, OSError) and \
            getattr(exc, "errno", None) == errno.EAGAIN
