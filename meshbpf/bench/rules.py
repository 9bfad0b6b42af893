"""The control-plane benchmark of the product's own path: what a pod, an entry and a sync cost.

Every timed operation is a call of the service layer (`meshbpf.service.NodeService`), the
same functions the CLI and the agent call, on throwaway test-bed pods (netns, veth on the
node bridge, cgroup), in eBPF mode and in iptables mode (nft and legacy):

- `enroll-pod`: `attach` of one more pod while P pods are enrolled holding N excluded CIDRs
  between them (each ~N/P in its config's `-x`); its time is also split into the phases
  the service reports (node, maps, tc, sk_lookup, records), so the slow part is visible;
- `detach-pod`: `detach` of that pod;
- `add-entry` / `remove-entry`: `update` of a live pod with one excluded CIDR more / less;
- `full-sync`: `update` of every enrolled pod with its config (what a full re-sync of the
  node does);
- enroll cost against the number of pods already enrolled (1, 10, 50, 100, 250: flatness).

And the data-plane cost of N entries: new connections per second from a client pod,
enrolled through the service with N excluded CIDRs (the last one the server's address,
so the connection goes direct and no sidecar is needed), in eBPF mode (meshbpf's own
loaded connect4 program and its per-pod LPM trie) against iptables mode (Istio's
exclusion rules, walked in order).

Pure helpers (CIDR generation and spreading, pod counts, configs) are separate from
`run_rules`, which does the side effects.
"""

import ipaddress
import os
import socket
import sys
import time

from .. import bpfsys, system
from ..config import InterceptConfig
from ..errors import MeshbpfError, UsageError
from . import parse, stats

DEFAULT_NS = (100, 1000, 5000, 20000)
QUICK_NS = (100, 20000)
DEFAULT_PODS = 250
QUICK_PODS = 10
MAX_PODS = 1000
POD_STEPS = (1, 10, 50, 100, 250)         # enroll cost measured with this many pods enrolled
BACKENDS = ("ebpf", "iptables-nft", "iptables-legacy")
OPS = ("enroll-pod", "detach-pod", "add-entry", "remove-entry", "full-sync")
MAX_N = 1 << 20
_FILLER_NET = ipaddress.ip_network("100.64.0.0/10")      # N exclusions live here
_EXTRA_NET = ipaddress.ip_network("100.127.0.0/16")      # single added entries
CONN_PORT = 9000
SPARE_ID = "bench-spare"
CLIENT_ID = "bench-dpc"

# ---- pure: entries, pods, configs ----------------------------------------------------


def exclusion_cidrs(n, last=None):
    """N distinct /32 exclusions from 100.64.0.0/10; the last one is `last` if given."""
    if not 0 <= n <= MAX_N:
        raise UsageError(f"N={n} is out of range (0..{MAX_N})")
    base = int(_FILLER_NET.network_address) + 1
    out = [f"{ipaddress.IPv4Address(base + i)}/32" for i in range(n - (1 if last else 0))]
    if last and n:
        out.append(f"{last}/32" if "/" not in last else last)
    return out


def extra_cidr(k):
    """The k-th single entry added on top of the N (never one of them)."""
    return f"{ipaddress.IPv4Address(int(_EXTRA_NET.network_address) + 1 + k % 65000)}/32"


def parse_ns(text):
    """'100,1000,20k' -> [100, 1000, 20000] (sorted, unique)."""
    return sorted(set(parse.int_list(text, "--n", 1, MAX_N, thousands=True)))


def check_pods(pods):
    """The number of pods to spread entries over (1..MAX_PODS), or a UsageError."""
    if isinstance(pods, bool) or not isinstance(pods, int) or not 1 <= pods <= MAX_PODS:
        raise UsageError(f"--pods: {pods!r} is out of range (1..{MAX_PODS})")
    return pods


def spread_entries(cidrs, pods):
    """`cidrs` split over `pods` pods in order, as evenly as possible (sizes differ by at
    most one; the first pods get the extra ones): every entry lands in exactly one pod."""
    check_pods(pods)
    q, r = divmod(len(cidrs), pods)
    out, i = [], 0
    for p in range(pods):
        k = q + (1 if p < r else 0)
        out.append(list(cidrs[i:i + k]))
        i += k
    return out


def pod_steps(max_pods):
    """Pod counts at which the enroll cost is measured: POD_STEPS up to max_pods, and it."""
    check_pods(max_pods)
    return sorted({s for s in POD_STEPS if s < max_pods} | {max_pods})


def pod_config(cidrs, base=None):
    """A pod's config: Istio's defaults (`-i '*' -b '*'`: outbound, inbound on tc and
    sk_lookup) with `cidrs` as its excluded outbound ranges (`-x`)."""
    return (base or InterceptConfig()).replace(outbound_ip_ranges_exclude=",".join(cidrs))


def with_entry(config, cidr):
    """`config` with one excluded CIDR more (appended)."""
    cur = [c for c in config.outbound_ip_ranges_exclude.split(",") if c.strip()]
    return config.replace(outbound_ip_ranges_exclude=",".join(cur + [cidr]))


def iptables_binary(backend):
    """The iptables binary a backend name stands for (None for eBPF)."""
    if backend == "ebpf":
        return None
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    return backend                                 # iptables-nft | iptables-legacy


def service_options(backend):
    """NodeService keyword arguments (besides the prefix and cgroup root) for a backend."""
    if backend == "ebpf":
        return {"mode": "ebpf", "splice": True}
    return {"mode": "iptables", "iptables_binary": iptables_binary(backend)}


def pod_count(status):
    """How many pods a service's `status()` lists (a list or a dict of pods)."""
    pods = (status or {}).get("pods") or []
    return len(pods)


# ---- side effects: the service, timed ---------------------------------------------------

def _syscalls():
    """bpf(2) commands this process has issued so far (None if bpfsys does not count)."""
    c = getattr(bpfsys, "SYSCALLS", None)
    return None if c is None else sum(c.values())


def _timed(fn, *args, **kw):
    """(result, seconds, bpf syscalls) of one call."""
    s0 = _syscalls()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    dt = time.perf_counter() - t0
    s1 = _syscalls()
    return out, dt, (None if s0 is None else s1 - s0)


def _binaries(backend):
    kind = backend.split("-", 1)[1]        # nft | legacy
    return f"iptables-{kind}", f"iptables-{kind}-restore"


def _service(sb, backend):
    from ..service import NodeService
    return NodeService(pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root,
                       **service_options(backend))


def _pod_id(pod):
    return f"bench-{pod.name}"


class _Samples:
    """Timed repetitions, grouped by (backend, op, n) or (backend, pods)."""

    def __init__(self):
        self.ops, self.by_pods = {}, {}

    @staticmethod
    def _add(rec, seconds, timings, syscalls):
        rec["seconds"].append(seconds)
        rec["timings"].append(dict(timings or {}))
        rec["syscalls"].append(syscalls)

    def op(self, backend, op, n, pods, seconds, timings=None, syscalls=None):
        rec = self.ops.setdefault((backend, op, n), {
            "backend": backend, "op": op, "n": n, "pods": pods,
            "seconds": [], "timings": [], "syscalls": []})
        self._add(rec, seconds, timings, syscalls)

    def enroll_at(self, backend, pods, op, seconds, timings=None, syscalls=None):
        rec = self.by_pods.setdefault((backend, op, pods), {
            "backend": backend, "op": op, "pods": pods,
            "seconds": [], "timings": [], "syscalls": []})
        self._add(rec, seconds, timings, syscalls)


class _BackendBench:
    """One backend's control-plane run: P pods enrolled through the service, then each
    operation timed at each N. Counts what the service created and removed."""

    def __init__(self, svc, backend, pods, spare, samples, reps, sync_reps, progress):
        self.svc, self.backend, self.pods, self.spare = svc, backend, pods, spare
        self.samples, self.reps, self.sync_reps, self.progress = samples, reps, sync_reps, progress
        self.enrolled = {}                       # pod id -> config
        self.evidence = {"attached": 0, "updated": 0, "detached": 0,
                         "records_enrolled": None, "records_after": None}

    def run(self, ns):
        try:
            for i, n in enumerate(ns):
                self._at_n(n, first=(i == 0))
        except BaseException:
            try:                           # leave nothing enrolled, but keep the first error
                self._detach_all()
            except MeshbpfError:
                pass
            raise
        self._detach_all()

    def _at_n(self, n, first):
        b, P = self.backend, len(self.pods)
        cfgs = [pod_config(s) for s in spread_entries(exclusion_cidrs(n), P)]
        steps = set(pod_steps(P)) if first else {P}
        t0 = time.perf_counter()
        for i, pod in enumerate(self.pods):
            pid = _pod_id(pod)
            if first:
                self.svc.attach(pod.pod, cfgs[i], pod_id=pid)
                self.evidence["attached"] += 1
            else:
                self.svc.update(pid, cfgs[i])         # the node moves to N entries
                self.evidence["updated"] += 1
            self.enrolled[pid] = cfgs[i]
            if first and i + 1 in steps:
                self._enroll_spare(cfgs[0], i + 1, n if i + 1 == P else None)
        if not first:
            # the pods curve stays the first N's: a later N's spare has a longer config
            self._enroll_spare(cfgs[0], P, n, curve=False)
        self.evidence["records_enrolled"] = pod_count(self.svc.status())
        setup = time.perf_counter() - t0
        ids = list(self.enrolled)
        for k in range(self.reps):
            pid = ids[k % P]
            cfg = self.enrolled[pid]
            rec, dt, sc = _timed(self.svc.update, pid, with_entry(cfg, extra_cidr(k)))
            self.samples.op(b, "add-entry", n, P, dt, rec.get("timings"), sc)
            rec, dt, sc = _timed(self.svc.update, pid, cfg)
            self.samples.op(b, "remove-entry", n, P, dt, rec.get("timings"), sc)
            self.evidence["updated"] += 2
        for _ in range(self.sync_reps):
            s0, t0 = _syscalls(), time.perf_counter()
            for pid, cfg in self.enrolled.items():
                self.svc.update(pid, cfg)
            dt = time.perf_counter() - t0
            self.evidence["updated"] += len(self.enrolled)
            self.samples.op(b, "full-sync", n, P, dt, None,
                            None if s0 is None else _syscalls() - s0)
        med = lambda op: stats.median(self.samples.ops[(b, op, n)]["seconds"])
        self.progress(f"rules: {b} N={n} over {P} pods (set up in {setup:.1f}s): enroll "
                      f"{med('enroll-pod') * 1e3:.2f}ms, add {med('add-entry') * 1e3:.2f}ms, "
                      f"remove {med('remove-entry') * 1e3:.2f}ms, "
                      f"full sync {med('full-sync') * 1e3:.0f}ms")

    def _enroll_spare(self, cfg, enrolled, n, curve=True):
        """Enroll and detach one more pod `reps` times with `enrolled` pods enrolled;
        `n`: also the enroll-pod / detach-pod samples of that N; `curve`: samples of the
        cost against pods enrolled (one config for the whole curve)."""
        b = self.backend
        for _ in range(self.reps):
            rec, dt, sc = _timed(self.svc.attach, self.spare.pod, cfg, pod_id=SPARE_ID)
            self.evidence["attached"] += 1
            timings = rec.get("timings")
            _, dt2, sc2 = _timed(self.svc.detach, SPARE_ID)
            self.evidence["detached"] += 1
            if curve:
                self.samples.enroll_at(b, enrolled, "enroll-pod", dt, timings, sc)
                self.samples.enroll_at(b, enrolled, "detach-pod", dt2, None, sc2)
            if n is not None:
                self.samples.op(b, "enroll-pod", n, enrolled, dt, timings, sc)
                self.samples.op(b, "detach-pod", n, enrolled, dt2, None, sc2)

    def _detach_all(self):
        errors = []
        for pid in list(self.enrolled):
            try:
                self.svc.detach(pid)
                self.evidence["detached"] += 1
            except MeshbpfError as e:
                errors.append(f"{pid}: {e}")
            del self.enrolled[pid]
        self.evidence["records_after"] = pod_count(self.svc.status())
        if errors:
            raise MeshbpfError(f"{self.backend}: detaching the bench pods failed: "
                               + "; ".join(errors[:3]))


# ---- data plane: connection rate through N entries --------------------------------------

# Answers "y" to any request, then closes first (so TIME_WAITs stay on the server side).
# Dual-stack: IPv4 clients arrive v4-mapped.
CONN_SERVER = r"""
import socket, sys
l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind(("::", int(sys.argv[1])))
l.listen(4096)
while True:
    c, _ = l.accept()
    try:
        if c.recv(64):
            c.sendall(b"y")
    except OSError:
        pass
    c.close()
"""

_CONN_CLIENT = r"""
import socket, sys, time
host, port, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = errors = 0
first = ""
t0 = time.perf_counter()
end = t0 + dur
while time.perf_counter() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect((host, port))
        s.sendall(b"x")
        if s.recv(1) == b"y":
            n += 1
        else:
            errors += 1
            first = first or f"connection {n + errors}: closed without a reply"
    except OSError as e:
        errors += 1
        first = first or f"connection {n + errors}: {e!r}"
    finally:
        s.close()
el = time.perf_counter() - t0
print(f"conns={n} errors={errors} seconds={el:.6f} conn_per_s={n / el:.3f}")
if first:
    print(f"first error: {first}")
"""


def measure_conn_rate(client, host, port, seconds):
    """Connect-request-close loop run in pod `client` (its netns and cgroup).

    Returns (connections per second, error or None). Failed connections (2 s timeout
    each) count against the rate and are reported; none succeeding raises MeshbpfError.
    """
    r = client.exec([sys.executable, "-c", _CONN_CLIENT, host, str(port), str(seconds)],
                    timeout=seconds + 60)
    if r.returncode != 0:
        raise MeshbpfError(f"connection client failed: {(r.stderr or r.stdout).strip()[-300:]}")
    count = lambda key: parse.parse_count_line(r.stdout, key)
    rate, errors = count("conn_per_s"), count("errors")
    if rate <= 0:
        raise MeshbpfError(f"no connection succeeded: {' '.join(r.stdout.split())}")
    err = None
    if errors:
        err = (f"{int(errors)} of {int(errors + count('conns'))} "
               f"connections failed ({r.stdout.strip().splitlines()[-1]})")
    return rate, err


def start_conn_server(pod, port=CONN_PORT):
    proc = pod.spawn([sys.executable, "-c", CONN_SERVER, str(port)], label="connsrv")
    proc.wait_port(port, host="127.0.0.1", timeout=10)
    return proc


def _bench_dataplane(sb, svcs, ns, backends, seconds, rounds, progress):
    client, server = sb.add_pod("dpc"), sb.add_pod("dps")
    client.exec(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"], check=True)
    server.exec(["sysctl", "-q", "-w", "net.core.somaxconn=4096"], check=False)
    start_conn_server(server)
    samples, errors = {}, []
    base = []
    for _ in range(rounds):
        rate, err = measure_conn_rate(client, server.ip4, CONN_PORT, seconds)
        base.append(rate)
        if err:
            errors.append(f"data plane without rules: {err}")
    samples[("none", 0)] = {"backend": "none", "n": 0, "conn_per_s": base}
    for n in ns:
        cfg = pod_config(exclusion_cidrs(n, last=server.ip4))
        for _ in range(rounds):
            for backend in backends:
                rec = samples.setdefault((backend, n), {"backend": backend, "n": n,
                                                        "conn_per_s": []})
                svc = svcs.get(backend)
                if svc is None:
                    continue
                try:
                    # impl: the mode the service says it enrolled the client in
                    rec["impl"] = f"service:{svc.attach(client.pod, cfg, pod_id=CLIENT_ID)['mode']}"
                    try:
                        rate, err = measure_conn_rate(client, server.ip4, CONN_PORT, seconds)
                    finally:
                        svc.detach(CLIENT_ID)
                    rec["conn_per_s"].append(rate)
                    if err:
                        rec["error"] = err
                        errors.append(f"data plane {backend} N={n}: {err}")
                except MeshbpfError as e:
                    rec["error"] = str(e)
                    errors.append(f"data plane {backend} N={n}: {e}")
        progress(f"rules: data plane N={n}: " + ", ".join(
            f"{b} {stats.median(samples[(b, n)]['conn_per_s']) or 0:.0f} conn/s"
            for b in backends if (b, n) in samples))
    return list(samples.values()), errors


# ---- the runner ------------------------------------------------------------------------

def available_backends():
    """Which rules backends this machine can run (iptables binaries present)."""
    out = ["ebpf"]
    for b in ("iptables-nft", "iptables-legacy"):
        if all(system.have(x) for x in _binaries(b)):
            out.append(b)
    return out


def run_rules(ns=DEFAULT_NS, backends=BACKENDS, quick=False, pods=None, reps=None,
              dataplane=True, dataplane_seconds=None, rounds=None, progress=None):
    """Run the control-plane (and data-plane-cost) benchmark; returns the result dict."""
    progress = progress or (lambda msg: None)
    ns = sorted({int(n) for n in ns})
    if not ns:
        raise UsageError("give at least one N")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    pods = check_pods(pods if pods is not None else (QUICK_PODS if quick else DEFAULT_PODS))
    have = available_backends()
    missing = [b for b in backends if b not in have]
    backends = [b for b in backends if b in have]
    sync_reps = 1
    rounds = rounds or (1 if quick else 3)
    dataplane_seconds = dataplane_seconds or (0.7 if quick else 2.0)
    from ..testbed import Sandbox
    t_start = time.monotonic()
    samples = _Samples()
    errors, notes = [f"{b}: not installed" for b in missing], []
    dp_samples, evidence, svcs = [], {}, {}
    with Sandbox(name="benchrules") as sb:
        try:
            t0 = time.perf_counter()
            bed = [sb.add_pod(f"p{i}") for i in range(1, pods + 1)]
            spare = sb.add_pod("spare")
            progress(f"rules: {pods + 1} test-bed pods made in {time.perf_counter() - t0:.1f}s")
            for b in backends:
                r = reps or ((5 if quick else 15) if b == "ebpf" else (3 if quick else 7))
                try:
                    svcs[b] = _service(sb, b)
                    run = _BackendBench(svcs[b], b, bed, spare, samples, r, sync_reps, progress)
                    evidence[b] = run.evidence
                    run.run(ns)
                except MeshbpfError as e:
                    errors.append(f"{b}: {e}")
                    progress(f"rules: {b} failed: {e}")
            if dataplane:
                dp_samples, dp_errors = _bench_dataplane(
                    sb, svcs, ns, backends, dataplane_seconds, rounds, progress)
                errors += dp_errors
        finally:
            for b, svc in svcs.items():
                try:
                    svc.cleanup()
                except MeshbpfError as e:
                    errors.append(f"{b}: cleanup: {e}")
    if any(b != "ebpf" for b in svcs) and "ebpf" in svcs:
        notes.append("eBPF mode's node programs stayed attached at the test-bed cgroup while "
                     "iptables mode was measured (a pod not enrolled in eBPF mode passes "
                     "through them after one map lookup)")
    results = stats.aggregate_rules(list(samples.ops.values()))
    by_pods = stats.aggregate_by_pods(list(samples.by_pods.values()))
    from .report import rules_ratios, rules_targets
    return {
        "kind": "rules", "quick": quick, "ns": ns, "pods": pods, "backends": backends,
        "path": "meshbpf.service.NodeService",
        "results": results, "by_pods": by_pods,
        "dataplane": stats.aggregate_dataplane(dp_samples),
        "targets": rules_targets(results, by_pods),
        "ratios": rules_ratios(results),
        "service": evidence,
        "errors": errors, "notes": notes,
        "seconds": time.monotonic() - t_start,
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                 "hostname": socket.gethostname()},
    }
