"""Every node-wide operation, for every caller: the CLI, the node agent, the CNI plugin
and the benchmark call these and nothing below them.

`NodeService` probes the kernel once (cached in the process and, per boot and kernel,
on the node), picks a mode, takes the one lock that serialises every writer of a pin
prefix, loads the pod's record, calls the backend (meshbpf.backends) and saves the
record once. Records are keyed by a stable pod id (meshbpf.pod.Pod.pod_id); the netns
cookie is the kernel's key.

`--mode auto` takes eBPF where the probe allows it and iptables otherwise, and says
why. If eBPF was chosen automatically but attaching fails for a pod at run time, that
pod falls back to iptables instead of being left unintercepted, and the record says so.
A forced mode never falls back: its failure is the answer.
"""

import contextlib
import logging
import os
import time

from . import __version__, backends
from .errors import MeshbpfError, NotFoundError, UsageError
from .interceptor import DEFAULT_PIN_PREFIX
from .state import IndexAllocator, StateStore, valid_pod_id

log = logging.getLogger(__name__)

MODES = backends.MODES
_PROBES = {}          # this process's probe results, by assumed kernel


def _probe_key(assume_kernel):
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{__version__}|{os.uname().release}|{boot}|{assume_kernel or ''}"


class OpContext:
    """What a backend may ask of the node during one operation: phase timings, the pod
    index allocator, and whether the pod owning a netns cookie still lives."""

    def __init__(self, store, pod_id):
        self.store, self.pod_id = store, pod_id
        self.timings = {}
        self.indexes = IndexAllocator(store)
        self.iface_ids = IndexAllocator(store, name="ifaces")

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def owner_alive(self, cookie):
        """Is the pod with netns cookie `cookie` still there? Only a pod with a record whose
        netns still exists with that cookie is; a pod whose netns is gone (deleted without
        a detach) is not, and its addresses may be taken over."""
        from . import system
        pod_id = self.store.id_of_cookie(cookie)
        rec = self.store.load(pod_id) if pod_id else None
        netns = (rec or {}).get("netns")
        if not netns or not os.path.exists(netns):
            return False
        try:
            return system.netns_cookie(netns) == cookie
        except (MeshbpfError, OSError):
            return False

    def name_of_cookie(self, cookie):
        pod_id = self.store.id_of_cookie(cookie)
        rec = self.store.load(pod_id) if pod_id else None
        return (rec or {}).get("name") or cookie


class NodeService:
    """The node's interception, one pin prefix (instance) of it.

    Options go to the backends that take them (meshbpf.backends.OPTIONS): splice,
    iptables_binary, reconcile, ipv6_auto, pod_conn_limit, ...
    """

    def __init__(self, pin_prefix=DEFAULT_PIN_PREFIX, cgroup_root=None, mode="auto",
                 assume_kernel=None, **options):
        if mode not in MODES + ("auto",):
            raise UsageError(f"unknown mode {mode!r}", hint="use auto, ebpf or iptables")
        self.pin_prefix, self.cgroup_root, self.mode = pin_prefix, cgroup_root, mode
        self.assume_kernel = assume_kernel
        self.options = options
        self.store = StateStore(pin_prefix)
        self._backends = {}

    # ---- probe and mode -------------------------------------------------------------
    def probe(self, refresh=False):
        """The kernel probe report, run once per process and once per boot on the node."""
        key = _probe_key(self.assume_kernel)
        if not refresh and key in _PROBES:
            return _PROBES[key]
        result = None if refresh else self.store.cached_probe(key)
        if result is None:
            from . import probe
            result = probe.probe(assume_kernel=self.assume_kernel)
            with contextlib.suppress(OSError):
                self.store.cache_probe(key, result)
        _PROBES[key] = result
        return result

    def choose_mode(self):
        """(mode, reason) for this service's mode (auto|ebpf|iptables)."""
        if self.mode in MODES:
            return self.mode, f"{self.mode} mode requested by the operator"
        result = self.probe()
        return result["mode"], result["reason"]

    def backend(self, mode):
        if mode not in self._backends:
            opts = dict(self.options)
            if mode == "ebpf" and self.mode == "auto" and "features" not in opts:
                opts["features"] = _PROBES.get(_probe_key(self.assume_kernel))
            self._backends[mode] = backends.backend(mode, pin_prefix=self.pin_prefix,
                                                    cgroup_root=self.cgroup_root, **opts)
        return self._backends[mode]

    # ---- pods -----------------------------------------------------------------------
    def attach(self, pod, config, pod_id=None):
        """Intercept `pod` per `config`; returns its record (with "id", "mode", "reason",
        "fallback" and "timings": seconds per phase). Attaching an attached pod again
        replaces its config without a window (see update)."""
        from .config import InterceptConfig
        if not isinstance(config, InterceptConfig):
            raise UsageError("attach needs an InterceptConfig")
        config.validate()
        pod_id = pod_id or pod.pod_id
        if not valid_pod_id(pod_id):
            raise UsageError(f"pod id {pod_id!r} is not usable: letters, digits and ._:@- only")
        t0 = time.perf_counter()
        with self.store.locked():
            return self._attach(pod, config, pod_id, t0)

    def _attach(self, pod, config, pod_id, t0):
        previous = self.store.load(pod_id)
        cookie = _cookie(pod)
        other = self.store.id_of_cookie(cookie) if cookie is not None else None
        if other is not None and other != pod_id:
            raise UsageError(f"pod {pod.name}: its network namespace is already attached as "
                             f"pod id {other}", hint=f"detach {other} first, or use that id")
        ctx = OpContext(self.store, pod_id)
        if previous and previous.get("netns_cookie") not in (None, cookie):
            # The pod's netns was recreated (a sandbox restart): the old one's entries go.
            self._detach_record(previous, None, ctx)
            previous = None
        mode, reason = (previous["mode"], previous.get("reason")) \
            if previous and self.mode == "auto" else self.choose_mode()
        if previous and previous.get("mode") != mode:
            self._detach_record(previous, pod, ctx)
            previous = None
        fallback = None
        try:
            body = self.backend(mode).attach(pod, config, previous=previous, ctx=ctx)
        except MeshbpfError as e:
            if self.mode != "auto" or mode != "ebpf" or getattr(e, "no_fallback", False):
                raise
            fallback = f"eBPF attach failed ({e}); fell back to iptables"
            log.warning("%s: %s", pod.name, fallback)
            mode, reason = "iptables", fallback
            body = self.backend("iptables").attach(pod, config, previous=None, ctx=ctx)
        record = dict(body, id=pod_id, name=pod.name, netns=pod.netns, cgroup=pod.cgroup,
                      netns_cookie=cookie, mode=mode, reason=reason,
                      fallback=fallback, **_host_fields(pod))
        with ctx.phase("records"):
            record = self.store.save(pod_id, dict(record, timings=None))
        ctx.timings["total"] = time.perf_counter() - t0
        record["timings"] = dict(ctx.timings)
        return record

    def update(self, pod_id, config):
        """Re-configure attached pod `pod_id`: its new rules replace the old ones in one
        step (never both, never neither)."""
        from .pod import Pod
        rec = self.store.load(pod_id)
        if rec is None:
            raise NotFoundError(f"no attached pod with id {pod_id!r}")
        pod = Pod(netns=rec["netns"], cgroup=rec.get("cgroup"), name=rec.get("name"), id=pod_id,
                  host=bool(rec.get("host")), inbound_interfaces=rec.get("inbound_interfaces"))
        saved, self.mode = self.mode, rec["mode"]
        try:
            return self.attach(pod, config, pod_id=pod_id)
        finally:
            self.mode = saved

    def detach(self, target):
        """Stop intercepting a pod named by its id (str) or a meshbpf.pod.Pod. A pod whose
        netns is gone is detached by id from its record. Returns {"id", "name",
        "was_attached", "mode"}."""
        with self.store.locked():
            pod, pod_id = (None, target) if isinstance(target, str) else (target, None)
            if pod is not None:
                pod_id = self._id_of(pod)
            rec = self.store.load(pod_id) if pod_id else None
            if rec is None or (self.mode in MODES and rec.get("mode") != self.mode):
                if pod is None:
                    return {"id": pod_id, "name": None, "was_attached": False, "mode": None}
                result = self._detach_unrecorded(pod)
                return {"id": pod_id, "name": pod.name, "was_attached": False, "mode": None,
                        "result": result}
            if pod is None and rec.get("netns") and os.path.exists(rec["netns"]):
                from .pod import Pod
                with contextlib.suppress(MeshbpfError):
                    live = Pod(netns=rec["netns"], name=rec.get("name"), id=pod_id,
                               host=bool(rec.get("host")),
                               inbound_interfaces=rec.get("inbound_interfaces"))
                    if live.netns_cookie == rec.get("netns_cookie"):
                        pod = live
            result = self._detach_record(rec, pod, OpContext(self.store, pod_id))
            return {"id": pod_id, "name": rec.get("name"), "was_attached": True,
                    "mode": rec.get("mode"), "result": result}

    def _id_of(self, pod):
        return pod.id or self.store.id_of_cookie(_cookie(pod)) or _safe_id(pod)

    def record_of(self, pod):
        """The record of `pod` (a meshbpf.pod.Pod), or None."""
        pod_id = self._id_of(pod)
        return self.store.load(pod_id) if pod_id else None

    def _detach_record(self, rec, pod, ctx):
        result = self.backend(rec["mode"]).detach(rec, pod=pod, ctx=ctx)
        self.store.remove(rec["id"])
        return result

    def _detach_unrecorded(self, pod):
        """A pod meshbpf has no record of (in this service's mode, if one is forced):
        remove what may have been left (rules an istio-init applied, or map entries under
        its netns cookie)."""
        result = None
        if self.mode in ("auto", "iptables"):
            result = self.backend("iptables").detach(None, pod=pod)
        if self.mode in ("auto", "ebpf") and os.path.isdir(self.pin_prefix):
            self.backend("ebpf").detach(None, pod=pod, ctx=OpContext(self.store, None))
        return result

    # ---- node -----------------------------------------------------------------------
    def _modes(self):
        """The modes status and cleanup cover: both, or the one this service is forced to."""
        return MODES if self.mode == "auto" else (self.mode,)

    def status(self):
        """Records of every pod (of this service's modes) with their live state, and each
        mode's node-wide facts: {"pin_prefix", "mode", "pods": [...], "counters": {...},
        "ebpf": {...}, "iptables": {...}}."""
        records = [r for r in self.store.all() if r.get("mode") in self._modes()]
        out = {"pin_prefix": self.pin_prefix, "mode": self.mode, "pods": [], "counters": {}}
        live = {}
        if "ebpf" in self._modes():
            mine = [r for r in records if r.get("mode") == "ebpf"]
            if os.path.isdir(self.pin_prefix) or mine:
                try:
                    out["ebpf"] = self.backend("ebpf").status(mine)
                    out["counters"] = out["ebpf"].get("counters", {})
                    live.update(out["ebpf"].pop("pods", {}))
                except (MeshbpfError, ImportError) as e:
                    out["ebpf"] = {"loaded": True, "error": str(e)}
            else:
                out["ebpf"] = {"loaded": False}
        ipt = [r for r in records if r.get("mode") == "iptables"]
        if ipt:
            out["iptables"] = self.backend("iptables").status(ipt)
            live.update(out["iptables"].pop("pods", {}))
        for rec in records:
            rec = {k: v for k, v in rec.items() if k not in ("keys", "builtin", "created_tables")}
            out["pods"].append(dict(rec, **live.get(rec["id"], {})))
        agent = self.agent_state()
        if agent is not None:
            out["agent"] = agent
        return out

    def agent_state(self):
        """What the node agent (meshbpf daemon) last wrote of its pods (agent.json), or None."""
        from .state import _read_json
        doc = _read_json(os.path.join(self.store.instance_dir, "agent.json"))
        return doc if isinstance(doc, dict) else None

    def cleanup(self):
        """Remove every program, pin, hook, rule and record of this pin prefix (of this
        service's mode, if it is forced to one)."""
        with self.store.locked():
            records = self.store.all()
            done = {"iptables_pods": 0, "ebpf": False}
            if "iptables" in self._modes():
                ipt = [r for r in records if r.get("mode") == "iptables"]
                self.backend("iptables").cleanup(ipt)
                done["iptables_pods"] = len(ipt)
                for r in ipt:
                    self.store.remove(r["id"])
            if "ebpf" in self._modes():
                mine = [r for r in records if r.get("mode") == "ebpf"]
                if os.path.isdir(self.pin_prefix) or mine:
                    self.backend("ebpf").cleanup(mine)
                    done["ebpf"] = True
                for r in mine:
                    self.store.remove(r["id"])
            if self.store.ids():
                return done            # another mode's pods stay, and the instance with them
            self.store.destroy()
            self.store.unlink_lock()
        self.store.remove_instance_dir()
        return done

    def adopt(self):
        """Take over what an earlier process left: the pinned node programs (without
        reloading them) and the records. Returns {"pods", "stale"}: stale pods are records
        whose netns is gone (detach them by id)."""
        with self.store.locked():
            records = self.store.all()
            if os.path.isdir(self.pin_prefix):
                self.backend("ebpf").adopt()
            stale = [r["id"] for r in records if not r.get("netns") or
                     not os.path.exists(r["netns"]) or _cookie_of(r["netns"]) != r.get("netns_cookie")]
            return {"pods": [r["id"] for r in records], "stale": stale}


def _cookie(pod):
    try:
        return pod.netns_cookie
    except MeshbpfError:
        return None


def _safe_id(pod):
    try:
        return pod.pod_id
    except MeshbpfError:
        return None


def _cookie_of(netns):
    from . import system
    try:
        return system.netns_cookie(netns)
    except (MeshbpfError, OSError):
        return None


def _host_fields(pod):
    """A host workload's record says so (detach, status and cleanup then allow its netns)."""
    fields = getattr(pod, "host_fields", None)
    return fields() if fields is not None else {}
