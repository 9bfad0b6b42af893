"""End to end: `meshbpf bench latency --quick` and `bench rules --quick` in the sandbox.

Runs every mode (direct, explicit, iptables, ebpf, ebpf-nosplice) and every rules backend
once, checks the JSON shape and that every figure is a positive number, and that the run
left no namespace, pin or process behind. Timings are never asserted.
"""

import json
import os
import subprocess

import pytest
from click.testing import CliRunner

from meshbpf.bench.commands import bench

pytestmark = pytest.mark.kernel

LATENCY_KEYS = ("p50_us", "p90_us", "p99_us", "p999_us", "conn_per_s", "throughput_gbps")


def _netns():
    """Namespaces of sandboxes this process made (other test runs may be going on)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    mine = f"mbt-{os.getpid()}-"
    return {l.split()[0] for l in r.stdout.splitlines() if l.strip().startswith(mine)}


def _pins():
    mine = f"meshbpf-test-mbt-{os.getpid()}-"
    return {p for p in os.listdir("/sys/fs/bpf") if p.startswith(mine)}


def _run(args):
    r = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_latency_quick_json(tmp_path):
    before_ns, before_pins = _netns(), _pins()
    out = tmp_path / "lat"
    res = _run(["latency", "--quick", "-o", "json", "--out", str(out)])
    assert set(res["modes"]) == {"direct", "explicit", "iptables", "ebpf", "ebpf-nosplice"}
    for mode, m in res["modes"].items():
        assert m["errors"] == [], (mode, m["errors"])
        for k in LATENCY_KEYS:
            assert isinstance(m[k], (int, float)) and m[k] > 0, (mode, k, m[k])
        assert m["p50_us"] <= m["p90_us"] <= m["p99_us"] <= m["p999_us"]
        assert m["ratio_to_direct"]["p50_us"] > 0
    assert res["modes"]["direct"]["ratio_to_direct"]["p50_us"] == 1
    # every sample proved its path: interception modes went through both sidecars
    for s in res["samples"]:
        seen = s["sidecar_connections"]
        if s["mode"] in ("direct", "explicit"):
            assert seen == {"client_outbound": 0, "server_inbound": 0}
        else:
            assert seen["client_outbound"] > 0 and seen["server_inbound"] > 0
    assert {t["met"] for t in res["targets"]} <= {True, False}
    for name in ("latency.json", "latency.md", "latency.png"):
        assert (out / name).stat().st_size > 0
    assert _netns() - before_ns == set()
    assert _pins() - before_pins == set()


def test_rules_quick_json(tmp_path):
    """`bench rules --quick` through the CLI: every op of every backend timed through the
    service layer (its phase timings are in the result, its records were created for
    every bench pod and removed again), enroll measured at 1 and 10 pods, the data plane
    through a client enrolled by the service."""
    from meshbpf.bench import rules
    before_ns, before_pins = _netns(), _pins()
    res = _run(["rules", "--quick", "-o", "json", "--out", str(tmp_path)])
    assert res["errors"] == []
    assert res["path"] == "meshbpf.service.NodeService" and res["pods"] == rules.QUICK_PODS
    backends = ("ebpf", "iptables-nft", "iptables-legacy")
    got = {(r["backend"], r["op"], r["n"]): r for r in res["results"]}
    for backend in backends:
        for op in rules.OPS:
            for n in rules.QUICK_NS:
                assert (backend, op, n) in got, (backend, op, n)
    for r in res["results"]:
        assert isinstance(r["seconds"], float) and r["seconds"] > 0
        assert r["ratio_to_ebpf"] > 0
        if r["op"] in ("enroll-pod", "add-entry", "remove-entry"):
            # the service's own timings came back from attach / update
            assert r["phases"].get("total", 0) > 0, r
            assert r["phases"]["total"] <= r["seconds"] * 1.05, r
    for n in rules.QUICK_NS:
        eb = got[("ebpf", "enroll-pod", n)]["phases"]
        assert {"maps", "records"} <= set(eb), eb      # the eBPF path wrote maps
        assert got[("ebpf", "enroll-pod", n)]["pods"] == rules.QUICK_PODS
    by = {(r["backend"], r["op"], r["pods"]) for r in res["by_pods"]}
    for backend in backends:
        for pods in rules.pod_steps(rules.QUICK_PODS):
            assert (backend, "enroll-pod", pods) in by and (backend, "detach-pod", pods) in by
    # the service created a record for every bench pod and removed them all
    for backend in backends:
        ev = res["service"][backend]
        assert ev["records_enrolled"] == rules.QUICK_PODS, (backend, ev)
        assert ev["records_after"] == 0, (backend, ev)
        assert ev["attached"] == ev["detached"] > rules.QUICK_PODS, (backend, ev)
    names = {t["name"] for t in res["targets"]}
    assert any(n.startswith("eBPF enroll-pod at most 5 ms") for n in names)
    assert any(n.startswith("eBPF enroll flat from 1 to 10 pods") for n in names)
    assert {t["met"] for t in res["targets"]} <= {True, False}
    assert {(r["op"], r["backend"]) for r in res["ratios"]} == {
        (op, b) for op in rules.OPS for b in backends[1:]}
    dp = {(r["backend"], r["n"]) for r in res["dataplane"] if r["conn_per_s"] and r["conn_per_s"] > 0}
    for backend in backends:
        assert (backend, 20000) in dp
    for r in res["dataplane"]:
        if r["backend"] != "none":          # the client was enrolled by the service, in that mode
            assert r["impl"] == "service:" + r["backend"].split("-")[0], r
    for name in ("rules.json", "rules.md", "rules.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert _netns() - before_ns == set()
    assert _pins() - before_pins == set()
