"""The node agent's benchmark (`meshbpf bench agent`): how fast a pods-file change becomes
interception, how fast a restarted agent is ready, and what the agent costs in memory/CPU.

The agent is the product's own `meshbpf daemon` (a subprocess, pods-file source, eBPF mode)
on a test-bed node (netns, veth, bridge, a test cgroup; pins under the test prefix).

"First intercepted connection": instead of an Envoy per pod, a probe in the measured pod
listens on 127.0.0.1:15001 (where the outbound hook sends the app's connections) and
connects in a loop, as root (not the proxy uid), to a port nothing listens on in another
test-bed pod. Not intercepted, each connect is refused at once (RST); the first connect that
succeeds was redirected to the probe's own listener. The time from the pods-file write
(atomic rename, t0) to that connect is the figure. Each measured pod is removed again (and
its detach waited for) before the next, so every sample sees the same number enrolled.

Pure helpers (pods-file entries, summaries, parsing the probe's line) are separate from
`run_agent`, which does the side effects.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from ..errors import MeshbpfError, UsageError
from ..testbed.agentfiles import free_port, write_pods
from . import parse, stats

DEFAULT_PODS = 50
DEFAULT_ENROLLED = (0, 200)
QUICK_PODS = 10
QUICK_ENROLLED = (0, 20)
MAX_PODS = 500
MAX_ENROLLED = 1000
FAR_PORT = 9                     # nothing listens there in the far pod: a refused connect
HIT_TIMEOUT = 5.0                # a pod not intercepted within this is a miss
RESYNC = 10.0                    # the daemon's default --resync, passed explicitly
# At rest the agent still checks every pod for drift every RESYNC seconds: a
# window of one period (and a bit) averages exactly one of them in.
REST_SECONDS = RESYNC + 0.5

# Listens where the outbound hook redirects, connects to FAR in a loop; prints the
# CLOCK_MONOTONIC time (shared by all processes of the machine) of the first connect
# that lands on its own listener.
PROBE = r"""
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 15001))
l.listen(64)
l.setblocking(False)
print("ready", flush=True)
end = time.monotonic() + limit
tries = 0
while time.monotonic() < end:
    s = socket.socket()
    s.settimeout(0.5)
    tries += 1
    try:
        s.connect((host, port))
        t = time.monotonic()
        l.accept()[0].close()
        print(f"hit={t:.6f} tries={tries}", flush=True)
        sys.exit(0)
    except BlockingIOError:
        print(f"hit={time.monotonic():.6f} tries={tries} note=connected-elsewhere", flush=True)
        sys.exit(0)
    except OSError:
        pass
    finally:
        s.close()
    time.sleep(0.0005)
print(f"miss tries={tries}", flush=True)
"""


# ---- pure -------------------------------------------------------------------------------

def parse_enrolled(text):
    """'0,200' -> [0, 200] (sorted, unique)."""
    return sorted(set(parse.int_list(text, "--enrolled", 0, MAX_ENROLLED)))


def check_pods(pods):
    if isinstance(pods, bool) or not isinstance(pods, int) or not 1 <= pods <= MAX_PODS:
        raise UsageError(f"--pods: {pods!r} is out of range (1..{MAX_PODS})")
    return pods


def pod_entry(name, netns, cgroup):
    """A pods-file entry for a test-bed pod (Istio's defaults as its config)."""
    return {"name": name, "netns": netns, "cgroup": cgroup}


def parse_probe(text):
    """The probe's output -> monotonic seconds of its first intercepted connect, or None."""
    for line in (text or "").splitlines():
        if line.startswith("hit="):
            try:
                return float(line.split()[0].split("=", 1)[1])
            except (ValueError, IndexError):
                return None
    return None


def parse_reconcile_count(text):
    """meshbpf_reconcile_duration_seconds_count from a /metrics page (None: absent)."""
    for line in (text or "").splitlines():
        if line.startswith("meshbpf_reconcile_duration_seconds_count"):
            try:
                return int(float(line.split()[-1]))
            except ValueError:
                return None
    return None


def summarize_ms(seconds):
    """p50/p99/max in milliseconds of a list of seconds (None where missing)."""
    ms = lambda v: None if v is None else v * 1e3
    return {"samples": len([s for s in seconds if s is not None]),
            "p50_ms": ms(stats.quantile(seconds, 0.5)),
            "p99_ms": ms(stats.quantile(seconds, 0.99)),
            "max_ms": ms(stats.quantile(seconds, 1.0))}


P99_LIMIT_MS = 100.0
READY_LIMIT_S = 2.0
RSS_LIMIT_MB = 120.0
TARGET_ENROLLED = 200


def agent_targets(result):
    """The issue's goals, each met / missed / not measured (None)."""
    out = []
    for row in result.get("first_connection", []):
        p99 = row.get("p99_ms")
        name = f"p99 pods-file change to first intercepted connection under " \
               f"{P99_LIMIT_MS:.0f} ms ({row['enrolled']} enrolled)"
        out.append({"name": name, "met": None if p99 is None or row.get("misses") else
                    p99 < P99_LIMIT_MS,
                    "detail": f"p99 {p99:.1f} ms over {row['samples']} pods"
                    + (f", {row['misses']} not intercepted" if row.get("misses") else "")
                    if p99 is not None else "no sample"})
    r = result.get("restart") or {}
    n = r.get("enrolled")
    name = f"ready within {READY_LIMIT_S:.0f} s after a restart with {TARGET_ENROLLED} pods"
    if r.get("ready_s") is None:
        out.append({"name": name, "met": None, "detail": r.get("error") or "not measured"})
    else:
        met = r["ready_s"] <= READY_LIMIT_S if (n or 0) >= TARGET_ENROLLED else None
        out.append({"name": name, "met": met,
                    "detail": f"{r['ready_s']:.2f} s with {n} pods"
                    + ("" if met is not None else f" (fewer than {TARGET_ENROLLED}: not judged)")})
    rss = [v.get("rss_mb") for k, v in (result.get("resources") or {}).items()
           if k.startswith("rest") and v.get("rss_mb") is not None]
    name = f"RSS at rest at most {RSS_LIMIT_MB:.0f} MB"
    out.append({"name": name, "met": None if not rss else max(rss) <= RSS_LIMIT_MB,
                "detail": "not measured" if not rss else f"{max(rss):.1f} MB (largest at rest)"})
    return out


def agent_text(result):
    from .report import _table, _verdict
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    out = [f"agent bench ({'quick' if result.get('quick') else 'full'}): {result['pods']} pods "
           f"measured per enrolled count, mode {result.get('mode')}", "",
           "pods-file change -> first intercepted connection:"]
    out.append(_table(["enrolled", "samples", "misses", "p50 ms", "p99 ms", "max ms",
                       "drift checks meanwhile"],
                      [[r["enrolled"], r["samples"], r["misses"], f(r["p50_ms"]),
                        f(r["p99_ms"]), f(r["max_ms"]),
                        "-" if r.get("drift_checks") is None else r["drift_checks"]]
                       for r in result["first_connection"]]))
    r = result.get("restart") or {}
    out += ["", f"restart to ready with {r.get('enrolled')} pods: {f(r.get('ready_s'), '.2f')} s"]
    out += ["", "agent resources:"]
    out.append(_table(["phase", "RSS MB", "peak RSS MB", "CPU %", "seconds"],
                      [[k, f(v.get("rss_mb")), f(v.get("peak_rss_mb")), f(v.get("cpu_percent")),
                        f(v.get("seconds"), ".1f")] for k, v in result["resources"].items()]))
    out += ["", "targets:"] + [f"  {_verdict(t):<12} {t['name']}: {t['detail']}"
                               for t in result["targets"]]
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    for e in result.get("errors", []):
        out.append(f"error: {e}")
    return "\n".join(out)


def agent_markdown(result):
    return "# meshbpf bench agent\n\n```\n" + agent_text(result) + "\n```\n"


# ---- side effects -----------------------------------------------------------------------

class _Agent:
    """`meshbpf daemon` as a subprocess on the test bed."""

    def __init__(self, sb, pods_file):
        self.sb, self.pods_file = sb, pods_file
        self.port = free_port()
        self.state = os.path.join(sb.state_dir, "agent.json")
        self.log = open(os.path.join(sb.tmpdir, f"agent-{time.monotonic_ns()}.log"), "w+")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshbpf", "daemon", "--pods-file", pods_file,
             "--pin-prefix", sb.pin_prefix, "--cgroup-root", sb.cgroup_root, "--mode", "ebpf",
             "--metrics-addr", f"127.0.0.1:{self.port}", "--log-format", "json",
             "--resync", str(RESYNC)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import psutil
        self.ps = psutil.Process(self.proc.pid)

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def _check(self):
        if self.proc.poll() is not None:
            raise MeshbpfError(f"the agent exited {self.proc.returncode}: "
                               f"{self.output()[-1500:]}")

    def pods(self):
        with contextlib.suppress(OSError, ValueError):
            with open(self.state) as f:
                d = json.load(f)
            if d.get("pid") == self.proc.pid:
                return {p["name"]: p.get("state") for p in d.get("pods", [])}
        return None

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def drift_checks(self):
        """How many full reconciles (drift checks of every pod) the agent has finished,
        from its /metrics (None if it cannot say)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return parse_reconcile_count(r.read().decode())
        except OSError:
            return None

    def wait(self, pred, timeout, what, step=0.005):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check()
            v = pred()
            if v:
                return v
            time.sleep(step)
        raise MeshbpfError(f"timed out after {timeout:.0f}s waiting for {what}; agent log: "
                           f"{self.output()[-1500:]}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Sampler:
    """RSS and CPU of a process (with its children) over a window, sampled every 50 ms."""

    def __init__(self, ps):
        self.ps, self.peak, self.stop_ev = ps, 0, threading.Event()

    def _rss(self):
        with contextlib.suppress(Exception):
            return self.ps.memory_info().rss
        return 0

    def _cpu(self):
        t = self.ps.cpu_times()
        return t.user + t.system

    def __enter__(self):
        self.t0, self.c0 = time.monotonic(), self._cpu()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()
        return self

    def _run(self):
        while not self.stop_ev.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop_ev.set()
        self.th.join()
        dt = time.monotonic() - self.t0
        rss = self._rss()
        self.result = {"rss_mb": rss / 2**20, "peak_rss_mb": max(self.peak, rss) / 2**20,
                       "cpu_percent": 100.0 * (self._cpu() - self.c0) / dt if dt else None,
                       "seconds": dt}
        return False


def _measure_one(ag, pods_file, base, pod, far_ip):
    """Add `pod` to the pods file; seconds to its first intercepted connection (None: none
    within HIT_TIMEOUT). Removes it again and waits for the detach."""
    probe = pod.spawn([sys.executable, "-c", PROBE, far_ip, str(FAR_PORT), str(HIT_TIMEOUT + 5)],
                      label="probe")
    try:
        end = time.monotonic() + 10
        while "ready" not in probe.output():
            if probe.popen.poll() is not None or time.monotonic() > end:
                raise MeshbpfError(f"the probe in {pod.name} did not start: {probe.output()[-500:]}")
            time.sleep(0.005)
        time.sleep(0.02)                    # a few refused connects: not intercepted yet
        if parse_probe(probe.output()) is not None:
            raise MeshbpfError(f"{pod.name} was intercepted before it was in the pods file")
        t0 = time.monotonic()
        write_pods(pods_file, base + [pod_entry(pod.name, pod.netns, pod.cgroup)])
        hit, end = None, t0 + HIT_TIMEOUT
        while time.monotonic() < end and probe.popen.poll() is None:
            time.sleep(0.005)
        hit = parse_probe(probe.output())
    finally:
        probe.stop()
    write_pods(pods_file, base)
    rec = os.path.join(ag.sb.state_dir, "pods", f"{pod.name}.json")

    def detached():
        p = ag.pods()
        return p is not None and pod.name not in p and not os.path.exists(rec)

    ag.wait(detached, 10, f"{pod.name} detached")
    return None if hit is None else hit - t0


def _fill(ag, pods_file, entries):
    write_pods(pods_file, entries)
    names = {e["name"] for e in entries}
    ag.wait(lambda: (lambda p: p is not None and all(p.get(n) == "attached" for n in names)
                     and len(p) == len(names))(ag.pods()),
            60 + 0.5 * len(names), f"{len(names)} pods attached", step=0.05)


def run_agent(pods=None, enrolled=None, quick=False, progress=None):
    """Run the agent benchmark; returns the result dict."""
    progress = progress or (lambda msg: None)
    pods = check_pods(pods if pods is not None else (QUICK_PODS if quick else DEFAULT_PODS))
    enrolled = sorted(set(enrolled if enrolled is not None else
                          (QUICK_ENROLLED if quick else DEFAULT_ENROLLED)))
    if any(not 0 <= e <= MAX_ENROLLED for e in enrolled) or not enrolled:
        raise UsageError(f"--enrolled: each in 0..{MAX_ENROLLED}")
    rest = 1.0 if quick else REST_SECONDS
    from ..testbed import Sandbox
    t_start = time.monotonic()
    rows, resources, errors, restart = [], {}, [], {}
    notes = [f"at rest: {rest:.1f} s windows; the agent checks every pod for drift (in slices) "
             f"every {RESYNC:.0f} s" + (", which a --quick window may miss" if quick else
                                        ", so each window holds one")]
    agents = []
    with Sandbox(name="benchagent") as sb:
        try:
            t0 = time.perf_counter()
            far = sb.add_pod("far")
            measured = [sb.add_pod(f"m{i}") for i in range(pods)]
            filler = [sb.add_pod(f"e{i}") for i in range(max(enrolled))]
            progress(f"agent: {1 + pods + len(filler)} test-bed pods made in "
                     f"{time.perf_counter() - t0:.1f}s")
            pods_file = os.path.join(sb.tmpdir, "pods.json")
            write_pods(pods_file, [])
            ag = _Agent(sb, pods_file)
            agents.append(ag)
            ag.wait(ag.ready, 60, "/readyz 200", step=0.02)
            with _Sampler(ag.ps) as s:
                time.sleep(rest)
            resources["rest, 0 pods"] = s.result
            base = []
            for e in enrolled:
                base = [pod_entry(p.name, p.netns, p.cgroup) for p in filler[:e]]
                t0 = time.perf_counter()
                _fill(ag, pods_file, base)
                progress(f"agent: {e} pods enrolled in {time.perf_counter() - t0:.1f}s")
                samples = []
                checks0 = ag.drift_checks()
                with _Sampler(ag.ps) as s:
                    for p in measured:
                        samples.append(_measure_one(ag, pods_file, base, p, far.ip4))
                resources[f"churn, {e} enrolled"] = s.result
                checks1 = ag.drift_checks()
                # a change that arrives during the drift check must not wait for it: the
                # window says whether one ran while the pods were measured
                row = dict(summarize_ms(samples), enrolled=e,
                           misses=sum(1 for x in samples if x is None),
                           drift_checks=None if None in (checks0, checks1) else checks1 - checks0)
                rows.append(row)
                progress(f"agent: {e} enrolled: first intercepted connection p50 "
                         f"{row['p50_ms'] or 0:.1f} ms, p99 {row['p99_ms'] or 0:.1f} ms, "
                         f"{row['misses']} misses")
            n = len(base)
            with _Sampler(ag.ps) as s:
                time.sleep(rest)
            resources[f"rest, {n} pods"] = s.result
            # restart: SIGKILL, a new agent, time until /readyz answers 200
            ag.stop(signal.SIGKILL)
            ag2 = _Agent(sb, pods_file)
            agents.append(ag2)
            ag2.wait(ag2.ready, 60, "/readyz 200 after a restart", step=0.005)
            restart = {"enrolled": n, "ready_s": time.monotonic() - ag2.t_start}
            progress(f"agent: restart to ready with {n} pods: {restart['ready_s']:.2f}s")
            time.sleep(0.5)
            with _Sampler(ag2.ps) as s:
                time.sleep(rest)
            resources[f"rest after restart, {n} pods"] = s.result
        except MeshbpfError as e:
            errors.append(str(e))
            progress(f"agent: failed: {e}")
        finally:
            for a in agents:
                a.stop(signal.SIGKILL)
            subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix",
                            sb.pin_prefix, "--cgroup-root", sb.cgroup_root],
                           capture_output=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                               os.path.dirname(os.path.abspath(__file__))))))
    result = {"kind": "agent", "quick": quick, "pods": pods, "enrolled": enrolled,
              "mode": "ebpf", "first_connection": rows, "restart": restart,
              "resources": resources, "errors": errors, "notes": notes, "resync_s": RESYNC,
              "agent_pids": [a.proc.pid for a in agents],
              "seconds": time.monotonic() - t_start,
              "host": {"kernel": os.uname().release, "cpus": os.cpu_count()}}
    result["targets"] = agent_targets(result)
    return result
