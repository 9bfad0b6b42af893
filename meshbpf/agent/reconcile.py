"""Level-triggered reconciliation: from what is wanted (the source's pods) and what is
there (the records and the kernel) to the actions that close the gap.

`plan()` is pure: desired pods, records, the pods the agent owns and each pod's live
facts in, a list of Actions out. `Backoff` is pure too (time is passed in). `observe()`
reads the kernel (netns cookies, the pods map, the pods' tc filters, pins, iptables
chains) and `Reconciler` carries the actions out through NodeService, each pod on its
own: one pod's failure puts that pod in backoff and the others are still served.
"""

import dataclasses
import logging
import os
import time

from ..errors import MeshbpfError

log = logging.getLogger("meshbpf.agent")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str            # attach | update | repair | detach
    id: str
    reason: str


def plan(desired, records, owned=(), live=None):
    """The actions that make `records` match `desired`.

    desired: {id: source.DesiredPod}; records: {id: record}; owned: ids this agent manages
    (a record not desired is detached only if the agent owns it: a pod attached by hand
    with the CLI on the same pin prefix is left alone); live: {id: {"cookie": the netns
    cookie the pod has now, or None if unknown, "drift": [what is missing]}}.
    """
    live = live or {}
    actions = []
    for pod_id in sorted(desired):
        want, rec = desired[pod_id], records.get(pod_id)
        facts = live.get(pod_id, {})
        if rec is None:
            actions.append(Action("attach", pod_id, "new pod"))
            continue
        cookie = facts.get("cookie")
        if cookie is not None and rec.get("netns_cookie") not in (None, cookie):
            actions.append(Action("attach", pod_id, "its network namespace was recreated"))
        elif _spec_changed(want, rec):
            actions.append(Action("attach", pod_id, "its netns, cgroup or inbound interfaces changed"))
        elif not same_config(rec.get("config"), want.config_dict()):
            actions.append(Action("update", pod_id, "config changed"))
        elif facts.get("drift"):
            actions.append(Action("repair", pod_id, "drift: " + "; ".join(facts["drift"])))
    for pod_id in sorted(set(records) - set(desired)):
        if pod_id in owned:
            actions.append(Action("detach", pod_id, "removed from the pods file"))
    return actions


def same_config(applied, wanted):
    """Is the record's config (`applied`) what `wanted` gives? The backends capture IPv6 of
    a dual-stack pod even when the config leaves enable_ipv6 off (ipv6_auto, as the CLI
    does when --ipv6 is not given), and record the config they applied."""
    if applied == wanted:
        return True
    if isinstance(applied, dict) and applied.get("enable_ipv6") and not wanted.get("enable_ipv6"):
        return dict(wanted, enable_ipv6=applied["enable_ipv6"]) == applied
    return False


def _spec_changed(want, rec):
    """A pod named by netns whose record names another netns or cgroup (a pod named by pid
    is checked by its netns cookie instead: the pid's paths are /proc ones)."""
    if _host_spec(want.host, want.inbound_interfaces) != \
            _host_spec(rec.get("host"), rec.get("inbound_interfaces")):
        return True
    if want.netns is None:
        return False
    if rec.get("netns") != want.netns:
        return True
    return want.cgroup is not None and rec.get("cgroup") not in (
        want.cgroup, os.path.realpath(want.cgroup))


def _host_spec(host, interfaces):
    """A host workload's inbound interfaces as compared (None: not a host workload)."""
    if not host:
        return None
    return interfaces if interfaces == "*" else tuple(interfaces or ())


class Backoff:
    """Per-pod exponential backoff: first retry after `first` seconds, doubling to `cap`."""

    def __init__(self, first=BACKOFF_FIRST, cap=BACKOFF_MAX):
        self.first, self.cap = first, cap
        self._state = {}          # id -> (delay, not_before, key)

    def failed(self, pod_id, now, key=None):
        delay, _, old_key = self._state.get(pod_id, (None, 0, None))
        delay = self.first if delay is None or old_key != key else min(delay * 2, self.cap)
        self._state[pod_id] = (delay, now + delay, key)
        return delay

    def succeeded(self, pod_id):
        self._state.pop(pod_id, None)

    def waiting(self, pod_id, now, key=None):
        """Seconds until `pod_id` may be tried again (0: now). A changed `key` (what is
        wanted of the pod) ends the wait: the operator fixed something."""
        st = self._state.get(pod_id)
        if st is None:
            return 0.0
        if st[2] != key:
            return 0.0
        return max(0.0, st[1] - now)

    def due(self, now):
        """The pods whose wait is over."""
        return {i for i, st in self._state.items() if st[1] <= now}

    def next_due(self, now):
        due = [st[1] - now for st in self._state.values()]
        return max(0.0, min(due)) if due else None

    def forget(self, keep):
        for pod_id in list(self._state):
            if pod_id not in keep:
                del self._state[pod_id]


# ---- side effects ------------------------------------------------------------------------

def resolve(want):
    """The meshbpf.pod.Pod a desired pod names now (raises MeshbpfError if it is gone)."""
    from ..pod import Pod
    if want.pid is not None:
        pod = Pod.from_pid(want.pid, name=want.name, pod_id=want.id)
    else:
        pod = Pod.from_netns(want.netns, cgroup=want.cgroup, name=want.name, pod_id=want.id)
    if want.host:
        return _host_workload(want, pod)
    if _is_host_netns(pod.netns):
        from ..errors import UsageError
        raise UsageError(f"{pod.netns} is the host's network namespace; a host workload "
                         'needs "host": true')
    return pod


def _host_workload(want, pod):
    """A host entry as the backends attach it: the agent's own netns (the host's: pid 1's
    in production; in a test the netns the agent was started in), scoped by its cgroup."""
    from .. import system
    from ..errors import UsageError
    from ..pod import is_own_netns
    if not is_own_netns(pod.netns):
        raise UsageError(f'pod {want.name}: "host": true is for a workload in the agent\'s own '
                         f"network namespace (the host's), and {pod.netns} is another one",
                         hint='drop "host" for a pod with its own network namespace')
    if pod.cgroup is None or os.path.realpath(pod.cgroup) == os.path.realpath(system.cgroup2_mount()):
        raise UsageError(f"pod {want.name}: a host workload needs a cgroup of its own (e.g. "
                         "/sys/fs/cgroup/app.slice): the cgroup root holds every process of "
                         "the machine",
                         hint="run the workload in its own slice or service and name that cgroup")
    pod.host = True
    ifaces = want.inbound_interfaces
    pod.inbound_interfaces = ifaces if ifaces == "*" else list(ifaces)
    return pod


def _is_host_netns(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    for own in ("/proc/1/ns/net", "/proc/self/ns/net"):
        try:
            o = os.stat(own)
        except OSError:
            continue
        if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def observe(svc, records, pods):
    """{id: {"cookie", "drift"}} for recorded pods: what the kernel says of each.

    pods: {id: meshbpf.pod.Pod} resolved now. eBPF pods: pins loaded, the pods-map entry
    under the record's cookie, meshbpf's tc filter on every interface the record hooked
    (one visit of the pod's netns for its cookie and filters: meshbpf.agent.kernel).
    iptables pods: the ISTIO_* chains as the record's config makes them (the backend's
    verify).
    """
    out = {}
    ebpf = [r for r in records.values() if r.get("mode") == "ebpf"]
    ipt = [r for r in records.values() if r.get("mode") == "iptables"]
    for pod_id, rec in records.items():
        out[pod_id] = {"cookie": None, "drift": []}
        if rec.get("mode") != "ebpf" and pods.get(pod_id) is not None:
            out[pod_id]["cookie"] = _cookie(pods[pod_id])
    if ebpf:
        _observe_ebpf(svc, ebpf, pods, out)
    if ipt:
        try:
            st = svc.backend("iptables").status(ipt)["pods"]
        except (MeshbpfError, OSError) as e:
            st = {r["id"]: {"in_sync": None, "drift": [str(e)]} for r in ipt}
        for rec in ipt:
            live = st.get(rec["id"], {})
            if live.get("in_sync") is False:
                out[rec["id"]]["drift"].append("iptables rules: " + "; ".join(live.get("drift", [])))
    return out


def _observe_ebpf(svc, records, pods, out):
    from ..ebpf import loader, structs
    from ..ebpf.maps import Maps
    from . import kernel
    for rec in records:
        pod = pods.get(rec["id"])
        if pod is None:
            continue
        hooked = {i["index"]: i["name"] for i in
                  ((rec.get("inbound") or {}).get("interfaces") or [])
                  if i.get("hook") == "tc" and isinstance(i.get("index"), int)}
        if not hooked:
            out[rec["id"]]["cookie"] = _cookie(pod)
            continue
        try:
            cookie, ours = kernel.pod_facts(pod.netns, sorted(hooked))
        except (MeshbpfError, OSError) as e:
            out[rec["id"]]["cookie"] = _cookie(pod)
            out[rec["id"]]["drift"].append(f"cannot list tc filters: {e}")
            continue
        out[rec["id"]]["cookie"] = cookie
        if cookie != rec.get("netns_cookie"):
            out[rec["id"]]["drift"] = []         # another netns: attached again, not repaired
            continue
        missing = [hooked[i] for i in sorted(hooked) if not ours.get(i)]
        if missing:
            out[rec["id"]]["drift"].append(f"tc filter missing on {', '.join(missing)}")
    if not loader.is_loaded(svc.pin_prefix):
        for rec in records:
            out[rec["id"]]["drift"].append("pinned programs or maps missing")
        return
    with Maps(svc.pin_prefix) as maps:
        for rec in records:
            cookie = rec.get("netns_cookie")
            if cookie is None or maps["pods"].lookup(structs.U64(cookie)) is None:
                out[rec["id"]]["drift"].append("pods map entry missing")


class Reconciler:
    """Carries plans out on a NodeService; keeps each pod's state and last error."""

    def __init__(self, svc, metrics, source="pods-file", clock=time.monotonic):
        self.svc, self.metrics, self.source, self.clock = svc, metrics, source, clock
        self.backoff = Backoff()
        self.status = {}          # id -> {"id","name","state","last_error","mode",...}
        self.entry_errors = []    # source.EntryError of the last good file
        self.owned = set()
        self.checkpoint = None    # called before acting (the daemon writes agent.json)
        self.seen = {}            # id -> the DesiredPod the last pass over it planned for
        self.dirty = False        # a pod's reported state changed since the daemon wrote it
        self.busy = 0.0           # seconds spent in passes (the daemon sums a drift cycle)

    def run(self, desired, entry_errors=(), check_drift=False, ids=None):
        """One pass over the pods `ids` (None: every desired pod and every record). Only
        their records are read and only they are resolved, observed and acted on, so a
        pass over the few entries a file change touched costs the same with 0 or 1000
        pods enrolled. Returns seconds until a pod in backoff is due (None: none is)."""
        t0 = time.perf_counter()
        now = self.clock()
        self.entry_errors = list(entry_errors)
        if ids is None:
            records = {r["id"]: r for r in self.svc.store.all()}
            scope = set(desired) | set(records)
        else:
            scope = set(ids)
            records = {i: r for i, r in ((i, self.svc.store.load(i)) for i in sorted(scope))
                       if r is not None}
        wanted = {i: w for i, w in desired.items() if i in scope}
        pods, resolve_errors = {}, {}
        for pod_id, want in wanted.items():
            try:
                pods[pod_id] = resolve(want)
            except MeshbpfError as e:
                resolve_errors[pod_id] = str(e)
                if self.backoff.waiting(pod_id, now, _key(want)) == 0:
                    self._op("attach" if pod_id not in records else "repair", False,
                             type(e).__name__, time.perf_counter())
        live = observe(self.svc, {i: r for i, r in records.items() if i in pods}, pods) \
            if check_drift else {i: {"cookie": _cookie(p), "drift": []} for i, p in pods.items()}
        actions = plan({i: w for i, w in wanted.items() if i in pods}, records,
                       self.owned - set(resolve_errors), live)
        for pod_id, err in resolve_errors.items():
            want = desired[pod_id]
            wait = self.backoff.waiting(pod_id, now, _key(want))
            if wait > 0:
                self._set(pod_id, want, records.get(pod_id), "backoff", retry_in=round(wait, 3))
            else:
                self._fail(want, records.get(pod_id), err, now, op=None)
        for a in actions:
            if a.id in desired and a.id not in self.status:
                self._set(a.id, desired[a.id], records.get(a.id), "pending")
        self.owned |= set(desired)
        if actions and self.checkpoint is not None:
            self.checkpoint()     # owned pods are on disk before any is attached
        for a in actions:
            want = desired.get(a.id)
            key = _key(want)
            wait = self.backoff.waiting(a.id, now, key)
            if wait > 0:
                self._set(a.id, want, records.get(a.id), "backoff", retry_in=round(wait, 3))
                continue
            self._do(a, want, pods.get(a.id), records.get(a.id), now)
        acted = {a.id for a in actions}
        for pod_id, want in wanted.items():
            if pod_id not in acted and pod_id not in resolve_errors and pod_id in records:
                self.backoff.succeeded(pod_id)
                self._set(pod_id, want, records[pod_id], "attached", last_error=None)
        for pod_id in list(self.status):
            if pod_id not in desired:
                del self.status[pod_id]
                self.dirty = True
        self.backoff.forget(set(desired))
        gone = self.owned - set(records) if ids is None else scope - set(records)
        self.owned = (self.owned - gone) | set(desired)
        for pod_id in scope:
            if pod_id in desired:
                self.seen[pod_id] = desired[pod_id]
            else:
                self.seen.pop(pod_id, None)
        self.busy += time.perf_counter() - t0
        if self.metrics is not None:
            if ids is None:
                self.metrics.reconcile_done(time.perf_counter() - t0, self.pods_by_state())
            else:
                self.metrics.pods_changed(self.pods_by_state())
        return self.backoff.next_due(self.clock())

    def changed(self, desired):
        """The ids a new desired state touches: new, changed or removed entries (against
        what the last pass over each saw) and pods whose backoff is over."""
        out = {i for i, w in desired.items() if self.seen.get(i) != w}
        out |= set(self.seen) - set(desired)
        return out | self.backoff.due(self.clock())

    def drift_ids(self, desired):
        """Every pod a full drift check covers: the desired ones and the owned records."""
        return sorted(set(desired) | self.owned)

    def _do(self, action, want, pod, rec, now):
        t0 = time.perf_counter()
        name = want.name if want else (rec or {}).get("name") or action.id
        try:
            if action.kind == "detach":
                self.svc.detach(action.id)
                self.owned.discard(action.id)
            else:
                rec = self.svc.attach(pod, want.config, pod_id=action.id)
        except Exception as e:  # noqa: BLE001 - one pod's failure, even a bug, is that pod's
            self._op(action.kind, False, type(e).__name__, t0)
            if not isinstance(e, MeshbpfError):
                log.exception("%s: %s raised", name, action.kind,
                              extra={"pod": name, "pod_id": action.id, "action": action.kind})
            if want is None:
                log.error("%s: %s failed: %s", name, action.kind, e,
                          extra={"pod": name, "pod_id": action.id, "action": action.kind})
                return
            self._fail(want, rec, str(e), now, op=action.kind)
            return
        self._op(action.kind, True, None, t0)
        log.info("%s: %s (%s)%s", name, action.kind, action.reason,
                 f" in {rec.get('mode')} mode" if rec and action.kind != "detach" else "",
                 extra={"pod": name, "pod_id": action.id, "action": action.kind,
                        "reason": action.reason})
        if want is not None:
            self.backoff.succeeded(action.id)
            self._set(action.id, want, rec, "attached", last_error=None)

    def _op(self, kind, ok, reason, t0):
        if self.metrics is not None:
            self.metrics.op(kind, ok=ok, reason=reason, seconds=time.perf_counter() - t0)

    def _fail(self, want, rec, err, now, op):
        delay = self.backoff.failed(want.id, now, _key(want))
        log.warning("%s: %s failed, retry in %.1fs: %s", want.name, op or "resolve", delay, err,
                    extra={"pod": want.name, "pod_id": want.id, "action": op, "error": err})
        self._set(want.id, want, rec, "error", last_error=err, retry_in=delay)

    def _set(self, pod_id, want, rec, state, **kw):
        cur = dict(self.status.get(pod_id, {}))
        cur.update({"id": pod_id, "name": want.name if want else pod_id,
                    "source": want.source if want else cur.get("source", self.source),
                    "state": state, "mode": (rec or {}).get("mode") or cur.get("mode")})
        cur.setdefault("last_error", None)
        cur.pop("retry_in", None)
        cur.update(kw)
        if self.status.get(pod_id) != cur:
            self.dirty = True
        self.status[pod_id] = cur

    def pods_by_state(self):
        out = {}
        for p in self.status.values():
            k = (p.get("mode") or "none", p["state"])
            out[k] = out.get(k, 0) + 1
        if self.entry_errors:
            out[("none", "error")] = out.get(("none", "error"), 0) + len(self.entry_errors)
        return out

    def report(self):
        """The pods as agent.json lists them: the served ones and the bad entries."""
        pods = [dict(self.status[i]) for i in sorted(self.status)]
        for e in self.entry_errors:
            pods.append({"id": e.id, "name": e.name or f"entry #{e.index}", "source": e.source,
                         "state": "error", "mode": None, "last_error": e.reason,
                         "entry": e.index})
        return pods


def _key(want):
    return None if want is None else (want.spec(), repr(sorted(want.config_dict().items())))


def _cookie(pod):
    try:
        return pod.netns_cookie
    except MeshbpfError:
        return None
