"""The agent's Prometheus metrics and its health endpoints (`--metrics-addr`).

Two kinds of families live in one registry:

- the agent's own, updated by the reconcile loop as it works: the mode, pods by mode and
  state, pod operations and their errors by reason, reconcile and per-operation duration
  histograms (named after kube-proxy's `sync_proxy_rules_duration_seconds`), kernel
  features and build info;
- the data path's, read from the pinned BPF maps at scrape time by `BpfCollector`: the
  per-CPU counters (summed over CPUs, exposed as counters, never gauges) and map fill
  ratios. A scrape reads the maps by key only, never walks them, so its cost does not
  grow with the connections a node holds. With nothing pinned (iptables mode) these
  families are absent rather than zero.

`Metrics.serve(addr)` runs a small HTTP server in a background thread: /metrics, /healthz
(200 while the loop heartbeats), /readyz (503 until the first full reconcile).
"""

import http.server
import ipaddress
import logging
import os
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from .. import __version__
from ..errors import MeshbpfError, UsageError

log = logging.getLogger(__name__)

OPS = ("attach", "update", "detach", "repair")
MODES = ("ebpf", "iptables")
# /healthz turns 503 when the loop has not beaten for this long: a wedged loop (a hung
# syscall, a deadlock) is restarted by the kubelet instead of serving stale pods forever.
HEARTBEAT_TIMEOUT = 60.0

# kube-proxy's sync_proxy_rules_duration_seconds buckets (1 ms .. 16 s): a full reconcile.
RECONCILE_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
# One pod's map updates take ~100 us, an iptables-restore ~10 ms: start ten times lower.
OP_BUCKETS = tuple(0.0001 * 2 ** i for i in range(18))

# BPF counter (meshbpf.ebpf.structs.COUNTERS name) -> (family, label value) for the
# labelled families; the unlabelled ones map one counter each.
REDIRECTED = {"redirect_out": "out", "redirect_in": "in"}
BYPASSED = {"bypass_proxy": "proxy", "bypass_rule": "rule", "inbound_bypass": "inbound_port"}
# conn_refused: no room in orig_dst (or the pod's share of it, pod_conns); pairs_full: no
# room in pairs, so the sidecar's SO_ORIGINAL_DST gets no answer.
MAP_FULL = {"conn_refused": "orig_dst", "pairs_full": "pairs"}
INBOUND_DROPPED = {"inbound_no_listener": "no_listener", "inbound_unsteerable": "unsteerable"}
SINGLE = {
    "splice_bytes": ("meshbpf_spliced_bytes_total",
                     "Bytes moved socket to socket by sk_msg, skipping the TCP/IP stack."),
    "splice_msgs": ("meshbpf_spliced_messages_total",
                    "Messages moved socket to socket by sk_msg."),
    "orig_dst_answered": ("meshbpf_original_dst_answers_total",
                          "SO_ORIGINAL_DST questions answered from the map."),
    "orig_dst_miss": ("meshbpf_original_dst_misses_total",
                      "SO_ORIGINAL_DST questions about a socket the map knows nothing of."),
}


def bpf_families(snapshot):
    """The data path's metric families from a snapshot (pure).

    `snapshot`: None (nothing pinned: no families) or {"counters": {name: total},
    "fill": {map: ratio}} as BpfSource.read() returns it.
    """
    if not snapshot:
        return []
    counters = snapshot.get("counters") or {}
    out = []

    def labelled(name, doc, label, table):
        fam = CounterMetricFamily(name, doc, labels=[label])
        for counter, value in table.items():
            if counter in counters:
                fam.add_metric([value], counters[counter])
        if fam.samples:
            out.append(fam)

    labelled("meshbpf_connections_redirected_total",
             "Connections steered into the sidecar: out (connect rewritten to the outbound "
             "listener), in (inbound SYN steered to the inbound listener).",
             "direction", REDIRECTED)
    for counter, (name, doc) in SINGLE.items():
        if counter in counters:
            out.append(CounterMetricFamily(name, doc, value=counters[counter]))
    labelled("meshbpf_bypassed_total",
             "Connections left alone: proxy (the sidecar's own uid/gid), rule (outbound "
             "include/exclude CIDRs and ports), inbound_port (an inbound port the policy leaves alone).",
             "reason", BYPASSED)
    labelled("meshbpf_map_full_total",
             "Connections refused (fail closed) because a connection map had no room.",
             "map", MAP_FULL)
    labelled("meshbpf_inbound_dropped_total",
             "Inbound packets to a captured port dropped: no_listener (no inbound listener "
             "in the pod), unsteerable (a packet that cannot be steered, e.g. a fragment).",
             "reason", INBOUND_DROPPED)
    fill = snapshot.get("fill") or {}
    if fill:
        fam = GaugeMetricFamily("meshbpf_map_fill_ratio",
                                "Entries in use over max_entries, per BPF map (0..1).",
                                labels=["map"])
        for name in sorted(fill):
            fam.add_metric([name], fill[name])
        out.append(fam)
    return out


class BpfSource:
    """Reads the pinned data path of one pin prefix at scrape time."""

    def __init__(self, pin_prefix):
        self.pin_prefix = pin_prefix

    def read(self):
        """{"counters", "fill"}, or None when nothing is pinned under the prefix."""
        from ..ebpf.maps import Maps
        maps = Maps(self.pin_prefix)
        if not maps.exists("counters"):
            return None
        with maps:
            counters = maps.counters()
            pods_max = maps["pods"].info.get("max_entries") if maps.exists("pods") else None
        return {"counters": counters, "fill": self._fill(pods_max)}

    def _fill(self, pods_max):
        # The service's status sums pod_conns over the recorded pods (lookups by key)
        # instead of walking orig_dst, whose size is what a busy node grows.
        from ..service import NodeService
        return fill_ratios(NodeService(self.pin_prefix, mode="ebpf").status(), pods_max)


def fill_ratios(status, pods_max):
    """{map: used / max_entries} from NodeService.status() and the pods map's max_entries
    (pure): orig_dst from the connections the recorded pods hold, pods from the pods the
    status finds attached."""
    fill = {}
    conns = (status.get("ebpf") or {}).get("connections") or {}
    if conns.get("capacity"):
        fill["orig_dst"] = (conns.get("held") or 0) / conns["capacity"]
    if pods_max:
        enrolled = sum(1 for p in status.get("pods", []) if p.get("state") == "attached")
        fill["pods"] = enrolled / pods_max
    return fill


class BpfCollector:
    """A custom collector: the BPF families, read when Prometheus scrapes."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        # Nothing to declare up front: registering must not touch the kernel.
        return []

    def collect(self):
        try:
            snapshot = self.source.read()
        except (MeshbpfError, OSError) as e:
            # Pins removed mid-scrape (cleanup, an upgrade): the agent's own families
            # still serve; the data path's are absent for this scrape.
            log.warning("BPF counters not readable: %s", e)
            return
        yield from bpf_families(snapshot)


def parse_addr(addr):
    """'host:port', '[v6]:port' or ':port' -> (host, port); UsageError when malformed."""
    text = str(addr).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"metrics address {addr!r} has no port",
                         hint="use host:port, [ipv6]:port or :port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"metrics address {addr!r}: write an IPv6 host in brackets",
                         hint="e.g. [::1]:9841")
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"metrics address {addr!r}: port must be a number 0-65535")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"metrics address {addr!r}: {host!r} is not an IP address",
                             hint="use an address of this node, or :port for all")
    return host, port


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class Metrics:
    """The agent's registry, its families and the HTTP endpoints that serve them."""

    def __init__(self, pin_prefix, registry=None, bpf_source=None, clock=time.monotonic):
        self.pin_prefix = pin_prefix
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._ready = False
        self._beat = clock()
        self._server = self._thread = None
        self._pod_labels = set()
        r = self.registry
        self.mode = Gauge("meshbpf_mode", "The data path mode the node runs (1 for it).",
                          ["mode"], registry=r)
        self.pods = Gauge("meshbpf_pods", "Pods the agent knows, by mode and state.",
                          ["mode", "state"], registry=r)
        self.ops = Counter("meshbpf_pod_operations_total",
                           "Pod operations (attach, update, detach, repair) by result.",
                           ["op", "result"], registry=r)
        self.op_errors = Counter("meshbpf_pod_operation_errors_total",
                                 "Failed pod operations by reason.", ["op", "reason"], registry=r)
        self.reconcile_seconds = Histogram(
            "meshbpf_reconcile_duration_seconds",
            "Time of one full reconcile of the node (desired pods against the kernel).",
            buckets=RECONCILE_BUCKETS, registry=r)
        self.op_seconds = Histogram(
            "meshbpf_pod_operation_duration_seconds",
            "Time of one pod operation's map updates (eBPF) or rule apply (iptables).",
            ["op"], buckets=OP_BUCKETS, registry=r)
        self.features = Gauge("meshbpf_kernel_feature",
                              "Kernel features meshbpf probed: 1 present, 0 missing.",
                              ["feature"], registry=r)
        self.build = Gauge("meshbpf_build_info", "meshbpf's version and the running kernel.",
                           ["version", "kernel"], registry=r)
        self.build.labels(__version__, os.uname().release).set(1)
        r.register(BpfCollector(bpf_source if bpf_source is not None else BpfSource(pin_prefix)))

    # ---- what the loop reports ----------------------------------------------------------
    def op(self, kind, ok, reason=None, seconds=None):
        """One pod operation finished: `kind` attach|update|detach|repair; `reason` names
        the failure (an error class, "netns_gone", ...) when not ok."""
        if kind not in OPS:
            raise ValueError(f"unknown pod operation {kind!r} (one of {', '.join(OPS)})")
        self.ops.labels(kind, "ok" if ok else "error").inc()
        if not ok:
            self.op_errors.labels(kind, str(reason or "unknown")).inc()
        if seconds is not None:
            self.op_seconds.labels(kind).observe(seconds)

    def reconcile_done(self, seconds, pods_by_state):
        """A full reconcile took `seconds`; `pods_by_state` {(mode, state): n} replaces the
        pod counts (a mode/state seen before and absent now reads 0, not a stale value)."""
        self.reconcile_seconds.observe(seconds)
        self.pods_changed(pods_by_state)

    def pods_changed(self, pods_by_state):
        """A pass over some pods (a file change, a retry, a slice of the drift check) is
        done: the pod counts as `reconcile_done` sets them, and a heartbeat."""
        now = {(str(m), str(s)): n for (m, s), n in pods_by_state.items()}
        for key in self._pod_labels - set(now):
            self.pods.labels(*key).set(0)
        for key, n in now.items():
            self.pods.labels(*key).set(n)
        self._pod_labels |= set(now)
        self.heartbeat()

    def set_mode(self, mode):
        self.mode.clear()
        self.mode.labels(str(mode)).set(1)

    def set_features(self, probe_report):
        """Kernel features from a meshbpf.probe.probe() report ({"features": {name: {"ok"}}})."""
        self.features.clear()
        for name, f in sorted((probe_report or {}).get("features", {}).items()):
            self.features.labels(name).set(1 if f.get("ok") else 0)

    def set_ready(self, ready):
        self._ready = bool(ready)

    def heartbeat(self):
        self._beat = self._clock()

    # ---- health -------------------------------------------------------------------------
    def health(self):
        """(healthy, why): the loop beat within HEARTBEAT_TIMEOUT seconds."""
        age = self._clock() - self._beat
        if age >= HEARTBEAT_TIMEOUT:
            return False, f"no heartbeat from the reconcile loop for {age:.0f} s"
        return True, "ok"

    def ready(self):
        return (True, "ok") if self._ready else (False, "the first full reconcile has not finished")

    # ---- HTTP ---------------------------------------------------------------------------
    def serve(self, addr):
        """Serve /metrics, /healthz and /readyz on `addr` from a background thread; returns
        the bound (host, port) (port 0 picks a free one)."""
        if self._server is not None:
            raise UsageError("the metrics server is already running")
        host, port = parse_addr(addr)
        cls = _Server6 if host and ":" in host else _Server
        try:
            server = cls((host, port), _handler(self))
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {addr}: {os.strerror(e.errno) if e.errno else e}",
                             hint="pick another --metrics-addr")
        self._beat = self._clock()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="meshbpf-metrics",
                                        daemon=True)
        self._thread.start()
        return server.server_address[:2]

    def close(self):
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5)
        self._thread = None


def _handler(metrics):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept"))
                try:
                    body = encoder(metrics.registry)
                except Exception as e:       # a scrape must not kill the server thread
                    log.exception("metrics scrape failed")
                    return self._send(500, f"scrape failed: {e}\n".encode(), "text/plain")
                return self._send(200, body, ctype)
            if path in ("/healthz", "/readyz"):
                ok, why = (metrics.health if path == "/healthz" else metrics.ready)()
                return self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

        def _send(self, code, body, ctype):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            log.debug("metrics http: " + fmt, *args)

    return Handler
