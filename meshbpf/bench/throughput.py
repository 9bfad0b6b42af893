"""Bulk throughput and a soak, per mode, with the node's peak TCP memory beside every figure.

The latency benchmark's sandbox (client and server pods, Istio-like Envoy sidecars as uid
1337): app -> client Envoy -> server Envoy -> app, every hop on one node.
- `run_throughput`: per mode, `runs` iperf3 transfers of at least 10 s each, interleaved
  across modes; each run's completion, Gbit/s (as the receiver counted it) and the peak rise
  of the node's TCP memory (`tcpmem`, tcp_memory_allocated) while it ran.
- `run_soak`: per mode, `flows` parallel bulk streams and a request/response load at once for
  `seconds`; errors of either and the peak TCP memory.
Targets (reported met/missed by report.throughput_targets, never asserted): every transfer
completes; eBPF's peak TCP memory at most twice iptables' for the same flows; eBPF's
throughput at least 2.5x iptables'.
"""

import statistics
import time

from ..errors import MeshbpfError
from . import parse, tcpmem
from .latency import IPERF_PORT, SOCKPERF_PORT, _Bench, targets_for

MODES = ("iptables", "ebpf")
MIN_SECONDS = 10


def _settle():
    """Sockets of the previous run gone, so each peak is the run's own."""
    tcpmem.wait_settled(tcpmem.tcp_mem_pages() // 2 + 200, timeout=5)


def _iperf(bench, mode, seconds, streams=1):
    host, ports = targets_for(mode, bench.server.ip4)
    r = bench.client.exec(["iperf3", "-c", host, "-p", str(ports["iperf"]), "-t", str(seconds),
                           "-P", str(streams), "--connect-timeout", "3000", "-J"],
                          timeout=seconds + 60)
    try:
        out = parse.parse_iperf3(r.stdout or r.stderr)
        return {"ok": True, "gbps": out["gbps"], "error": None}
    except MeshbpfError as e:
        return {"ok": False, "gbps": None, "error": str(e)}


def _summary(runs):
    done = [r for r in runs if r["ok"]]
    g = [r["gbps"] for r in done]
    return {"runs": len(runs), "completed": len(done),
            "gbps": statistics.median(g) if g else None,
            "gbps_min": min(g) if g else None, "gbps_max": max(g) if g else None,
            "peak_tcp_pages": max((r["peak_pages"] for r in runs), default=None),
            "errors": [r["error"] for r in runs if r["error"]]}


def run_throughput(modes=None, runs=3, seconds=MIN_SECONDS, progress=None):
    progress = progress or (lambda msg: None)
    modes = list(modes or MODES)
    t0 = time.monotonic()
    samples = {m: [] for m in modes}
    from ..testbed import Sandbox
    with Sandbox(name="benchtput") as sb:
        progress(f"throughput: sandbox {sb.id}: starting pods, servers and sidecars")
        bench = _Bench(sb, [64], {"sockperf": 1, "iperf": seconds, "conn": 1}, progress)
        for i in range(runs):
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                bench.ensure_servers()
                icpt = bench.enter(mode)
                try:
                    _settle()
                    with tcpmem.PeakSampler() as s:
                        r = _iperf(bench, mode, seconds)
                    r["peak_pages"] = s.rise
                finally:
                    bench.leave(icpt)
                samples[mode].append(r)
                progress(f"throughput: run {i + 1}/{runs} {mode}: "
                         + (f"{r['gbps']:.2f} Gbit/s" if r["ok"] else f"FAILED: {r['error']}")
                         + f", peak TCP memory +{r['peak_pages']} pages")
    result = {"kind": "throughput", "seconds": seconds, "runs": runs,
              "modes": {m: _summary(samples[m]) for m in modes}, "samples": samples,
              "wall_seconds": time.monotonic() - t0}
    from .report import throughput_targets
    result["targets"] = throughput_targets(result)
    return result


def run_soak(modes=None, seconds=60, flows=4, progress=None):
    progress = progress or (lambda msg: None)
    modes = list(modes or MODES)
    t0 = time.monotonic()
    out = {}
    from ..testbed import Sandbox
    with Sandbox(name="benchsoak") as sb:
        progress(f"soak: sandbox {sb.id}: starting pods, servers and sidecars")
        bench = _Bench(sb, [64], {"sockperf": seconds, "iperf": seconds, "conn": 1}, progress)
        for mode in modes:
            bench.ensure_servers()
            icpt = bench.enter(mode)
            errors = []
            try:
                _settle()
                host, ports = targets_for(mode, bench.server.ip4)
                progress(f"soak: {mode}: {flows} bulk streams and request/response for {seconds} s")
                with tcpmem.PeakSampler() as s:
                    bulk = bench.client.spawn(
                        ["iperf3", "-c", host, "-p", str(ports["iperf"]), "-t", str(seconds),
                         "-P", str(flows), "--connect-timeout", "3000", "-J"], label="soak-iperf")
                    rr = bench.client.exec(
                        ["sockperf", "pp", "--tcp", "-i", host, "-p", str(ports["sockperf"]),
                         "-t", str(seconds), "-m", "1024", "--full-rtt"], timeout=seconds + 60)
                    bulk.wait(timeout=seconds + 60)
                try:
                    ip = parse.parse_iperf3(bulk.output())
                except MeshbpfError as e:
                    ip = None
                    errors.append(f"bulk: {e}")
                try:
                    sp = parse.parse_sockperf(rr.stdout + rr.stderr)
                except MeshbpfError as e:
                    sp = None
                    errors.append(f"request/response: {e}")
            finally:
                bench.leave(icpt)
            out[mode] = {"flows": flows, "gbps": ip and ip["gbps"],
                         "rr_p99_us": sp and sp.get("p99_us"), "rr_sent": sp and sp.get("sent"),
                         "peak_tcp_pages": s.rise, "errors": errors}
            progress(f"soak: {mode}: {'ok' if not errors else '; '.join(errors)}, "
                     f"peak TCP memory +{s.rise} pages")
    result = {"kind": "soak", "seconds": seconds, "flows": flows, "modes": out,
              "wall_seconds": time.monotonic() - t0}
    from .report import soak_targets
    result["targets"] = soak_targets(result)
    return result


__all__ = ["run_throughput", "run_soak", "IPERF_PORT", "SOCKPERF_PORT"]
