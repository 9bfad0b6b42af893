"""The agent's metrics without root: a fake BPF counters source injected into the collector,
the exposition parsed back with prometheus_client's own parser, and the HTTP endpoints
served on loopback."""

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshbpf.agent import metrics as metrics_mod
from meshbpf.agent.metrics import BpfSource, Metrics, parse_addr
from meshbpf.ebpf import structs
from meshbpf.errors import MeshbpfError, NotFoundError, UsageError


class FakeSource:
    """Stands in for the pinned maps: returns what the test set, counts the reads."""

    def __init__(self, snapshot=None, error=None):
        self.snapshot, self.error, self.reads = snapshot, error, 0

    def read(self):
        self.reads += 1
        if self.error:
            raise self.error
        return self.snapshot


def counters(**values):
    """Every counter the BPF programs keep (0), with `values` set."""
    out = {name: 0 for name in structs.COUNTERS}
    out.update(values)
    return out


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def scrape(m):
    """{family name: family} as a Prometheus server would parse /metrics."""
    from prometheus_client import generate_latest
    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, family, sample=None, **labels):
    """The value of the one sample of `family` named `sample` with exactly these labels."""
    fam = fams[family]
    name = sample or (family + "_total" if fam.type == "counter" else family)
    hits = [s.value for s in fam.samples if s.name == name and s.labels == labels]
    assert len(hits) == 1, (family, name, labels, fam.samples)
    return hits[0]


@pytest.fixture
def served():
    made = []

    def make(**kw):
        m = Metrics("/sys/fs/bpf/meshbpf-test-unit-none", bpf_source=kw.pop("source", FakeSource()),
                    **kw)
        host, port = m.serve("127.0.0.1:0")
        made.append(m)
        return m, f"http://{host}:{port}"

    yield make
    for m in made:
        m.close()


def get(url):
    """(status, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---- the data path's families -------------------------------------------------------------
def test_bpf_counters_are_exposed_as_counters_with_their_labels():
    src = FakeSource({"counters": counters(redirect_out=7, redirect_in=3, splice_bytes=4096,
                                           splice_msgs=12, orig_dst_answered=6, orig_dst_miss=1,
                                           bypass_proxy=5, bypass_rule=2, inbound_bypass=4,
                                           conn_refused=9, pairs_full=8),
                      "fill": {"orig_dst": 0.25, "pods": 0.5}})
    fams = scrape(Metrics("/nonexistent", bpf_source=src))
    for name in ("meshbpf_connections_redirected", "meshbpf_spliced_bytes",
                 "meshbpf_spliced_messages", "meshbpf_original_dst_answers",
                 "meshbpf_original_dst_misses", "meshbpf_bypassed", "meshbpf_map_full"):
        assert fams[name].type == "counter", (name, fams[name].type)
    assert value(fams, "meshbpf_connections_redirected", direction="out") == 7
    assert value(fams, "meshbpf_connections_redirected", direction="in") == 3
    assert value(fams, "meshbpf_spliced_bytes") == 4096
    assert value(fams, "meshbpf_spliced_messages") == 12
    assert value(fams, "meshbpf_original_dst_answers") == 6
    assert value(fams, "meshbpf_original_dst_misses") == 1
    assert value(fams, "meshbpf_bypassed", reason="proxy") == 5
    assert value(fams, "meshbpf_bypassed", reason="rule") == 2
    assert value(fams, "meshbpf_bypassed", reason="inbound_port") == 4
    assert value(fams, "meshbpf_map_full", map="orig_dst") == 9
    assert value(fams, "meshbpf_map_full", map="pairs") == 8
    assert fams["meshbpf_map_fill_ratio"].type == "gauge"
    assert value(fams, "meshbpf_map_fill_ratio", map="orig_dst") == 0.25
    assert value(fams, "meshbpf_map_fill_ratio", map="pods") == 0.5


def test_bpf_counters_are_read_at_each_scrape():
    src = FakeSource({"counters": counters(redirect_out=1), "fill": {}})
    m = Metrics("/nonexistent", bpf_source=src)
    assert value(scrape(m), "meshbpf_connections_redirected", direction="out") == 1
    src.snapshot = {"counters": counters(redirect_out=5), "fill": {}}
    assert value(scrape(m), "meshbpf_connections_redirected", direction="out") == 5
    assert src.reads == 2


def test_nothing_pinned_means_no_bpf_families_but_the_agent_ones_serve():
    fams = scrape(Metrics("/nonexistent", bpf_source=FakeSource(None)))
    assert not [n for n in fams if n in ("meshbpf_connections_redirected", "meshbpf_map_fill_ratio",
                                         "meshbpf_spliced_bytes", "meshbpf_map_full")]
    assert value(fams, "meshbpf_build_info", version=metrics_mod.__version__,
                 kernel=__import__("os").uname().release) == 1


def test_the_real_source_reads_nothing_from_a_prefix_with_no_pins(tmp_path):
    assert BpfSource(str(tmp_path / "absent")).read() is None
    fams = scrape(Metrics(str(tmp_path / "absent")))
    assert "meshbpf_connections_redirected" not in fams and "meshbpf_build_info" in fams


@pytest.mark.parametrize("error", [NotFoundError("pinned map gone"), PermissionError(1, "no")])
def test_unreadable_pins_drop_the_bpf_families_not_the_scrape(error):
    fams = scrape(Metrics("/nonexistent", bpf_source=FakeSource(error=error)))
    assert "meshbpf_connections_redirected" not in fams
    assert "meshbpf_pod_operations" in fams


# ---- the agent's own families -------------------------------------------------------------
def test_operation_errors_are_counted_by_reason_and_durations_observed():
    m = Metrics("/nonexistent", bpf_source=FakeSource())
    m.op("attach", True, None, 0.002)
    m.op("attach", False, "netns_gone", 0.001)
    m.op("attach", False, "netns_gone", 0.003)
    m.op("update", False, "ApplyError", 0.5)
    m.op("detach", True, None, None)
    fams = scrape(m)
    assert value(fams, "meshbpf_pod_operations", op="attach", result="ok") == 1
    assert value(fams, "meshbpf_pod_operations", op="attach", result="error") == 2
    assert value(fams, "meshbpf_pod_operations", op="update", result="error") == 1
    assert value(fams, "meshbpf_pod_operations", op="detach", result="ok") == 1
    assert value(fams, "meshbpf_pod_operation_errors", op="attach", reason="netns_gone") == 2
    assert value(fams, "meshbpf_pod_operation_errors", op="update", reason="ApplyError") == 1
    h = "meshbpf_pod_operation_duration_seconds"
    assert fams[h].type == "histogram"
    assert value(fams, h, h + "_count", op="attach") == 3
    assert value(fams, h, h + "_sum", op="attach") == pytest.approx(0.006)
    assert value(fams, h, h + "_bucket", op="attach", le="0.0016") == 1
    assert value(fams, h, h + "_count", op="update") == 1


def test_an_unknown_operation_is_refused():
    m = Metrics("/nonexistent", bpf_source=FakeSource())
    with pytest.raises(ValueError):
        m.op("enroll", True, None, 0.1)
    fams = scrape(m)
    assert not [s for f in ("meshbpf_pod_operations", "meshbpf_pod_operation_errors")
                for s in (fams[f].samples if f in fams else ()) if s.labels.get("op") == "enroll"]


def test_reconcile_duration_and_pods_by_mode_and_state():
    m = Metrics("/nonexistent", bpf_source=FakeSource())
    m.reconcile_done(0.25, {("ebpf", "attached"): 3, ("ebpf", "failed"): 1})
    m.reconcile_done(0.75, {("ebpf", "attached"): 4})
    fams = scrape(m)
    h = "meshbpf_reconcile_duration_seconds"
    assert fams[h].type == "histogram"
    assert value(fams, h, h + "_count") == 2
    assert value(fams, h, h + "_sum") == 1.0
    assert value(fams, h, h + "_bucket", le="0.256") == 1
    assert value(fams, "meshbpf_pods", mode="ebpf", state="attached") == 4
    assert value(fams, "meshbpf_pods", mode="ebpf", state="failed") == 0


def test_mode_features_and_build_info():
    m = Metrics("/nonexistent", bpf_source=FakeSource())
    m.set_mode("iptables")
    m.set_mode("ebpf")
    m.set_features({"kernel": "6.1.0", "features": {"sk_lookup": {"ok": True, "detail": "x"},
                                                    "getsockopt": {"ok": False, "detail": "y"}}})
    fams = scrape(m)
    assert [(s.labels, s.value) for s in fams["meshbpf_mode"].samples] == [({"mode": "ebpf"}, 1)]
    assert value(fams, "meshbpf_kernel_feature", feature="sk_lookup") == 1
    assert value(fams, "meshbpf_kernel_feature", feature="getsockopt") == 0
    assert len(fams["meshbpf_build_info"].samples) == 1


# ---- HTTP ---------------------------------------------------------------------------------
def test_readyz_is_503_until_set_ready(served):
    m, url = served()
    code, body = get(url + "/readyz")
    assert code == 503 and "reconcile" in body
    m.set_ready(True)
    assert get(url + "/readyz")[0] == 200
    m.set_ready(False)
    assert get(url + "/readyz")[0] == 503


def test_healthz_turns_503_when_the_loop_stops_beating(served):
    clock = Clock()
    m, url = served(clock=clock)
    assert get(url + "/healthz")[0] == 200
    clock.t += metrics_mod.HEARTBEAT_TIMEOUT - 1
    assert get(url + "/healthz")[0] == 200
    clock.t += 2
    code, body = get(url + "/healthz")
    assert code == 503 and "heartbeat" in body
    m.heartbeat()
    assert get(url + "/healthz")[0] == 200
    clock.t += metrics_mod.HEARTBEAT_TIMEOUT
    m.reconcile_done(0.1, {})           # a finished reconcile is a heartbeat too
    assert get(url + "/healthz")[0] == 200


def test_metrics_endpoint_serves_the_exposition(served):
    src = FakeSource({"counters": counters(redirect_out=2), "fill": {"orig_dst": 0.0}})
    m, url = served(source=src)
    m.op("repair", True, None, 0.01)
    code, body = get(url + "/metrics")
    assert code == 200
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    assert value(fams, "meshbpf_connections_redirected", direction="out") == 2
    assert value(fams, "meshbpf_pod_operations", op="repair", result="ok") == 1
    assert get(url + "/nope")[0] == 404


def test_close_stops_the_server(served):
    m, url = served()
    assert get(url + "/healthz")[0] == 200
    m.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=2)


def test_a_taken_port_is_a_clear_error():
    a = Metrics("/nonexistent", bpf_source=FakeSource())
    _, port = a.serve("127.0.0.1:0")
    try:
        b = Metrics("/nonexistent", bpf_source=FakeSource())
        with pytest.raises(UsageError, match="cannot serve metrics"):
            b.serve(f"127.0.0.1:{port}")
    finally:
        a.close()


@pytest.mark.parametrize("addr,want", [(":9841", ("", 9841)), ("127.0.0.1:0", ("127.0.0.1", 0)),
                                       ("[::1]:9841", ("::1", 9841)), ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_parse_addr(addr, want):
    assert parse_addr(addr) == want


@pytest.mark.parametrize("addr", ["9841", "host:", ":99999", ":x", "::1:9841", "example.org:80"])
def test_parse_addr_refuses_bad_input(addr):
    with pytest.raises(UsageError) as e:
        parse_addr(addr)
    assert isinstance(e.value, MeshbpfError) and str(e.value)


def test_fill_ratios_from_the_service_status():
    status = {"pods": [{"id": "a", "state": "attached"}, {"id": "b", "state": "stale"},
                       {"id": "c", "state": "attached"}],
              "ebpf": {"connections": {"held": 32768, "capacity": 131072, "pod_limit": None}}}
    assert metrics_mod.fill_ratios(status, 1024) == {"orig_dst": 0.25, "pods": 2 / 1024}
    # not loaded (no connections known) and no pods map: no ratio rather than a made-up one
    assert metrics_mod.fill_ratios({"pods": [], "ebpf": {"loaded": False}}, None) == {}
