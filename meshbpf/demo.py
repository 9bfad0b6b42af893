"""`meshbpf demo`: the whole story on a built-in sandbox, start to finish, then cleaned up.

1. probe the kernel and say which mode it picks and why;
2. build a throwaway node with a client, a server and an outsider pod, each meshed pod
   with a real Envoy sidecar (uid 1337);
3. in each mode (iptables, then eBPF where the kernel allows it) attach both pods, send a
   request, and show the evidence: the sidecars' counters, the original destination the
   client's sidecar saw, the peer the server app saw; detach;
4. run `meshbpf bench latency --quick` and `bench rules --quick` and say where the report is.
"""

import json
import os
import subprocess
import sys
import time

import click

from .config import InterceptConfig
from .errors import MeshbpfError

APP_PORT = 8080


def _step(text):
    click.secho(f"\n==> {text}", bold=True)


def _delta(before, after, names):
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


def _access_lines(sidecar, listener):
    return [l for l in sidecar.log().splitlines() if l.startswith(f"[{listener}]")]


def _new_access(sidecar, listener, seen, timeout=5):
    """The first access-log line after the `seen` ones (Envoy writes them asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _access_lines(sidecar, listener)
        if len(lines) > seen:
            return lines[seen]
        time.sleep(0.1)
    return "(no new access log line)"


OUT_STATS = ["tcp.outbound.downstream_cx_total", "cluster.PassthroughCluster.upstream_cx_total"]
IN_STATS = ["tcp.inbound.downstream_cx_total", "cluster.InboundPassthroughCluster.upstream_cx_total"]


def show_request(mode, client, server, outsider, env_c, env_s):
    """One request client -> server and one outsider -> server, with the evidence."""
    from .service import NodeService
    sb = client.sandbox
    svc = NodeService(pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root, mode=mode)
    cfg = InterceptConfig()
    for p in (client, server):
        rec = svc.attach(p.pod, cfg)
        click.echo(f"  attached {p.name} in {rec['mode']} mode")
    try:
        b_c, b_s = env_c.stats(), env_s.stats()
        seen_c = len(_access_lines(env_c, "virtualOutbound"))
        seen_s = len(_access_lines(env_s, "virtualInbound"))
        url = f"http://{server.ip4}:{APP_PORT}/hello"
        r = client.exec(["curl", "-sS", "--noproxy", "*", "-m", "10", url])
        if r.returncode != 0:
            raise MeshbpfError(f"request from client to {url} failed in {mode} mode: {r.stderr.strip()}")
        body = json.loads(r.stdout)
        a_c, a_s = env_c.stats(), env_s.stats()
        click.echo(f"  client$ curl {url}")
        click.echo(f"  server app answered; it saw its peer as {body['peer'][0]} "
                   "(127.0.0.6 = its own sidecar's inbound passthrough)")
        click.echo(f"  client sidecar outbound: {_delta(b_c, a_c, OUT_STATS)}")
        click.echo("  access log format: [listener] downstream peer -> original destination the "
                   "sidecar read (SO_ORIGINAL_DST) via upstream local -> upstream host")
        click.echo(f"  client sidecar access log: {_new_access(env_c, 'virtualOutbound', seen_c)}")
        click.echo(f"  server sidecar inbound:  {_delta(b_s, a_s, IN_STATS)}")
        click.echo(f"  server sidecar access log: {_new_access(env_s, 'virtualInbound', seen_s)}")
        r = outsider.exec(["curl", "-sS", "--noproxy", "*", "-m", "10", url])
        seen = json.loads(r.stdout)["peer"][0] if r.returncode == 0 else r.stderr.strip()
        click.echo(f"  outsider (not meshed) -> server: answered, app saw {seen}")
    finally:
        for p in (client, server):
            svc.detach(p.pod)
        click.echo("  detached client and server")


@click.command()
@click.option("--no-bench", is_flag=True, help="Skip the benchmark step.")
@click.option("--out", default="bench-out", show_default=True,
              help="Where the benchmark writes its JSON, Markdown report and charts.")
def demo(no_bench, out):
    """Show meshbpf working end to end on a throwaway sandbox (needs root).

    \b
    Example:
      sudo meshbpf demo --out /tmp/meshbpf-report
    """
    from . import system
    with system.bpffs_for_run():
        _demo(no_bench, out)


def _demo(no_bench, out):
    from . import probe
    from .service import NodeService
    from .testbed import Sandbox

    _step("1/4 What this kernel can do")
    result = probe.probe()
    bad = [n for n, f in result["features"].items() if not f["ok"]]
    click.echo(f"  kernel {result['kernel']}: {len(result['features']) - len(bad)} of "
               f"{len(result['features'])} features ok" + (f"; missing: {', '.join(bad)}" if bad else ""))
    click.echo(f"  mode: {result['mode']} - {result['reason']}")
    mode_list = ["iptables"] + (["ebpf"] if result["mode"] == "ebpf" else [])

    _step("2/4 A throwaway node: client and server pods with Envoy sidecars, an outsider pod")
    with Sandbox(name="demo") as sb:
        client, server, outsider = sb.add_pod("client"), sb.add_pod("server"), sb.add_pod("outsider")
        server.start_http_server(APP_PORT)
        env_c, env_s = client.start_envoy(), server.start_envoy()
        click.echo(f"  client {client.ip4}, server {server.ip4} (app on :{APP_PORT}), "
                   f"outsider {outsider.ip4}; Envoy {sb.id} sidecars as uid 1337")
        for i, mode in enumerate(mode_list):
            _step(f"3/4 ({i + 1}/{len(mode_list)}) A request through the sidecars, {mode} mode")
            show_request(mode, client, server, outsider, env_c, env_s)
        NodeService(pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root).cleanup()
    click.echo("  sandbox removed")

    if no_bench:
        return
    _step(f"4/4 Benchmark (--quick), report in {out}/")
    for what in ("latency", "rules"):
        rc = subprocess.call([sys.executable, "-m", "meshbpf", "bench", what, "--quick",
                              "--out", out])
        if rc != 0:
            raise MeshbpfError(f"bench {what} failed (exit {rc})")
    click.echo(f"\nReport: {os.path.abspath(out)}/ (JSON, Markdown, PNG charts)")
