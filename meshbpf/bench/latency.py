"""The data-path benchmark: what each interception mode costs a request, in one sandbox run.

A client pod and a server pod, each with an Istio-like Envoy sidecar (uid 1337). Modes:
- `direct`: no interception, the client dials the server pod;
- `explicit`: no interception, the client dials its own sidecar on a static listener that
  forwards to the server's sidecar, which forwards to the app (two proxies, no redirect):
  the cost of the sidecars alone;
- `iptables`: Istio's rules in both pods (meshbpf.iptables);
- `ebpf` / `ebpf-nosplice`: the eBPF interceptor with / without sockmap splicing.
Per mode and round: sockperf ping-pong percentiles per message size, iperf3 throughput,
new connections per second (connect, one request, close), and CPU time per request of
every process on the path (client app, both sidecars, server app). Modes are interleaved
(the order rotates every round); medians and spreads come from `stats.aggregate_latency`.
Every run checks that interception really happened (sidecar counters rose) and that the
direct path really bypassed the sidecars, and records an error otherwise.
"""

import os
import resource
import socket
import time

import psutil

from ..testbed import sidecar as sidecar_cfg
from ..config import InterceptConfig
from ..errors import MeshbpfError, UnsupportedError
from . import parse, stats
from .rules import CONN_PORT, measure_conn_rate, start_conn_server

MODES = ("direct", "explicit", "iptables", "ebpf", "ebpf-nosplice")
SOCKPERF_PORT = 11111
IPERF_PORT = 5201
APP_PORTS = {"sockperf": SOCKPERF_PORT, "iperf": IPERF_PORT, "conn": CONN_PORT}
# explicit mode: client sidecar listener -> server sidecar listener -> app on 127.0.0.1
EXPLICIT_CLIENT_PORT = {"sockperf": 15111, "iperf": 15112, "conn": 15113}
EXPLICIT_SERVER_PORT = {"sockperf": 15211, "iperf": 15212, "conn": 15213}
DEFAULT_SIZES = (64, 1024)
QUICK_SIZES = (64,)


# ---- pure: the sidecar configuration for explicit mode ----------------------------------

def _static_cluster(name, ip, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}]}}


def _static_listener(name, port, cluster):
    return {"name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                          "network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": name, "cluster": cluster}}]}]}


def bench_bootstrap(role, server_ip, node_id="sidecar~bench"):
    """Istio's sidecar bootstrap (meshbpf.testbed.sidecar) plus explicit-mode static listeners.

    role "client": 0.0.0.0:EXPLICIT_CLIENT_PORT[x] -> server_ip:EXPLICIT_SERVER_PORT[x];
    role "server": 0.0.0.0:EXPLICIT_SERVER_PORT[x] -> 127.0.0.1:APP_PORTS[x].
    No access log (it would be part of the measured cost).
    """
    boot = sidecar_cfg.envoy_bootstrap(listen="compat", access_log_path=None, node_id=node_id)
    res = boot["static_resources"]
    for app, app_port in APP_PORTS.items():
        if role == "client":
            name = f"explicit_out_{app}"
            res["listeners"].append(_static_listener(name, EXPLICIT_CLIENT_PORT[app], name))
            res["clusters"].append(_static_cluster(name, server_ip, EXPLICIT_SERVER_PORT[app]))
        elif role == "server":
            name = f"explicit_in_{app}"
            res["listeners"].append(_static_listener(name, EXPLICIT_SERVER_PORT[app], name))
            res["clusters"].append(_static_cluster(name, "127.0.0.1", app_port))
        else:
            raise ValueError(f"role must be client or server, not {role!r}")
    return boot


def mode_order(modes, round_index):
    """Rotate the mode order every round so no mode always runs first (or after another)."""
    k = round_index % len(modes)
    return list(modes[k:]) + list(modes[:k])


def targets_for(mode, server_ip):
    """(host, {app: port}) the client dials in `mode`."""
    if mode == "explicit":
        return "127.0.0.1", dict(EXPLICIT_CLIENT_PORT)
    return server_ip, dict(APP_PORTS)


# ---- side effects -----------------------------------------------------------------------

class _Cpu:
    """CPU seconds of long-lived processes (psutil) plus reaped children (getrusage)."""

    def __init__(self, pids):
        self.procs = []
        for pid in pids:
            try:
                self.procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass

    def _now(self):
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ru.ru_utime + ru.ru_stime

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        self.seconds = self._now() - self.start
        return False


def _counter(sc, name):
    try:
        return sc.stats().get(name, 0)
    except MeshbpfError:
        return None


class _Bench:
    """One sandbox with the two pods, their sidecars and the servers, and the interceptors."""

    def __init__(self, sb, sizes, durations, progress):
        self.sb, self.sizes, self.dur, self.progress = sb, sizes, durations, progress
        self.client = sb.add_pod("client")
        self.server = sb.add_pod("server")
        for p in (self.client, self.server):
            p.exec(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"], check=False)
            p.exec(["sysctl", "-q", "-w", "net.core.somaxconn=4096"], check=False)
        self.sp_srv = self.ip_srv = self.conn_srv = None
        self.ensure_servers()
        self.c_env = self.client.start_envoy(bootstrap=bench_bootstrap("client", self.server.ip4),
                                              log_level="warning")
        self.s_env = self.server.start_envoy(bootstrap=bench_bootstrap("server", self.server.ip4),
                                              log_level="warning")
        self.interceptors = {}
        self.config = InterceptConfig()

    def ensure_servers(self):
        """Start the server apps, or restart any that exited; returns what was restarted."""
        notes = []
        if self.sp_srv is None or not self.sp_srv.alive():
            if self.sp_srv is not None:
                notes.append(f"sockperf server had exited ({self.sp_srv.returncode}): "
                             f"{' '.join(self.sp_srv.output().split())[-200:]}")
            self.sp_srv = self.server.spawn(["sockperf", "sr", "--tcp", "-i", "0.0.0.0",
                                             "-p", str(SOCKPERF_PORT)], label="sockperf-sr")
            self.server.wait_port(SOCKPERF_PORT, proc=self.sp_srv, listening=True)
        if self.ip_srv is None or not self.ip_srv.alive():
            if self.ip_srv is not None:
                notes.append(f"iperf3 server had exited ({self.ip_srv.returncode})")
            self.ip_srv = self.server.spawn(["iperf3", "-s", "-p", str(IPERF_PORT),
                                             "--rcv-timeout", "5000"], label="iperf3-s")
            self.server.wait_port(IPERF_PORT, proc=self.ip_srv, listening=True)
        if self.conn_srv is None or not self.conn_srv.alive():
            if self.conn_srv is not None:
                notes.append(f"connection server had exited ({self.conn_srv.returncode})")
            self.conn_srv = start_conn_server(self.server)
        return notes

    # -- interception --------------------------------------------------------------------
    def _interceptor(self, mode):
        from ..service import NodeService
        kw = dict(pin_prefix=self.sb.pin_prefix, cgroup_root=self.sb.cgroup_root)
        if mode == "iptables":
            return NodeService(mode="iptables", **kw)
        return NodeService(mode="ebpf", splice=(mode == "ebpf"), **kw)

    def enter(self, mode):
        if mode in ("direct", "explicit"):
            return None
        try:
            icpt = self._interceptor(mode)
        except ImportError as e:
            raise UnsupportedError(f"{mode} interceptor is not available: {e}")
        try:
            for p in (self.client, self.server):
                icpt.attach(p.pod, self.config)
        except BaseException:
            self._leave(icpt)
            raise
        return icpt

    def _leave(self, icpt):
        errs = []
        for p in (self.client, self.server):
            try:
                icpt.detach(p.pod)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                errs.append(str(e))
        try:
            icpt.cleanup()
        except Exception as e:  # noqa: BLE001
            errs.append(str(e))
        if errs:
            raise MeshbpfError("; ".join(errs))

    def leave(self, icpt):
        if icpt is not None:
            self._leave(icpt)

    # -- measurements --------------------------------------------------------------------
    def _pids(self):
        return [self.sp_srv.pid, self.ip_srv.pid, self.conn_srv.pid, self.c_env.pid, self.s_env.pid]

    def sockperf(self, host, port, size):
        with _Cpu(self._pids()) as cpu:
            r = self.client.exec(["sockperf", "pp", "--tcp", "-i", host, "-p", str(port),
                                  "-t", str(self.dur["sockperf"]), "-m", str(size), "--full-rtt"],
                                 timeout=self.dur["sockperf"] + 10)
        out = parse.parse_sockperf(r.stdout + r.stderr)
        out["cpu_us_per_req"] = (cpu.seconds * 1e6 / out["sent"]) if out.get("sent") else None
        return out

    def iperf(self, host, port):
        r = self.client.exec(["iperf3", "-c", host, "-p", str(port), "-t", str(self.dur["iperf"]),
                              "--connect-timeout", "3000", "-J"], timeout=self.dur["iperf"] + 8)
        return parse.parse_iperf3(r.stdout or r.stderr)

    def conn_rate(self, host, port):
        """(connections per second, error or None)."""
        return measure_conn_rate(self.client, host, port, self.dur["conn"])

    def run_mode(self, mode, round_index):
        sample = {"mode": mode, "round": round_index, "sizes": {}, "errors": []}
        # A failure in an earlier mode may have killed a server: never blame this mode.
        sample["notes"] = self.ensure_servers()
        try:
            icpt = self.enter(mode)
        except Exception as e:  # noqa: BLE001 - one mode failing must not sink the run
            sample["errors"].append(f"attach: {e}")
            return sample
        try:
            before = (_counter(self.c_env, "tcp.outbound.downstream_cx_total"),
                      _counter(self.s_env, "tcp.inbound.downstream_cx_total"))
            host, ports = targets_for(mode, self.server.ip4)
            for size in self.sizes:
                try:
                    sample["sizes"][str(size)] = self.sockperf(host, ports["sockperf"], size)
                except MeshbpfError as e:
                    sample["errors"].append(f"sockperf {size}B: {e}")
            first = sample["sizes"].get(str(self.sizes[0]))
            sample["cpu_us_per_req"] = first and first.get("cpu_us_per_req")
            try:
                ip = self.iperf(host, ports["iperf"])
                sample["throughput_gbps"], sample["retransmits"] = ip["gbps"], ip["retransmits"]
            except MeshbpfError as e:
                sample["errors"].append(f"iperf3: {e}")
            try:
                sample["conn_per_s"], err = self.conn_rate(host, ports["conn"])
                if err:
                    sample["errors"].append(f"connections: {err}")
            except MeshbpfError as e:
                sample["errors"].append(f"connections: {e}")
            after = (_counter(self.c_env, "tcp.outbound.downstream_cx_total"),
                     _counter(self.s_env, "tcp.inbound.downstream_cx_total"))
            sample["sidecar_connections"] = {
                "client_outbound": None if None in (before[0], after[0]) else after[0] - before[0],
                "server_inbound": None if None in (before[1], after[1]) else after[1] - before[1]}
            sample["errors"] += check_path(mode, sample["sidecar_connections"])
        finally:
            try:
                self.leave(icpt)
            except Exception as e:  # noqa: BLE001
                sample["errors"].append(f"detach: {e}")
        return sample


def check_path(mode, seen):
    """Errors if traffic did not take the path `mode` promises (from sidecar counters)."""
    out, inn = seen.get("client_outbound"), seen.get("server_inbound")
    if out is None or inn is None:
        return ["could not read the sidecars' counters"]
    if mode in ("direct", "explicit"):
        if out or inn:
            return [f"{mode}: traffic was intercepted ({out} outbound, {inn} inbound sidecar "
                    f"connections)"]
        return []
    errs = []
    if out < 1:
        errs.append(f"{mode}: the client sidecar's outbound listener saw no connection "
                    f"(not intercepted)")
    if inn < 1:
        errs.append(f"{mode}: the server sidecar's inbound listener saw no connection "
                    f"(inbound not intercepted)")
    return errs


def run_latency(modes=None, sizes=None, rounds=None, quick=False, duration=None, progress=None):
    """Run the data-path benchmark; returns the result dict (see report.latency_text)."""
    progress = progress or (lambda msg: None)
    modes = list(modes or MODES)
    sizes = list(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    rounds = rounds or (1 if quick else 5)
    if duration is None:
        duration = 1.5 if quick else 5.0
    durations = {"sockperf": max(1, int(round(duration + 0.49))),
                 "iperf": max(1, int(round(duration - 0.49))),
                 "conn": max(0.5, duration * 0.6)}
    from ..testbed import Sandbox
    t0 = time.monotonic()
    samples = []
    with Sandbox(name="benchlat") as sb:
        progress(f"latency: sandbox {sb.id}: starting pods, servers and sidecars")
        b = _Bench(sb, sizes, durations, progress)
        for r in range(rounds):
            for mode in mode_order(modes, r):
                s = b.run_mode(mode, r)
                samples.append(s)
                first = s["sizes"].get(str(sizes[0])) or {}
                msg = (f"latency: round {r + 1}/{rounds} {mode}: p50 {first.get('p50_us', '-')} us, "
                       f"p99 {first.get('p99_us', '-')} us, "
                       f"{(s.get('throughput_gbps') or 0):.2f} Gbit/s, "
                       f"{(s.get('conn_per_s') or 0):.0f} conn/s")
                if s["errors"]:
                    msg += f"; errors: {'; '.join(s['errors'])[:300]}"
                for note in s["notes"]:
                    progress(f"latency: before {mode}: restarted a server: {note}")
                progress(msg)
    result_modes = stats.aggregate_latency(samples, sizes)
    from .report import latency_targets
    return {
        "kind": "latency", "quick": quick, "rounds": rounds, "sizes": sizes, "rtt": True,
        "durations": durations, "modes": result_modes,
        "targets": latency_targets(result_modes),
        "notes": [f"round {s['round'] + 1}, before {s['mode']}: {n}" for s in samples
                  for n in s.get("notes", [])],
        "samples": samples,
        "seconds": time.monotonic() - t0,
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                 "hostname": socket.gethostname()},
    }
