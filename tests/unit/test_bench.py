"""The benchmark harness's pure parts, on outputs recorded from real sockperf and iperf3 runs.

Recorded in tests/data/bench/ on this project's machine: sockperf 3.7 `pp --tcp` with and
without --full-rtt (64 and 1024 bytes), a refused connection, and `iperf3 -J` over
loopback in a throwaway netns plus a refused connection.
"""

import json
import os
import struct

import pytest
from click.testing import CliRunner

from meshbpf.bench import charts, latency, parse, report, rules, stats
from meshbpf.bench.commands import bench
from meshbpf.config import InterceptConfig

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "bench")


def read(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


# ---- parse ------------------------------------------------------------------------------

def test_sockperf_full_rtt_percentiles():
    out = parse.parse_sockperf(read("sockperf_pp_fullrtt_64.out"))
    assert out["rtt"] is True
    assert out["p50_us"] == 55.252
    assert out["p90_us"] == 64.496
    assert out["p99_us"] == 80.870
    assert out["p999_us"] == 116.663
    assert out["p9999_us"] == 875.593
    assert out["max_us"] == 1799.985 and out["min_us"] == 11.437
    assert out["avg_us"] == 52.411 and out["stddev_us"] == 21.168
    assert out["observations"] == 29570
    assert (out["sent"], out["received"], out["run_s"]) == (41498, 41497, 2.0)
    assert out["valid_sent"] == 29570
    assert out["dropped"] == out["duplicated"] == out["out_of_order"] == 0


def test_sockperf_one_way_and_1024_bytes_are_ordered():
    one = parse.parse_sockperf(read("sockperf_pp_oneway_64.out"))
    assert one["rtt"] is False and one["p50_us"] == 28.011
    big = parse.parse_sockperf(read("sockperf_pp_fullrtt_1024.out"))
    assert big["rtt"] is True
    keys = ["p25_us", "p50_us", "p75_us", "p90_us", "p99_us", "p999_us", "p9999_us"]
    vals = [big[k] for k in keys]
    assert vals == sorted(vals) and all(v > 0 for v in vals)


def test_sockperf_refused_is_an_error_even_with_exit_0():
    with pytest.raises(parse.BenchParseError, match="Connection refused"):
        parse.parse_sockperf(read("sockperf_pp_refused.out"))


def test_sockperf_without_percentiles_is_an_error():
    with pytest.raises(parse.BenchParseError, match="no latency percentiles"):
        parse.parse_sockperf("sockperf: Test ended\n")


def test_iperf3_ok():
    out = parse.parse_iperf3(read("iperf3_ok.json"))
    assert out["gbps"] == pytest.approx(34.20986682048888)
    assert out["gbps_sent"] == pytest.approx(34.216793719343273)
    assert out["retransmits"] == 48
    assert out["bytes_received"] == 8554938368
    assert out["cpu_host_pct"] == pytest.approx(98.23216600389965)
    # also accepts the decoded dict
    assert parse.parse_iperf3(json.loads(read("iperf3_ok.json")))["gbps"] == out["gbps"]


def test_iperf3_errors():
    with pytest.raises(parse.BenchParseError, match="Connection refused"):
        parse.parse_iperf3(read("iperf3_refused.json"))
    with pytest.raises(parse.BenchParseError, match="not JSON"):
        parse.parse_iperf3("iperf3: error - something")
    with pytest.raises(parse.BenchParseError, match="summary"):
        parse.parse_iperf3({"end": {}})


def test_count_line():
    assert parse.parse_count_line("conns=10 errors=0 conn_per_s=12.5\n", "conn_per_s") == 12.5
    with pytest.raises(parse.BenchParseError):
        parse.parse_count_line("nothing", "conn_per_s")


# ---- stats ------------------------------------------------------------------------------

def test_quantiles_and_spread():
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([1, 2, 3, 4]) == 2.5
    assert stats.quantile([10], 0.9) == 10
    assert stats.median([]) is None
    assert stats.median([None, 4, float("nan")]) == 4
    sp = stats.spread([1, 2, 3, 4, 5])
    assert (sp["median"], sp["q1"], sp["q3"], sp["iqr"], sp["min"], sp["max"], sp["n"]) == \
        (3, 2, 4, 2, 1, 5, 5)
    assert sp["rel_iqr"] == pytest.approx(2 / 3)
    assert stats.spread([])["n"] == 0


def test_ratio_and_improvement():
    assert stats.ratio(10, 4) == 2.5
    assert stats.ratio(1, 0) is None and stats.ratio(None, 1) is None
    assert stats.improvement(80, 100) == pytest.approx(0.2)


def test_loglog_slope():
    assert stats.loglog_slope([(100, 2e-6), (1000, 2e-6), (20000, 2e-6)]) == pytest.approx(0)
    assert stats.loglog_slope([(100, 1e-3), (1000, 1e-2), (10000, 1e-1)]) == pytest.approx(1)
    assert stats.loglog_slope([(100, 1.0)]) is None


def _sample(mode, rnd, files, **extra):
    sizes = {}
    for size, name in files.items():
        sizes[str(size)] = parse.parse_sockperf(read(name))
    return {"mode": mode, "round": rnd, "sizes": sizes, "errors": [], **extra}


def recorded_latency_result():
    """A latency result built from the recorded tool outputs (numbers are real, modes staged)."""
    ip = parse.parse_iperf3(read("iperf3_ok.json"))
    files_fast = {64: "sockperf_pp_oneway_64.out", 1024: "sockperf_pp_fullrtt_1024.out"}
    files_slow = {64: "sockperf_pp_fullrtt_64.out", 1024: "sockperf_pp_fullrtt_1024.out"}
    samples = []
    for r in range(3):
        samples.append(_sample("direct", r, files_fast, conn_per_s=9000 + r,
                               throughput_gbps=ip["gbps"], cpu_us_per_req=10.0, retransmits=1))
        samples.append(_sample("iptables", r, files_slow, conn_per_s=3000,
                               throughput_gbps=ip["gbps"] / 2, cpu_us_per_req=40.0, retransmits=0))
        samples.append(_sample("ebpf", r, files_fast, conn_per_s=5000,
                               throughput_gbps=ip["gbps"], cpu_us_per_req=20.0))
    modes = stats.aggregate_latency(samples, [64, 1024])
    return {"kind": "latency", "rounds": 3, "sizes": [64, 1024], "rtt": True, "modes": modes,
            "targets": report.latency_targets(modes)}


def test_aggregate_latency_medians_and_ratios():
    res = recorded_latency_result()
    d, i = res["modes"]["direct"], res["modes"]["iptables"]
    assert d["p50_us"] == 28.011 and i["p50_us"] == 55.252
    assert d["conn_per_s"] == 9001
    assert d["spread"]["conn_per_s"]["iqr"] == 1
    assert i["ratio_to_direct"]["p50_us"] == pytest.approx(55.252 / 28.011)
    assert d["ratio_to_direct"]["p50_us"] == 1
    assert i["by_size"]["1024"]["p50_us"] == parse.parse_sockperf(
        read("sockperf_pp_fullrtt_1024.out"))["p50_us"]
    assert d["retransmits"] == 3 and d["rounds"] == 3


def test_latency_targets_met_and_missed():
    res = recorded_latency_result()
    t = {x["name"]: x for x in res["targets"]}
    p50 = t["ebpf p50 at most 0.7x iptables"]
    assert p50["met"] is True and "x)" in p50["detail"]
    # explicit missing -> not measured
    assert t["ebpf cheaper than explicit proxy (p50 latency and CPU per request)"]["met"] is None
    modes = dict(res["modes"])
    modes["ebpf"] = dict(modes["ebpf"], p50_us=modes["iptables"]["p50_us"] * 0.9)
    t2 = {x["name"]: x for x in report.latency_targets(modes)}
    assert t2["ebpf p50 at most 0.7x iptables"]["met"] is False


def recorded_rules_result():
    samples = []
    for n in (100, 1000, 20000):
        samples.append({"backend": "ebpf", "op": "add-entry", "n": n, "seconds": [2e-6, 3e-6, 2.5e-6]})
        samples.append({"backend": "ebpf", "op": "full-sync", "n": n, "seconds": [n * 2e-6]})
        samples.append({"backend": "iptables-nft", "op": "add-entry", "n": n, "seconds": [n * 4e-6]})
        samples.append({"backend": "iptables-nft", "op": "full-sync", "n": n, "seconds": [n * 1e-5]})
        samples.append({"backend": "iptables-legacy", "op": "add-entry", "n": n, "seconds": [1e-3 + n * 1e-6]})
    results = stats.aggregate_rules(samples)
    dp = stats.aggregate_dataplane([{"backend": "ebpf", "n": 100, "conn_per_s": [10000, 11000]},
                                    {"backend": "iptables-nft", "n": 100, "conn_per_s": [5000]}])
    return {"kind": "rules", "ns": [100, 1000, 20000], "results": results, "dataplane": dp,
            "targets": report.rules_targets(results), "errors": []}


def test_aggregate_rules_ratio_to_ebpf_and_targets():
    res = recorded_rules_result()
    idx = {(r["backend"], r["op"], r["n"]): r for r in res["results"]}
    assert idx[("ebpf", "add-entry", 100)]["seconds"] == 2.5e-6
    assert idx[("iptables-nft", "add-entry", 20000)]["ratio_to_ebpf"] == pytest.approx(0.08 / 2.5e-6)
    assert idx[("ebpf", "add-entry", 1000)]["ratio_to_ebpf"] == 1
    assert idx[("iptables-legacy", "add-entry", 100)]["ratio_to_ebpf"] == pytest.approx(1.1e-3 / 2.5e-6)
    t = {x["name"]: x for x in res["targets"]}
    assert t["add-entry at N=20000: eBPF at least 1000x cheaper than iptables-nft"]["met"] is True
    assert t["remove-entry at N=20000: eBPF at least 1000x cheaper than iptables-nft"]["met"] is None
    assert t["eBPF add-entry flat in N"]["met"] is True
    dp = {r["backend"]: r for r in res["dataplane"]}
    assert dp["ebpf"]["conn_per_s"] == 10500
    assert dp["iptables-nft"]["ratio_to_ebpf"] == pytest.approx(5000 / 10500)


def test_rules_target_missed_when_ebpf_grows_with_n():
    results = stats.aggregate_rules([
        {"backend": "ebpf", "op": "add-entry", "n": n, "seconds": [n * 1e-7]} for n in (100, 20000)])
    t = {x["name"]: x for x in report.rules_targets(results)}
    assert t["eBPF add-entry flat in N"]["met"] is False


# ---- report and charts ------------------------------------------------------------------

def test_latency_text_and_markdown():
    res = recorded_latency_result()
    text = report.latency_text(res)
    lines = text.splitlines()
    assert any(l.startswith("direct") and "28.0" in l for l in lines)
    ipt = next(l for l in lines if l.startswith("iptables"))
    assert "55.3" in ipt and f"({55.252 / 28.011:.2f}x)" in ipt
    assert "p50 / p99 by message size" in text
    assert "target: ebpf p50 at most 0.7x iptables: met" in text
    md = report.latency_markdown(res, charts=["latency.png"])
    assert md.startswith("# meshbpf benchmark: data path")
    assert "| mode | p50 us |" in md and "![latency.png](latency.png)" in md
    assert "**met**" in md and "**not measured**" in md


def test_rules_text_and_markdown():
    res = recorded_rules_result()
    text = report.rules_text(res)
    row = next(l for l in text.splitlines() if l.startswith("add-entry") and "20,000" in l)
    assert "2.5us" in row and "80.00ms" in row and "32,000x" in row
    assert "Data-plane cost of N entries" in text
    md = report.rules_markdown(res, charts=["rules.png"])
    assert "| op | N | ebpf | iptables-nft | iptables-legacy |" in md
    assert "![rules.png](rules.png)" in md


def test_json_round_trip_shapes():
    lat = json.loads(report.to_json(recorded_latency_result()))
    for mode in ("direct", "iptables", "ebpf"):
        m = lat["modes"][mode]
        for k in ("p50_us", "p90_us", "p99_us", "p999_us", "conn_per_s", "throughput_gbps"):
            assert isinstance(m[k], (int, float)) and m[k] > 0
    rl = json.loads(report.to_json(recorded_rules_result()))
    for r in rl["results"]:
        assert r["backend"] in report.RULES_BACKENDS and r["op"] in report.RULES_OPS
        assert isinstance(r["n"], int) and r["seconds"] > 0


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_charts_render_pngs(tmp_path):
    p1 = charts.latency_chart(recorded_latency_result(), str(tmp_path / "lat.png"))
    p2 = charts.rules_chart(recorded_rules_result(), str(tmp_path / "sub" / "rules.png"))
    for p in (p1, p2):
        assert _is_png(p) and os.path.getsize(p) > 5000


# ---- rules: pure helpers ----------------------------------------------------------------

def test_exclusion_cidrs():
    c = rules.exclusion_cidrs(5)
    assert c == ["100.64.0.1/32", "100.64.0.2/32", "100.64.0.3/32", "100.64.0.4/32", "100.64.0.5/32"]
    c = rules.exclusion_cidrs(20000, last="10.233.0.12")
    assert len(set(c)) == 20000 and c[-1] == "10.233.0.12/32"
    assert rules.extra_cidr(0) not in rules.exclusion_cidrs(300)
    with pytest.raises(Exception):
        rules.exclusion_cidrs(-1)


def test_parse_ns():
    assert rules.parse_ns("1000, 100,20k,100") == [100, 1000, 20000]
    for bad in ("x", "0", ""):
        with pytest.raises(Exception):
            rules.parse_ns(bad)


def test_lpm_and_port_keys():
    k = rules.lpm_key(7, "10.1.2.0/24")
    assert len(k) == 24
    plen, idx = struct.unpack("<II", k[:8])
    assert plen == 32 + 96 + 24 and idx == 7
    assert k[8:] == b"\x00" * 10 + b"\xff\xff" + bytes([10, 1, 2, 0])
    k6 = rules.lpm_key(1, "fd00::/8")
    assert struct.unpack("<I", k6[:4])[0] == 40 and k6[8] == 0xfd
    assert rules.port_key(3, 15006) == struct.pack("<I", 3) + b"\x3a\x9e\x00\x00"


def test_enroll_entries_follow_config():
    from meshbpf.ebpf import structs as S
    cfg = InterceptConfig()
    e = rules.enroll_entries(cfg, 5, 0xabc, pod_ip="10.233.0.20")
    (pk, pv), = e["pods"]
    assert pk == struct.pack("<Q", 0xabc)
    pc = S.from_bytes(S.PodConfig, pv)
    assert pc.pod_index == 5 and S.ntohs(pc.proxy_port) == 15001
    lpm = dict(e["lpm"])
    # the pod's own address and the loopback CIDR are excluded, as Istio's rules do
    assert lpm[rules.lpm_key(5, "10.233.0.20/32")] == S.u32_bytes(S.RULE_EXCLUDE)
    assert lpm[rules.lpm_key(5, "127.0.0.1/32")] == S.u32_bytes(S.RULE_EXCLUDE)
    assert e["ports"] == [] and len(e["local_ips"]) == 1
    cfg2 = cfg.replace(outbound_ip_ranges_include="10.0.0.0/8,192.168.0.0/16",
                       outbound_ports_exclude="5432")
    e2 = rules.enroll_entries(cfg2, 5, 1, pod_ip="10.233.0.20")
    assert dict(e2["lpm"])[rules.lpm_key(5, "192.168.0.0/16")] == S.u32_bytes(S.RULE_INCLUDE)
    assert dict(e2["ports"]) == {rules.port_key(5, 5432): S.u32_bytes(S.RULE_EXCLUDE)}


def test_iptables_payload_and_exclusion_position():
    payload = rules.iptables_payload(rules.exclusion_cidrs(3, last="10.233.0.12"))
    lines = payload.splitlines()
    out = [l for l in lines if l.startswith("-A ISTIO_OUTPUT")]
    assert out[-1] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"
    assert out[-2] == "-A ISTIO_OUTPUT -d 10.233.0.12/32 -j RETURN"
    pos = rules.exclusion_position(payload)
    assert pos == len(out) and out[pos - 1].endswith("ISTIO_REDIRECT")


def test_connect4_program_encoding():
    prog = b"".join(rules.connect4_lpm_program(42))
    assert len(prog) % 8 == 0 and len(prog) == 15 * 8      # 14 slots, ld_imm64 takes two
    # the ld_imm64 carries the map fd as a pseudo map fd
    ld = prog.index(bytes([0x18]))
    assert prog[ld + 1] == 0x11 and struct.unpack("<i", prog[ld + 4:ld + 8])[0] == 42
    assert prog[-8] == 0x95


# ---- latency: pure helpers --------------------------------------------------------------

def test_bench_bootstrap_adds_explicit_listeners():
    c = latency.bench_bootstrap("client", "10.233.0.12")
    names = [l["name"] for l in c["static_resources"]["listeners"]]
    assert names[:2] == ["virtualOutbound", "virtualInbound"]
    assert "explicit_out_sockperf" in names
    cl = {x["name"]: x for x in c["static_resources"]["clusters"]}
    ep = cl["explicit_out_sockperf"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert ep["endpoint"]["address"]["socket_address"] == {
        "address": "10.233.0.12", "port_value": latency.EXPLICIT_SERVER_PORT["sockperf"]}
    s = latency.bench_bootstrap("server", "10.233.0.12")
    cl = {x["name"]: x for x in s["static_resources"]["clusters"]}
    sa = cl["explicit_in_iperf"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert sa["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": latency.IPERF_PORT}
    with pytest.raises(ValueError):
        latency.bench_bootstrap("nobody", "1.2.3.4")


def test_mode_order_rotates():
    m = list(latency.MODES)
    orders = [latency.mode_order(m, r) for r in range(len(m))]
    assert [o[0] for o in orders] == m
    assert all(sorted(o) == sorted(m) for o in orders)


def test_targets_for_modes():
    assert latency.targets_for("explicit", "10.0.0.1") == ("127.0.0.1", latency.EXPLICIT_CLIENT_PORT)
    assert latency.targets_for("ebpf", "10.0.0.1") == ("10.0.0.1", latency.APP_PORTS)


def test_check_path():
    assert latency.check_path("direct", {"client_outbound": 0, "server_inbound": 0}) == []
    assert latency.check_path("direct", {"client_outbound": 2, "server_inbound": 0})
    assert latency.check_path("ebpf", {"client_outbound": 5, "server_inbound": 5}) == []
    errs = latency.check_path("iptables", {"client_outbound": 5, "server_inbound": 0})
    assert len(errs) == 1 and "inbound" in errs[0]
    assert latency.check_path("ebpf", {"client_outbound": None, "server_inbound": 1})


# ---- CLI input errors (no root needed: rejected before anything runs) --------------------

@pytest.mark.parametrize("args, msg", [
    (["latency", "--sizes", "abc"], "--sizes"),
    (["latency", "--sizes", "5"], "out of range"),
    (["latency", "--modes", "direct,bogus"], "bogus"),
    (["latency", "--n", "100"], "bench rules"),
    (["rules", "--n", "0"], "out of range"),
    (["rules", "--backends", "pf"], "pf"),
    (["rules", "--sizes", "64"], "bench latency"),
])
def test_cli_bad_input(args, msg):
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and "Traceback" not in r.output


def test_out_dir_gets_json_markdown_and_png(tmp_path):
    from meshbpf.bench.commands import _write_outputs
    lat = _write_outputs(recorded_latency_result(), str(tmp_path / "o"), "latency")
    rl = _write_outputs(recorded_rules_result(), str(tmp_path / "o"), "rules")
    names = sorted(os.path.basename(p) for p in lat + rl)
    assert names == ["latency.json", "latency.md", "latency.png", "rules.json", "rules.md", "rules.png"]
    assert json.load(open(tmp_path / "o" / "rules.json"))["results"]
    assert "![latency.png](latency.png)" in (tmp_path / "o" / "latency.md").read_text()
    assert _is_png(tmp_path / "o" / "rules.png")
