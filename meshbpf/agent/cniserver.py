"""The agent's side of meshbpf-cni: a Unix socket where the container runtime's CNI ADD
has a pod enrolled before any of its containers starts.

Protocol: one JSON object per connection, one JSON object back, then close.

    request: {"op": "add"|"del"|"check", "container_id", "netns", "ifname",
              "namespace", "name", "uid", "network"}        (as meshbpf.cni.plugin sends it)
    reply:   {"ok": true, "meshed": bool, "id", "mode", "message"}
             {"ok": false, "error": "why"}

The answer is given after the work is done: an ADD's reply comes once the pod's attach has
completed (or failed), so the runtime starts no container of a meshed pod before its
traffic is captured. Requests are served in their own threads but act one at a time under
the daemon's lock, the same one its reconcile loop holds.

What the runtime says of a pod (netns, container id, its cgroup found by pod UID) is a
"binding", kept under "namespace/name" in cni.json beside agent.json, so an agent restart
keeps every pod an ADD enrolled; a binding whose netns is gone (a DEL the agent missed) is
dropped and its pod detached. A binding is kept for every pod, meshed or not, so an entry
added to the pods file later is completed by it too.

What the server needs of the pod sources: the daemon's desired state (the union of its
sources) holds every pod meshed on this node, those not started yet as *pending*
DesiredPods (no pid, no netns) named "namespace/name"; `lookup(namespace, name, uid)` ->
DesiredPod or None answers from it (meshbpf.agent.source.lookup: by name, else by UID, the
Kubernetes source's pod id), and `source.complete` gives a pending pod the netns its ADD
bound. An ADD whose pod is not in the desired state asks each source that has a
`lookup(namespace, name, uid)` of its own (the Kubernetes source: a GET of a pod its watch
has not delivered yet); a MeshbpfError there fails the ADD with "retry" (the runtime tries
again), None is "not meshed" (success, nothing done). DEL and CHECK ask the desired state
only.

A `by_cni` pod (the Kubernetes source's) is enrolled and detached by its ADD and DEL even
when its source found it on the node itself; its DEL leaves a tombstone binding
({"deleted": true}, dropped with its netns) so the pod is not served again from what its
source finds while its sandbox is torn down.
"""

import contextlib
import json
import logging
import os
import socket
import stat
import threading

from ..errors import MeshbpfError, UsageError
from . import source

log = logging.getLogger("meshbpf.agent")

DEFAULT_SOCKET = "/run/meshbpf/cni.sock"
OPS = ("add", "del", "check")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0          # seconds a client has to send its request
CGROUP_SEARCH_DEPTH = 4


class ProtocolError(Exception):
    """A request this server cannot act on."""


def default_socket(pin_prefix, instance_dir):
    """The node's socket for the default pin prefix; for any other instance (a test's) one
    of its own, so two agents never share a socket."""
    from ..interceptor import DEFAULT_PIN_PREFIX
    if os.path.normpath(pin_prefix) == os.path.normpath(DEFAULT_PIN_PREFIX):
        return DEFAULT_SOCKET
    return os.path.join(instance_dir, "cni.sock")


# ---- pure -------------------------------------------------------------------------------

def validate(req):
    """The request as a dict of known fields; ProtocolError saying what is wrong."""
    if not isinstance(req, dict):
        raise ProtocolError("a request is a JSON object")
    op = req.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r} (add, del or check)")
    out = {"op": op}
    for key in ("container_id", "netns", "ifname", "namespace", "name", "uid", "network"):
        v = req.get(key)
        if v is not None and (not isinstance(v, str) or not v or "\0" in v):
            raise ProtocolError(f"{key!r} must be a non-empty string")
        out[key] = v
    if not out["container_id"]:
        raise ProtocolError('"container_id" is required')
    if op in ("add", "check"):
        if not out["netns"] or not out["netns"].startswith("/"):
            raise ProtocolError(f'{op} needs "netns", the absolute path of the pod\'s netns')
    for key in ("namespace", "name", "uid"):
        if out[key] is not None and ("/" in out[key] or len(out[key]) > 253):
            raise ProtocolError(f"{key!r} is not a Kubernetes {key}")
    return out


def identity(req):
    """"namespace/name" of the request's pod, or None."""
    return f"{req['namespace']}/{req['name']}" if req.get("namespace") and req.get("name") else None


def pod_cgroup_names(uid):
    """The directory names kubelet gives pod `uid`'s cgroup: cgroupfs (pod<uid>) and the
    systemd driver (kubepods-<qos>-pod<uid with _>.slice)."""
    return f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice"


# ---- side effects -----------------------------------------------------------------------

def pod_cgroup(uid, root, depth=CGROUP_SEARCH_DEPTH):
    """Pod `uid`'s cgroup under `root` (kubelet's pod<uid> level, which exists before any
    container of the pod runs), or None."""
    if not uid or not root or not os.path.isdir(root):
        return None
    plain, systemd = pod_cgroup_names(uid)
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                if e.name == plain or e.name.endswith(systemd):
                    return e.path
                nxt.append(e.path)
        level = nxt
    return None


class Bindings:
    """What the runtime's ADDs said, by "namespace/name": {"container_id", "netns",
    "ifname", "uid", "cgroup", "network"}; kept in `path` (atomic writes)."""

    def __init__(self, path):
        self.path, self.data = path, {}

    def load(self):
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            doc = {}
        self.data = {k: v for k, v in (doc.get("bindings") or {}).items()
                     if isinstance(v, dict)} if isinstance(doc, dict) else {}
        return self

    def save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"bindings": self.data}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def bind(self, key, binding):
        self.data[key] = binding
        self.save()

    def unbind(self, key):
        if self.data.pop(key, None) is not None:
            self.save()

    def of_container(self, container_id):
        for key, b in self.data.items():
            if b.get("container_id") == container_id:
                return key
        return None

    def prune(self):
        """Drop bindings whose netns is gone (their DEL was missed); returns their keys."""
        gone = [k for k, b in self.data.items() if not b.get("netns") or not os.path.exists(b["netns"])]
        for k in gone:
            del self.data[k]
        if gone:
            self.save()
        return gone

    def remove_file(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Handler:
    """Answers requests for a meshbpf.agent.daemon.Daemon (its lock, desired state,
    bindings, reconcile and service)."""

    def __init__(self, daemon, lookup=None):
        self.daemon = daemon
        # the one thing asked of the pod source (see the module's docstring)
        self.lookup = lookup or (lambda ns, name, uid: source.lookup(daemon.desired, ns, name, uid))

    def find(self, namespace, name, uid):
        """ADD's lookup: the desired state, else a source that can ask its authority (the
        desired state is then merged again, so it holds the pod). MeshbpfError: cannot say."""
        d = self.daemon
        want = self.lookup(namespace, name, uid)
        if want is not None and not (want.by_cni and uid and want.id != uid):
            return want
        # (a by_cni pod of that name with another UID is another pod: a StatefulSet's pod
        # recreated, or a static pod, whose runtime UID is not its mirror pod's)
        for s in getattr(d, "sources", ()):
            ask = getattr(s, "lookup", None)
            want = ask(namespace, name, uid) if ask is not None else None
            if want is not None:
                d.merge()
                return want
        return None

    def __call__(self, req):
        return {"add": self.add, "del": self.delete, "check": self.check}[req["op"]](req)

    def _root(self):
        from .. import system
        try:
            return getattr(self.daemon.svc, "cgroup_root", None) or system.cgroup2_mount()
        except MeshbpfError:
            return None

    def add(self, req):
        d, key = self.daemon, identity(req)
        if key is None:
            return {"ok": True, "meshed": False,
                    "message": "no namespace/name in the request: not meshed"}
        with d.lock:
            if d.desired is None:
                return {"ok": False, "error": "the agent has no usable pod source yet"
                        + (f" ({d.file_error})" if d.file_error else "")}
            try:
                want = self.find(req["namespace"], req["name"], req["uid"])
            except MeshbpfError as e:
                return {"ok": False, "retry": True, "error": f"{key}: {e}"}
            cgroup = want.cgroup if want is not None and want.cgroup else \
                pod_cgroup(req["uid"], self._root())
            old = d.bindings.data.get(key)
            if not (old and old.get("container_id") == req["container_id"]
                    and old.get("netns") == req["netns"] and not old.get("deleted")):
                # on disk before the attach: an agent killed half way finds the pod again.
                # A second network's ADD for the same sandbox (Multus) keeps the first binding:
                # the spec keys an attachment by (network, container id, interface).
                d.bindings.bind(key, {"container_id": req["container_id"], "netns": req["netns"],
                                      "ifname": req["ifname"], "uid": req["uid"],
                                      "cgroup": cgroup, "network": req["network"]})
            if want is None:
                return {"ok": True, "meshed": False, "message": f"{key} is not in the pod source"}
            if not want.cni_enrolled:
                rec = d.svc.store.load(want.id)
                return {"ok": True, "meshed": rec is not None, "id": want.id,
                        "message": f"{key}: its pods-file entry names its netns itself; "
                                   "nothing done for this ADD"}
            log.info("%s: CNI ADD (container %s, netns %s, cgroup %s)", want.name,
                     req["container_id"][:12], req["netns"], cgroup,
                     extra={"pod": want.name, "pod_id": want.id, "action": "cni-add"})
            d.reconcile(check_drift=False)
            st = d.reconciler.status.get(want.id, {})
            rec = d.svc.store.load(want.id)
            if st.get("state") == "attached" and rec is not None and rec.get("netns") == req["netns"]:
                return {"ok": True, "meshed": True, "id": want.id, "mode": rec.get("mode"),
                        "message": f"{key} enrolled in {rec.get('mode')} mode"}
            return {"ok": False, "error": f"{key}: enrolling failed: "
                    + (st.get("last_error") or f"state {st.get('state') or 'unknown'}")}

    def delete(self, req):
        d = self.daemon
        with d.lock:
            key = identity(req) or d.bindings.of_container(req["container_id"])
            b = d.bindings.data.get(key) if key else None
            if b is None or b.get("container_id") != req["container_id"] or b.get("deleted"):
                # never bound, already deleted, or a newer sandbox of the pod owns the name
                return {"ok": True, "meshed": False, "message": "nothing bound to this container"}
            if any(req[k] and b.get(k) and req[k] != b[k] for k in ("network", "ifname")):
                return {"ok": True, "meshed": False,
                        "message": "another attachment of this container (network, interface)"}
            d.bindings.unbind(key)
            ns, _, name = key.partition("/")
            want = self.lookup(ns, name, b.get("uid"))
            if want is None or not want.cni_enrolled:
                return {"ok": True, "meshed": False, "message": f"{key}: unbound"}
            if want.by_cni:
                # not served again from what its source finds while the sandbox goes
                d.bindings.bind(key, dict(b, deleted=True))
            d.reconcile(check_drift=False)
            if d.svc.store.load(want.id) is not None:
                # not owned by this agent (its agent.json was lost): the ADD made it, DEL undoes it
                d.svc.detach(want.id)
            log.info("%s: CNI DEL (container %s): detached", want.name, req["container_id"][:12],
                     extra={"pod": want.name, "pod_id": want.id, "action": "cni-del"})
            return {"ok": True, "meshed": False, "id": want.id, "message": f"{key} detached"}

    def check(self, req):
        from .. import system
        d, key = self.daemon, identity(req)
        with d.lock:
            want = self.lookup(req["namespace"], req["name"], req["uid"]) if key else None
            if want is None or not want.cni_enrolled:
                return {"ok": True, "meshed": False, "message": "not enrolled through CNI"}
            b = d.bindings.data.get(key)
            if b is None or b.get("container_id") != req["container_id"] or b.get("deleted"):
                return {"ok": False, "error": f"{key}: no ADD recorded for container "
                        f"{req['container_id'][:12]}"}
            rec = d.svc.store.load(want.id)
            if rec is None:
                st = d.reconciler.status.get(want.id, {})
                return {"ok": False, "error": f"{key} is not enrolled"
                        + (f": {st['last_error']}" if st.get("last_error") else "")}
            try:
                cookie = system.netns_cookie(req["netns"])
            except (MeshbpfError, OSError) as e:
                return {"ok": False, "error": f"{key}: cannot read its netns: {e}"}
            if rec.get("netns_cookie") != cookie:
                return {"ok": False, "error": f"{key}: enrolled for another network namespace"}
            return {"ok": True, "meshed": True, "id": want.id, "mode": rec.get("mode")}


class Server:
    """The listening socket and its threads."""

    def __init__(self, path, handler):
        self.path, self.handler = path, handler
        self.sock, self.thread, self._ino = None, None, None
        self._stopping = False

    def start(self):
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise UsageError(f"--cni-socket {self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise UsageError(f"another agent already serves the CNI socket {self.path}",
                                 hint="stop it, or give this agent another --cni-socket")
            except OSError:
                os.unlink(self.path)            # a dead agent's: nobody listens on it
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)               # root (the runtime) only, from the first moment
            try:
                s.bind(self.path)
            finally:
                os.umask(old)
            s.listen(128)
        except OSError as e:
            s.close()
            raise MeshbpfError(f"cannot serve the CNI socket {self.path}: {e.strerror or e}")
        self.sock, self._ino = s, os.stat(self.path).st_ino
        self.thread = threading.Thread(target=self._accept, name="cni-server", daemon=True)
        self.thread.start()
        log.info("serving CNI requests on %s", self.path, extra={"action": "cni"})
        return self

    def _accept(self):
        while not self._stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            threading.Thread(target=self._serve, args=(c,), name="cni-request", daemon=True).start()

    def _serve(self, c):
        with c:
            try:
                c.settimeout(REQUEST_TIMEOUT)
                data = b""
                while b"\n" not in data and len(data) <= MAX_REQUEST:
                    b = c.recv(65536)
                    if not b:
                        break
                    data += b
                reply = self.answer(data)
                c.settimeout(REQUEST_TIMEOUT)
                c.sendall((json.dumps(reply) + "\n").encode())
            except OSError as e:
                log.warning("CNI request: connection failed: %s", e, extra={"action": "cni"})

    def answer(self, data):
        """The reply to one request's bytes (never raises)."""
        if len(data) > MAX_REQUEST:
            return {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        try:
            req = validate(json.loads(data))
        except ValueError:
            return {"ok": False, "error": "the request is not JSON"}
        except ProtocolError as e:
            return {"ok": False, "error": str(e)}
        try:
            return self.handler(req)
        except Exception as e:  # noqa: BLE001 - the runtime gets an answer, the agent lives on
            log.exception("CNI %s failed: %s", req["op"], e, extra={"action": "cni-" + req["op"],
                                                                   "error": str(e)})
            return {"ok": False, "error": f"{req['op']} failed in the agent: {e}"}

    def stop(self):
        self._stopping = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
        if self.thread is not None:
            self.thread.join(5)
