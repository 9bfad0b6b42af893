"""End to end: `meshbpf bench agent --quick -o json` through the CLI (a subprocess, as an
operator runs it) on a test bed: every figure is present and plausible, every target is
listed with a verdict, and the run left no namespace, pin or agent process behind.
Timings are never asserted."""

import json
import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_bench_agent_quick_json(tmp_path):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "meshbpf", "bench", "agent", "--quick",
                          "-o", "json", "--out", str(out)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-3000:]
    res = json.loads(stdout)
    assert res["kind"] == "agent" and res["quick"] is True and res["errors"] == []
    assert res["pods"] == 10 and res["enrolled"] == [0, 20]

    rows = {r["enrolled"]: r for r in res["first_connection"]}
    assert set(rows) == {0, 20}
    for r in rows.values():
        assert r["samples"] == 10 and r["misses"] == 0, r
        assert all(_num(r[k]) and r[k] > 0 for k in ("p50_ms", "p99_ms", "max_ms")), r
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]

    assert res["restart"]["enrolled"] == 20 and _num(res["restart"]["ready_s"])
    assert res["restart"]["ready_s"] > 0

    phases = res["resources"]
    assert set(phases) == {"rest, 0 pods", "churn, 0 enrolled", "churn, 20 enrolled",
                           "rest, 20 pods", "rest after restart, 20 pods"}
    for name, ph in phases.items():
        assert _num(ph["rss_mb"]) and ph["rss_mb"] > 5, (name, ph)
        assert ph["peak_rss_mb"] >= ph["rss_mb"]
        assert _num(ph["cpu_percent"]) and ph["cpu_percent"] >= 0
    # the agent worked while pods came and went
    assert phases["churn, 20 enrolled"]["cpu_percent"] > 0

    names = [t["name"] for t in res["targets"]]
    assert len(names) == 4
    assert sum("p99" in n for n in names) == 2 and any("ready within 2 s" in n for n in names)
    assert any("RSS at rest at most 120 MB" in n for n in names)
    verdicts = {t["name"]: t["met"] for t in res["targets"]}
    # the restart ran with 20 pods, not 200: listed but not judged
    assert [v for n, v in verdicts.items() if "ready within" in n] == [None]
    assert all(v in (True, False) for n, v in verdicts.items() if "ready within" not in n)

    assert sorted(os.listdir(out)) == ["agent.json", "agent.md"]
    assert "first intercepted connection" in (out / "agent.md").read_text()

    # nothing left behind: the CLI's test-bed namespaces and pins, the agents
    mine = f"mbt-{p.pid}-"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [l for l in ns.splitlines() if l.startswith(mine)]
    assert not [x for x in os.listdir("/sys/fs/bpf") if x.startswith(f"meshbpf-test-{mine}")]
    assert len(res["agent_pids"]) == 2
    assert not [pid for pid in res["agent_pids"] if psutil.pid_exists(pid)]
