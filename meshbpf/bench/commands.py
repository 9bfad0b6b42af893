"""`meshbpf bench`: the click group with `latency` and `rules`. Parse, run, render; nothing else.

Progress goes to stderr while a run is under way; the result goes to stdout as a table
(default) or JSON (`-o json`); `--out DIR` also writes JSON, a Markdown report and PNG
charts there.
"""

import os
import time

import click

from .. import system
from ..clickutil import MeshGroup
from ..errors import UsageError
from . import parse, report


def _progress(msg):
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


def _parse_int(text, what, lo, hi):
    vals = parse.int_list(text, what, lo, hi)
    if len(vals) != 1:
        raise UsageError(f"{what}: give one number")
    return vals[0]


def _parse_list(text, allowed, what):
    items = [i.strip() for i in str(text).split(",") if i.strip()]
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        raise UsageError(f"{what}: unknown {', '.join(bad) or '(empty)'}; "
                         f"choose from {', '.join(allowed)}")
    return items


def _write_outputs(result, out_dir, kind):
    """JSON, Markdown and PNG charts into out_dir; returns the paths written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out_dir}: cannot create it: {e.strerror}")
    from . import charts
    paths = []
    jpath = os.path.join(out_dir, f"{kind}.json")
    with open(jpath, "w") as f:
        f.write(report.to_json(result))
    paths.append(jpath)
    png = f"{kind}.png"
    if kind in ("throughput", "soak"):
        png = None
        md = report.throughput_markdown(result)
    elif kind == "agent":
        from .agent import agent_markdown
        png = None
        md = agent_markdown(result)
    elif kind == "latency":
        charts.latency_chart(result, os.path.join(out_dir, png))
        md = report.latency_markdown(result, charts=[png])
    else:
        charts.rules_chart(result, os.path.join(out_dir, png))
        md = report.rules_markdown(result, charts=[png])
    if png:
        paths.append(os.path.join(out_dir, png))
    mpath = os.path.join(out_dir, f"{kind}.md")
    with open(mpath, "w") as f:
        f.write(md)
    paths.append(mpath)
    return paths


def _emit(result, output, out_dir, kind):
    if out_dir:
        for p in _write_outputs(result, out_dir, kind):
            _progress(f"wrote {p}")
    if output == "json":
        click.echo(report.to_json(result))
    elif kind == "agent":
        from .agent import agent_text
        click.echo(agent_text(result))
    else:
        render = {"latency": report.latency_text, "rules": report.rules_text}.get(
            kind, report.throughput_text)
        click.echo(render(result))


def _check_root():
    if os.geteuid() != 0:
        from ..errors import UnsupportedError
        raise UnsupportedError("the benchmark needs root (network namespaces, cgroups, BPF)")


output_opt = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                          show_default=True, help="Result on stdout as a table or JSON.")
out_opt = click.option("--out", "out_dir", type=click.Path(file_okay=False),
                       help="Also write JSON, a Markdown report and PNG charts into DIR.")
quick_opt = click.option("--quick", is_flag=True,
                         help="Short run (< 90 s) that still covers every mode / N=20,000.")


bulk_modes_opt = click.option(
    "--modes", default="iptables,ebpf", show_default=True,
    callback=lambda ctx, param, v: _parse_list(v, ("iptables", "ebpf", "ebpf-nosplice"), "--modes"),
    help="Comma list of iptables, ebpf, ebpf-nosplice.")


def rounds_opt(default_help):
    return click.option("--rounds", type=click.IntRange(1, 100), help=default_help)


@click.group("bench", cls=MeshGroup)
def bench():
    """Measure what interception costs: data path (latency) and control plane (rules).

    \b
    Examples:
      meshbpf bench latency --quick
      meshbpf bench latency --rounds 5 --sizes 64,1024 --out /tmp/bench
      meshbpf bench rules --n 100,1000,5000,20000 --pods 250 -o json
      meshbpf bench throughput --runs 3 --seconds 10
      meshbpf bench soak --seconds 60 --flows 4
      meshbpf bench agent --pods 50 --enrolled 0,200
    """


@bench.command("throughput")
@output_opt
@out_opt
@click.option("--runs", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Transfers per mode (interleaved across modes).")
@click.option("--seconds", type=click.IntRange(10, 600), default=10, show_default=True,
              help="Length of each transfer (at least 10 s: shorter ones hide queueing).")
@bulk_modes_opt
def throughput_cmd(output, out_dir, runs, seconds, modes):
    """Bulk throughput per mode with the node's peak TCP memory, and the targets."""
    from . import throughput
    _check_root()
    with system.bpffs_for_run():
        result = throughput.run_throughput(modes=modes, runs=runs, seconds=seconds,
                                           progress=_progress)
    _emit(result, output, out_dir, "throughput")


@bench.command("soak")
@output_opt
@out_opt
@click.option("--seconds", type=click.IntRange(10, 3600), default=60, show_default=True,
              help="How long each mode runs.")
@click.option("--flows", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel bulk streams (beside one request/response load).")
@bulk_modes_opt
def soak_cmd(output, out_dir, seconds, flows, modes):
    """Many bulk and request/response flows at once: errors and peak TCP memory per mode."""
    from . import throughput
    _check_root()
    with system.bpffs_for_run():
        result = throughput.run_soak(modes=modes, seconds=seconds, flows=flows,
                                     progress=_progress)
    _emit(result, output, out_dir, "soak")


@bench.command("latency")
@quick_opt
@output_opt
@out_opt
@rounds_opt("Rounds, the order of modes rotating each round (default 5, --quick 1).")
@click.option("--sizes", default=None, help="sockperf message sizes in bytes, comma list "
              "(default 64,1024; --quick 64).")
@click.option("--modes", default=None, help="Comma list of modes (default all: "
              "direct,explicit,iptables,ebpf,ebpf-nosplice).")
@click.option("--duration", type=click.FloatRange(0.5, 600), default=None,
              help="Seconds per sockperf / iperf3 run (default 5; --quick 1.5).")
@click.option("--n", "n_opt", default=None, hidden=True, help="(rules only)")
@click.option("--pods", default=None, hidden=True, help="(rules only)")
def latency_cmd(quick, output, out_dir, rounds, sizes, modes, duration, n_opt, pods):
    """Latency, throughput, connection rate and CPU per request, per interception mode."""
    from . import latency
    if n_opt or pods:
        raise UsageError(f"{'--n' if n_opt else '--pods'} applies to `bench rules`, "
                         "not `bench latency`")
    sizes = parse.int_list(sizes, "--sizes", 14, 65000) if sizes else None
    modes = _parse_list(modes, latency.MODES, "--modes") if modes else None
    _check_root()
    with system.bpffs_for_run():
        result = latency.run_latency(modes=modes, sizes=sizes, rounds=rounds, quick=quick,
                                     duration=duration, progress=_progress)
    _emit(result, output, out_dir, "latency")


@bench.command("rules")
@quick_opt
@output_opt
@out_opt
@rounds_opt("Rounds of the connection-rate part (default 3, --quick 1).")
@click.option("--n", "n_opt", default=None,
              help="Comma list of N existing entries (default 100,1000,5000,20000; "
                   "--quick 100,20000). '20k' works.")
@click.option("--backends", default=None, help="Comma list of ebpf, iptables-nft, "
              "iptables-legacy (default all installed).")
@click.option("--no-dataplane", is_flag=True, help="Skip the connection-rate part.")
@click.option("--pods", default=None, help="Pods enrolled holding the N entries between them, "
              "the most the enroll cost is measured at (default 250; --quick 10).")
@click.option("--sizes", default=None, hidden=True, help="(latency only)")
def rules_cmd(quick, output, out_dir, rounds, n_opt, backends, no_dataplane, pods, sizes):
    """Control-plane cost of the service layer against scale: enroll a pod, add/remove one
    entry, full sync, enroll against pods enrolled; and the connection rate through N entries."""
    from . import rules
    if sizes:
        raise UsageError("--sizes applies to `bench latency`, not `bench rules`")
    ns = rules.parse_ns(n_opt) if n_opt else list(rules.QUICK_NS if quick else rules.DEFAULT_NS)
    backends = _parse_list(backends, rules.BACKENDS, "--backends") if backends else list(rules.BACKENDS)
    if pods is not None:
        pods = _parse_int(pods, "--pods", 1, rules.MAX_PODS)
    _check_root()
    with system.bpffs_for_run():
        result = rules.run_rules(ns=ns, backends=backends, quick=quick, pods=pods,
                                 dataplane=not no_dataplane, rounds=rounds, progress=_progress)
    _emit(result, output, out_dir, "rules")




@bench.command("agent")
@click.option("--quick", is_flag=True, help="Short run (< 60 s): 10 pods measured, 0 and 20 enrolled.")
@output_opt
@out_opt
@click.option("--pods", default=None, help="Pods added one at a time and timed, per enrolled "
              "count (default 50; --quick 10).")
@click.option("--enrolled", default=None, help="Comma list of pods already enrolled while "
              "measuring (default 0,200; --quick 0,20). The largest is also the restart's.")
def agent_cmd(quick, output, out_dir, pods, enrolled):
    """The node agent: pods-file change to the pod's first intercepted connection (p50/p99),
    restart to ready, and the agent's RSS and CPU at rest and during churn."""
    from . import agent
    if pods is not None:
        pods = _parse_int(pods, "--pods", 1, agent.MAX_PODS)
    enrolled = agent.parse_enrolled(enrolled) if enrolled is not None else None
    _check_root()
    with system.bpffs_for_run():
        result = agent.run_agent(pods=pods, enrolled=enrolled, quick=quick, progress=_progress)
    _emit(result, output, out_dir, "agent")
