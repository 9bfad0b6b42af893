"""`meshbpf bench agent`, the pure parts: option parsing, the probe's line, summaries, the
targets' verdicts, the text/Markdown report, and bad input on the CLI (no root needed)."""

import json
import os

import pytest
from click.testing import CliRunner

from meshbpf.bench import agent
from meshbpf.bench.commands import _write_outputs, bench
from meshbpf.errors import UsageError


def test_parse_enrolled_sorts_dedups_and_rejects_bad_values():
    assert agent.parse_enrolled("200, 0,200") == [0, 200]
    for bad in ("", "x", "-1", str(agent.MAX_ENROLLED + 1)):
        with pytest.raises(UsageError):
            agent.parse_enrolled(bad)


def test_check_pods_range():
    assert agent.check_pods(50) == 50
    for bad in (0, agent.MAX_PODS + 1, True, "5"):
        with pytest.raises(UsageError):
            agent.check_pods(bad)


def test_parse_probe_reads_the_first_hit_only():
    assert agent.parse_probe("ready\nhit=123.500000 tries=7\n") == 123.5
    assert agent.parse_probe("ready\nmiss tries=900\n") is None
    assert agent.parse_probe("") is None
    assert agent.parse_probe("ready\nhit=oops tries=1\n") is None


def test_pods_document_is_what_the_pods_file_parser_accepts(tmp_path):
    from meshbpf.agent.source import parse_document
    from meshbpf.testbed import agentfiles
    entries = [agent.pod_entry("m0", "/run/netns/x", "/sys/fs/cgroup/t/m0")]
    path = str(tmp_path / "pods.json")
    agentfiles.write_pods(path, entries)
    assert parse_document(open(path).read()) == {"pods": entries}
    assert os.listdir(tmp_path) == ["pods.json"]           # no temp file left behind


def test_summarize_ms_uses_the_samples_and_skips_misses():
    s = agent.summarize_ms([0.001 * i for i in range(1, 101)] + [None])
    assert s["samples"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == pytest.approx(100.0)
    assert agent.summarize_ms([None])["p99_ms"] is None


def result(p99=(20.0, 150.0), ready=(200, 1.5), rss=(100.0, 40.0), misses=0):
    return {"kind": "agent", "quick": False, "pods": 50, "enrolled": [0, 200], "mode": "ebpf",
            "first_connection": [
                {"enrolled": e, "samples": 50, "misses": misses, "p50_ms": 5.0, "p99_ms": v,
                 "max_ms": v} for e, v in zip((0, 200), p99)],
            "restart": {"enrolled": ready[0], "ready_s": ready[1]},
            "resources": {"rest, 200 pods": {"rss_mb": rss[0], "peak_rss_mb": rss[0],
                                             "cpu_percent": 0.1, "seconds": 2.0},
                          "churn, 200 enrolled": {"rss_mb": 500.0, "peak_rss_mb": 500.0,
                                                  "cpu_percent": 40.0, "seconds": 3.0},
                          "rest after restart, 200 pods": {"rss_mb": rss[1],
                                                           "peak_rss_mb": rss[1],
                                                           "cpu_percent": 0.0, "seconds": 2.0}},
            "errors": []}


def verdicts(r):
    return [t["met"] for t in agent.agent_targets(r)]


def test_targets_met_and_missed():
    assert verdicts(result()) == [True, False, True, True]
    # ready: 2 s is the limit; fewer than 200 pods is not judged
    assert verdicts(result(ready=(200, 2.5)))[2] is False
    assert verdicts(result(ready=(20, 0.4)))[2] is None
    # RSS: the largest at rest counts, churn does not (500 MB there)
    assert verdicts(result(rss=(121.0, 40.0)))[3] is False
    assert verdicts(result(rss=(40.0, 120.0)))[3] is True


def test_a_pod_never_intercepted_is_not_a_met_target():
    assert verdicts(result(p99=(20.0, 20.0), misses=1))[:2] == [None, None]


def test_nothing_measured_is_not_measured():
    r = {"first_connection": [], "restart": {}, "resources": {}}
    assert verdicts(r) == [None, None]


def test_the_drift_checks_count_is_read_from_metrics():
    page = ("# HELP meshbpf_reconcile_duration_seconds ...\n"
            'meshbpf_reconcile_duration_seconds_bucket{le="0.1"} 3.0\n'
            "meshbpf_reconcile_duration_seconds_count 4.0\n"
            "meshbpf_reconcile_duration_seconds_sum 0.2\n")
    assert agent.parse_reconcile_count(page) == 4
    assert agent.parse_reconcile_count("meshbpf_mode 1\n") is None


def test_text_and_markdown_list_every_figure_and_target(tmp_path):
    r = result()
    r["targets"] = agent.agent_targets(r)
    text = agent.agent_text(r)
    for needle in ("150.0", "1.50 s", "rest after restart", "MISSED", "met", "churn"):
        assert needle in text
    paths = _write_outputs(r, str(tmp_path / "o"), "agent")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["agent.json", "agent.md"]
    assert json.load(open(paths[0]))["restart"]["ready_s"] == 1.5


@pytest.mark.parametrize("args,msg", [
    (["agent", "--pods", "0"], "out of range"),
    (["agent", "--pods", "many"], "--pods"),
    (["agent", "--enrolled", "x"], "--enrolled"),
    (["agent", "--enrolled", "-5"], "out of range"),
])
def test_cli_bad_input(args, msg):
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and "Traceback" not in r.output
