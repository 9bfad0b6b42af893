"""The Kubernetes pod source: this node's pods from the API server, as the agent's desired
state (meshbpf.agent.source.DesiredPod: id = the pod's UID, name = "namespace/name",
source = "kubernetes").

The official `kubernetes` client lists, then watches, only this node's pods (field selector
spec.nodeName), in its own thread:
- a watch that ends (its timeout, a dropped connection) is resumed from the last
  resourceVersion seen, events and bookmarks alike, so nothing is missed or listed again;
- 410 Gone (that version was compacted away) lists again, and the list replaces what was
  known (a pod deleted meanwhile goes);
- any other failure (API server down, 500s, a broken stream) retries after a backoff,
  doubling from `backoff_first` to `backoff_max`, each wait jittered (half to all of it) so a
  node fleet does not retry in step;
- every change of what is known wakes the daemon through a pipe (`fileno()` for select()).

Which pods are acted on is decided on the daemon's side, from the pods as last known
(`desired()`): `assess()` (pure) never serves a half-known pod (no uid, not scheduled yet,
no container started yet) and drops a pod that is being deleted or has finished, so the
agent detaches it; the mesh's own rules (`classify`) say whether and how a pod is meshed;
`find_pod` finds its netns and cgroup on this node.

A meshed pod whose netns is not there yet (no container started, or find_pod says its cgroup
has no process or is not made yet) is a *pending* DesiredPod (no netns): the runtime's CNI
ADD (meshbpf.agent.cniserver) completes it with the netns it made, before any container of
the pod starts. Every pod of this source is `by_cni`: once an ADD has bound its UID, the
binding says where it is, so the watch's later event (containers started, the pod now found
through /proc) changes nothing, and after its DEL it is not served again from /proc.

An ADD can come before the watch has delivered its pod: `lookup()` then GETs that one pod
from the API (short timeout) and keeps it (`fetched`) until the watch has caught up with it;
an API that cannot answer makes the ADD fail, so the runtime retries.
"""

import dataclasses
import json
import logging
import os
import random
import threading
import time

from ..agent.source import DesiredPod, EntryError
from ..errors import MeshbpfError, PodNotFoundError, PodNotRunningError, UsageError
from ..state import valid_pod_id

log = logging.getLogger("meshbpf.agent.kube")

SOURCE = "kubernetes"
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
WATCH_TIMEOUT = 300          # seconds a watch asks the server to stay open
HTTP_GONE = 410
HTTP_NOT_FOUND = 404
GET_TIMEOUT = (3, 5)         # (connect, read) seconds of a CNI ADD's GET of its pod


# ---- pure: one pod object, what to do with it ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    kind: str            # serve | pending (no netns yet) | wait (half-known) | drop (not
    #                      meshed, left alone, going)
    reason: str
    meshing: object = None


def pod_name(pod):
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}"


def assess(pod, classify):
    """What to do with `pod` (an API object as JSON). Pure, given a pure `classify`."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    status = pod.get("status") or {}
    if not meta.get("uid"):
        return Verdict("wait", "no uid yet")
    if meta.get("deletionTimestamp"):
        return Verdict("drop", "being deleted")
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return Verdict("drop", f"finished ({phase})")
    if not spec.get("nodeName"):
        return Verdict("wait", "not scheduled yet")
    meshing = classify(pod)
    if meshing.left_alone:
        return Verdict("drop", f"left alone: {meshing.reason}", meshing)
    if not meshing.meshed:
        return Verdict("drop", f"not meshed: {meshing.reason}", meshing)
    # The pod's sandbox (and so its netns) exists once kubelet reports a container of it;
    # before that it is pending: its CNI ADD says where its netns is.
    if not status.get("containerStatuses") and not status.get("initContainerStatuses"):
        return Verdict("pending", f"{phase or 'Pending'}: no container started yet", meshing)
    return Verdict("serve", "meshed", meshing)


def desired_pod(pod, meshing, netns, cgroup):
    """The DesiredPod of a served pod."""
    from ..config import InterceptConfig
    cfg = meshing.config
    if cfg is None:
        cfg = InterceptConfig()
    elif isinstance(cfg, dict):
        cfg = InterceptConfig.from_dict(cfg)
    return DesiredPod(id=pod["metadata"]["uid"], name=pod_name(pod), netns=netns,
                      cgroup=cgroup, config=cfg, source=SOURCE, by_cni=True)


def desired_state(pods, classify, locate):
    """(pods {id: DesiredPod}, [EntryError], {name: why waiting or left alone}) from the
    pods as last known. `locate(uid) -> (netns, cgroup)` raises MeshbpfError (or returns
    None) while the pod is not found on this node. A meshed pod with no container started,
    or whose cgroup has no process (PodNotRunningError) or is not made yet
    (PodNotFoundError), is pending (no netns): its CNI ADD says where it is."""
    out, errors, waiting = {}, [], {}
    for pod in pods:
        name = pod_name(pod)
        uid = (pod.get("metadata") or {}).get("uid")
        try:
            v = assess(pod, classify)
        except Exception as e:  # noqa: BLE001 - one bad object must not stop the others
            errors.append(EntryError(-1, name, uid, f"cannot classify: {e}", source=SOURCE))
            continue
        if v.kind == "wait" or (v.kind == "drop" and v.meshing is not None
                                and v.meshing.left_alone):
            waiting[name] = v.reason
        if v.kind not in ("serve", "pending"):
            continue
        if not valid_pod_id(uid):
            errors.append(EntryError(-1, name, uid, f"uid {uid!r} is not usable as a pod id",
                                     source=SOURCE))
            continue
        found, why = None, "not found on this node"
        if v.kind == "serve":
            try:
                found = locate(uid)
            except (PodNotFoundError, PodNotRunningError) as e:
                v = Verdict("pending", str(e), v.meshing)
            except MeshbpfError as e:
                why = str(e)
        if v.kind == "pending":
            found = (None, None)
            waiting[name] = f"pending: its CNI ADD says where it is ({v.reason})"
        elif not found:
            waiting[name] = f"waiting for its netns and cgroup: {why}"
            continue
        try:
            out[uid] = desired_pod(pod, v.meshing, *found)
        except (MeshbpfError, TypeError) as e:
            errors.append(EntryError(-1, name, uid, f"config: {e}", source=SOURCE))
    return out, errors, waiting


def backoff_delay(failures, first=BACKOFF_FIRST, cap=BACKOFF_MAX, rng=random.random):
    """Seconds to wait after the `failures`-th failure in a row: doubling from `first` to
    `cap`, then jittered to between half and all of it."""
    d = min(cap, first * 2 ** max(0, failures - 1))
    return d / 2 + rng() * d / 2


# ---- the client side ---------------------------------------------------------------------------

def api_client(kubeconfig=None):
    """A kubernetes ApiClient: from `kubeconfig`, else in-cluster (the pod's service
    account), else $KUBECONFIG or ~/.kube/config. UsageError when none works."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise UsageError("the kubernetes Python client is not installed",
                         hint="pip install kubernetes")
    try:
        if kubeconfig:
            if not os.path.exists(kubeconfig):
                raise UsageError(f"kubeconfig {kubeconfig} does not exist")
            return config.new_client_from_config(config_file=kubeconfig)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        default = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        if not os.path.exists(default.split(os.pathsep)[0]):
            raise UsageError("no Kubernetes API to talk to: not in a cluster "
                             "(KUBERNETES_SERVICE_HOST unset) and no kubeconfig",
                             hint="give --kubeconfig PATH")
        return config.new_client_from_config(config_file=default.split(os.pathsep)[0])
    except ConfigException as e:
        raise UsageError(f"Kubernetes client configuration: {e}")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"cannot read the kubeconfig: {e}")


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubeSource:
    """This node's pods from the API server (see the module's docstring)."""

    name = SOURCE
    interval = None              # woken through fileno(), nothing to poll

    def __init__(self, node_name, api=None, kubeconfig=None, classify=None, find_pod=None,
                 cgroup_root=None, backoff_first=BACKOFF_FIRST, backoff_max=BACKOFF_MAX,
                 watch_timeout=WATCH_TIMEOUT, rng=random.random):
        if not node_name:
            raise UsageError("the Kubernetes source needs this node's name",
                             hint="--node-name NAME, or NODE_NAME set from the downward API "
                                  "(fieldRef spec.nodeName)")
        self.node_name = node_name
        self._api_client = api if api is not None else api_client(kubeconfig)
        self.classify = classify or _default_classify()
        self._find_pod = find_pod or _default_find_pod()
        self.cgroup_root = cgroup_root
        self.backoff_first, self.backoff_max = backoff_first, backoff_max
        self.watch_timeout, self.rng = watch_timeout, rng
        self.selector = f"spec.nodeName={node_name}"
        self.lock = threading.Lock()
        self.pods = {}                # "namespace/name" -> pod object
        self.synced = False           # listed at least once
        self.resource_version = None  # where the next watch resumes; None: list first
        self.last_error = None
        self.failures = 0
        self.lists = 0
        self.waiting = {}             # name -> why it is not served yet (the last desired())
        self._located = {}            # uid -> (netns, cgroup) found before
        self.fetched = {}             # "namespace/name" -> pod GET for a CNI ADD, until the
        #                               watch has caught up with it
        self.get_timeout = GET_TIMEOUT
        self._stop = threading.Event()
        self._watch = None
        self._thread = None
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---- the daemon's side -----------------------------------------------------------------
    def fileno(self):
        return self.rfd

    def changed(self):
        """Drain the wake-up pipe: did anything change since the last call?"""
        hit = False
        while True:
            try:
                if not os.read(self.rfd, 4096):
                    return hit
                hit = True
            except BlockingIOError:
                return hit

    def desired(self):
        """(pods {id: DesiredPod}, [EntryError]) from the pods as last known, or None
        before the first list."""
        with self.lock:
            if not self.synced:
                return None
            pods = list(self.pods.values()) + [
                p for n, p in self.fetched.items()
                if _uid(self.pods.get(n)) != _uid(p)]
        out, errors, self.waiting = desired_state(pods, self.classify, self._locate)
        for uid in set(self._located) - set(out):
            del self._located[uid]
        return out, errors

    def lookup(self, namespace, name, uid=None):
        """The DesiredPod of the pod a CNI ADD names ("namespace/name", and its UID when
        given), or None if it is not meshed here. A pod the watch has not delivered yet is
        fetched from the API (one GET) and kept until the watch has it; MeshbpfError when
        the API cannot say (the ADD fails, the runtime retries)."""
        key = f"{namespace}/{name}"
        with self.lock:
            obj = self.pods.get(key)
            if obj is None or (uid and _uid(obj) != uid):
                obj = self.fetched.get(key)
        got = obj is None or (uid and _uid(obj) != uid)
        if got:
            obj = self._get(namespace, name)
            if obj is None or (uid and _uid(obj) != uid):
                return None          # no such pod (any more): not meshed
            if (obj.get("spec") or {}).get("nodeName") != self.node_name:
                return None
        out, _errors, _waiting = desired_state([obj], self.classify, self._locate)
        want = out.get(_uid(obj))
        if got and want is not None:
            with self.lock:
                if _uid(self.pods.get(key)) != _uid(obj):
                    self.fetched[key] = obj
            log.info("%s: CNI ADD before its watch event: got it from the API", key,
                     extra={"pod": key, "pod_id": want.id, "action": "get"})
        return want

    def _get(self, namespace, name):
        """The pod object from the API, or None (404); MeshbpfError if it cannot say."""
        from kubernetes.client.exceptions import ApiException
        key = f"{namespace}/{name}"
        try:
            resp = self._core().read_namespaced_pod(name, namespace, _preload_content=False,
                                                    _request_timeout=self.get_timeout)
            return json.loads(resp.data)
        except ApiException as e:
            if e.status == HTTP_NOT_FOUND:
                return None
            raise MeshbpfError(f"cannot get pod {key} from the Kubernetes API: "
                               f"{e.status} {e.reason}")
        except Exception as e:  # noqa: BLE001 - unreachable, timed out, not JSON: cannot say
            raise MeshbpfError(f"cannot get pod {key} from the Kubernetes API: "
                               f"{type(e).__name__}: {_one_line(e)}")

    def _caught_up(self, rv, names=()):
        """Forget fetched pods the watch now knows: named by an event, or older than the
        resourceVersion it has reached (etcd's revisions are numbers; if not, a list)."""
        for n in list(self.fetched):
            mine = (self.fetched[n].get("metadata") or {}).get("resourceVersion")
            if n in names or (rv is not None and _not_newer(mine, rv)):
                del self.fetched[n]

    def _locate(self, uid):
        hit = self._located.get(uid)
        if hit and os.path.exists(hit[0]):
            return hit
        if self.cgroup_root is not None:
            found = self._find_pod(uid, cgroup_root=self.cgroup_root)
        else:
            found = self._find_pod(uid)
        if found:
            self._located[uid] = tuple(found)
        return found

    def report(self):
        with self.lock:
            return {"name": SOURCE, "node": self.node_name, "synced": self.synced,
                    "resource_version": self.resource_version, "pods_seen": len(self.pods),
                    "error": self.last_error, "waiting": dict(sorted(self.waiting.items()))}

    def start(self):
        self._thread = threading.Thread(target=self._run, name="kube-source", daemon=True)
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- the thread --------------------------------------------------------------------------
    def _wake(self):
        try:
            os.write(self.wfd, b"k")
        except (BlockingIOError, OSError):
            pass          # a full pipe wakes the daemon anyway

    def _run(self):
        from kubernetes.client.exceptions import ApiException
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                got = self._watch_once()
                if got:
                    self._ok()
                else:
                    # a watch that ends at once with nothing is a failing server, not a
                    # timeout: do not spin on it
                    self._failed("the watch ended without an event")
            except Gone as e:
                log.info("watch from resourceVersion %s: %s; listing again",
                         self.resource_version, e, extra={"action": "relist"})
                self.resource_version = None
            except ApiException as e:
                if e.status == HTTP_GONE:
                    log.info("resourceVersion %s is gone (410); listing again",
                             self.resource_version, extra={"action": "relist"})
                    self.resource_version = None
                    continue
                self._failed(f"API server: {e.status} {e.reason}")
            except Exception as e:  # noqa: BLE001 - the source outlives any one failure
                if self._stop.is_set():
                    break
                self._failed(f"{type(e).__name__}: {_one_line(e)}")

    def _ok(self):
        if self.failures or self.last_error:
            log.info("Kubernetes API reachable again", extra={"action": "watch"})
        self.failures, self.last_error = 0, None

    def _failed(self, msg):
        self.failures += 1
        self.last_error = msg
        delay = backoff_delay(self.failures, self.backoff_first, self.backoff_max, self.rng)
        log.warning("Kubernetes source: %s; retrying in %.1fs", msg, delay,
                    extra={"action": "watch", "error": msg})
        self._stop.wait(delay)

    def _core(self):
        from kubernetes import client
        return client.CoreV1Api(self._api_client)

    def _list(self):
        resp = self._core().list_pod_for_all_namespaces(
            field_selector=self.selector, _preload_content=False, _request_timeout=30)
        doc = json.loads(resp.data)
        pods = {pod_name(p): p for p in doc.get("items") or []}
        with self.lock:
            self.pods = pods
            self.synced = True
            self.resource_version = (doc.get("metadata") or {}).get("resourceVersion")
            self.lists += 1
            self._caught_up(self.resource_version)
        self._ok()
        log.info("listed %d pod(s) on node %s at resourceVersion %s", len(pods),
                 self.node_name, self.resource_version, extra={"action": "list"})
        self._wake()

    def _watch_once(self):
        """One watch from self.resource_version until it ends; how many events it gave."""
        from kubernetes import watch
        w = watch.Watch(return_type="object")     # raw dicts: no model round trip
        self._watch = w
        started, n = time.monotonic(), 0
        try:
            for ev in w.stream(self._core().list_pod_for_all_namespaces,
                               field_selector=self.selector,
                               resource_version=self.resource_version,
                               timeout_seconds=self.watch_timeout,
                               allow_watch_bookmarks=True,
                               _request_timeout=(10, self.watch_timeout + 30)):
                if self._stop.is_set():
                    break
                n += 1
                self._event(ev.get("type"), ev.get("raw_object") or {})
        finally:
            self._watch = None
            w.stop()
        return n or time.monotonic() - started >= 1.0

    def _event(self, kind, obj):
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":
            if obj.get("code") == HTTP_GONE:
                raise Gone(obj.get("message") or "gone")
            raise MeshbpfError(f"watch error: {obj.get('code')} {obj.get('message')}")
        name = pod_name(obj)
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.pods[name] = obj
            else:
                return
            if rv:
                self.resource_version = rv
            self._caught_up(rv, (name,))
        log.debug("%s %s at %s", kind, name, rv)
        self._wake()


def _uid(pod):
    return ((pod or {}).get("metadata") or {}).get("uid")


def _not_newer(mine, rv):
    """Is resourceVersion `mine` at or below `rv`? True when either is not a number."""
    try:
        return int(mine) <= int(rv)
    except (TypeError, ValueError):
        return True


def _default_classify():
    def classify(pod):
        from .mesh import classify as real
        return real(pod)
    return classify


def _default_find_pod():
    def find_pod(uid, **kw):
        from .locate import find_pod as real
        return real(uid, **kw)
    return find_pod


def _one_line(e):
    return " ".join(str(e).split())[:300]
