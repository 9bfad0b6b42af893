"""The `meshbpf` command: parse, call the library, render text or JSON. Nothing else.

Exit codes: 0 ok, 1 failure, 2 bad input, 3 not found, 4 unsupported by this kernel or
machine, 5 apply failed and was rolled back. Errors are one sentence on stderr, never a
traceback, for anything a user can cause.
"""

import click

from . import __version__
from .cliopts import config_options
from .clickutil import MeshGroup, emit, output_option


@click.group(cls=MeshGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshbpf")
def main():
    """Move pods' traffic into their service-mesh sidecar with eBPF (iptables fallback).

    \b
    Examples:
      meshbpf probe                      # what this kernel can do, and the mode it picks
      meshbpf attach --pid 4242          # intercept the pod process 4242 runs in
      meshbpf status -o json
      meshbpf detach --pid 4242
      meshbpf cleanup                    # remove every program, pin, hook and rule
    """


# ---- shared selectors -------------------------------------------------------------------

def node_options(f):
    """Where meshbpf keeps its node-wide state and hooks."""
    from .interceptor import DEFAULT_PIN_PREFIX
    f = click.option("--pin-prefix", default=DEFAULT_PIN_PREFIX, show_default=True,
                     envvar="MESHBPF_PIN_PREFIX",
                     help="bpffs directory for meshbpf's pinned programs and maps.")(f)
    f = click.option("--cgroup-root", type=click.Path(), default=None,
                     help="cgroup v2 directory the eBPF hooks attach to (default: the "
                          "cgroup v2 mount's root). Every meshed pod must be below it.")(f)
    return f


def pod_options(f):
    f = click.option("--pid", type=int, help="A process in the pod (its netns and cgroup are used).")(f)
    f = click.option("--netns", "netns", help="The pod's network namespace: a path or a name under /run/netns.")(f)
    f = click.option("--cgroup", type=click.Path(), help="The pod's cgroup v2 directory (with --netns).")(f)
    f = click.option("--name", help="Name to show for the pod in status.")(f)
    f = click.option("--id", "pod_id", help="The pod's stable id (e.g. its Kubernetes UID); "
                     "default: made from its netns cookie and cgroup.")(f)
    return f


def resolve_pod(pid, netns, cgroup, name, pod_id=None):
    from .errors import UsageError
    from .pod import Pod
    if (pid is None) == (netns is None):
        raise UsageError("name the pod with exactly one of --pid or --netns")
    if pid is not None:
        if cgroup:
            raise UsageError("--cgroup goes with --netns; with --pid the process's cgroup is used")
        return Pod.from_pid(pid, name=name, pod_id=pod_id)
    return Pod.from_netns(netns, cgroup=cgroup, name=name, pod_id=pod_id)


def _print_record(rec):
    fb = f"  (fallback: {rec['fallback']})" if rec.get("fallback") else ""
    click.echo(f"{rec.get('name', '?')} (id {rec.get('id')}): attached in {rec['mode']} mode{fb}")
    click.echo(f"  why: {rec.get('reason', '')}")


def _service(pin_prefix, cgroup_root, mode="auto", **options):
    from .service import NodeService
    return NodeService(pin_prefix=pin_prefix, cgroup_root=cgroup_root, mode=mode, **options)


# ---- commands ------------------------------------------------------------------------------

@main.command()
@pod_options
@node_options
@click.option("--mode", type=click.Choice(["auto", "ebpf", "iptables"]), default="auto",
              show_default=True, help="auto: eBPF where the kernel allows it, else iptables.")
@click.option("--assume-kernel", envvar="MESHBPF_ASSUME_KERNEL",
              help="Probe as if the kernel were this version (e.g. 3.10).")
@click.option("--splice/--no-splice", default=True, show_default=True,
              help="eBPF: splice same-node sockets through the sockhash.")
@click.option("--iptables-binary", type=click.Choice(["iptables-nft", "iptables-legacy"]),
              help="iptables mode: force a backend (default: as Istio chooses).")
@click.option("--reconcile", is_flag=True,
              help="iptables mode: repair drifted rules (no window without interception).")
@config_options
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Output format (no -o here: -o is istio-iptables' outbound-ports-exclude).")
def attach(pid, netns, cgroup, name, pod_id, pin_prefix, cgroup_root, mode, assume_kernel,
           splice, iptables_binary, reconcile, output, **cfg):
    """Intercept a pod's traffic into its sidecar. Attaching an attached pod again applies
    the new config in one step (no moment with both rule sets, or neither).

    \b
    Examples:
      meshbpf attach --pid 4242
      meshbpf attach --netns /run/netns/pod-a --cgroup /sys/fs/cgroup/kubepods/pod-a --id 7f3c-uid
      meshbpf attach --pid 4242 --mode iptables -x 10.96.0.0/12 -d 15020,15021
    """
    from .cliopts import config_from_options
    config, rest = config_from_options(cfg)
    pod = resolve_pod(pid, netns, cgroup, name, pod_id)
    svc = _service(pin_prefix, cgroup_root, mode, assume_kernel=assume_kernel, splice=splice,
                   iptables_binary=iptables_binary, reconcile=reconcile,
                   ipv6_auto=rest.get("ipv6_auto", True))
    emit(svc.attach(pod, config), output, _print_record)


@main.command()
@click.option("--id", "pod_id", required=True, help="The attached pod's id (see `status`).")
@node_options
@config_options
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Output format.")
def update(pod_id, pin_prefix, cgroup_root, output, **cfg):
    """Re-configure an attached pod: the new rules replace the old in one step.

    \b
    Example:
      meshbpf update --id 7f3c-uid -x 10.96.0.0/12
    """
    from .cliopts import config_from_options
    config, rest = config_from_options(cfg)
    svc = _service(pin_prefix, cgroup_root, ipv6_auto=rest.get("ipv6_auto", True))
    emit(svc.update(pod_id, config), output, _print_record)


@main.command()
@pod_options
@node_options
@output_option
def detach(pid, netns, cgroup, name, pod_id, pin_prefix, cgroup_root, output):
    """Stop intercepting a pod; removes exactly what attach added. A pod whose network
    namespace is gone is detached by its id.

    \b
    Examples:
      meshbpf detach --pid 4242
      meshbpf detach --id 7f3c-uid
    """
    svc = _service(pin_prefix, cgroup_root)
    if pod_id and pid is None and netns is None:
        res = svc.detach(pod_id)
    else:
        res = svc.detach(resolve_pod(pid, netns, cgroup, name, pod_id))
    res.pop("result", None)
    emit(res, output, lambda r: click.echo(
        f"{r['name'] or r['id']}: detached ({r['mode']} mode)" if r["was_attached"]
        else f"{r['name'] or r['id']}: was not attached; nothing to do"))


def _print_status(st):
    pods = st["pods"]
    click.echo(f"pods attached: {len(pods)}")
    for p in pods:
        cfg = p.get("config", {})
        click.echo(f"  {p.get('name')}  id={p.get('id')}  mode={p.get('mode')}  "
                   f"state={p.get('state', '?')}  "
                   f"proxy={cfg.get('proxy_port')}/{cfg.get('inbound_capture_port')} "
                   f"uid={cfg.get('proxy_uid')}" + (f"  fallback: {p['fallback']}" if p.get("fallback") else ""))
    agent = st.get("agent")
    if agent:
        click.echo(f"agent (pid {agent.get('pid')}, {'running' if agent.get('running') else 'stopped'}"
                   f", {agent.get('pods_file')}): {len(agent.get('pods', []))} pod(s)")
        if agent.get("file_error"):
            click.echo(f"  pods file: {agent['file_error']}")
        for src in agent.get("sources", []):
            if src.get("name") != "kubernetes":
                continue
            click.echo(f"  kubernetes (node {src.get('node')}): "
                       f"{'listed' if src.get('synced') else 'not listed yet'}, "
                       f"resourceVersion {src.get('resource_version')}"
                       + (f", error: {src['error']}" if src.get("error") else ""))
            for name, why in (src.get("waiting") or {}).items():
                click.echo(f"    {name}  not served: {why}")
        for p in agent.get("pods", []):
            err = f"  last error: {p['last_error']}" if p.get("last_error") else ""
            click.echo(f"  {p.get('name')}  id={p.get('id')}  source={p.get('source')}  "
                       f"state={p.get('state')}  mode={p.get('mode') or '-'}{err}")
    eb = st.get("ebpf", {})
    if not eb.get("loaded", True) and "programs" not in eb:
        click.echo(f"ebpf: not loaded (no pins under {st['pin_prefix']})")
        return
    if eb.get("error"):
        click.echo(f"ebpf: {eb['error']}")
        return
    click.echo(f"ebpf programs (version {eb.get('version') or 'unknown'}):")
    for prog in eb.get("programs", []):
        click.echo(f"  {prog.get('name'):<24} id={prog.get('id')}  {prog.get('attach', '')}")
    counters = eb.get("counters", {})
    if counters:
        click.echo("ebpf counters:")
        for k, v in sorted(counters.items()):
            click.echo(f"  {k:<28} {v}")


@main.command()
@node_options
@output_option
def status(pin_prefix, cgroup_root, output):
    """Show the mode, attached pods and their configs, programs, pins and counters.

    \b
    Examples:
      meshbpf status
      meshbpf status -o json | jq .ebpf.counters
    """
    emit(_service(pin_prefix, cgroup_root).status(), output, _print_status)


@main.command()
@node_options
@output_option
def cleanup(pin_prefix, cgroup_root, output):
    """Remove every meshbpf program, pin, tc/XDP hook and iptables rule this node has.

    \b
    Example:
      meshbpf cleanup
    """
    emit(_service(pin_prefix, cgroup_root).cleanup(), output, lambda d: click.echo(
        f"removed iptables rules from {d['iptables_pods']} pod(s); "
        + ("removed eBPF programs, hooks and pins" if d["ebpf"] else "no eBPF state found")))


def _register_subcommands():
    from .agent.command import daemon
    from .bench.commands import bench
    from .cni.commands import cni
    from .demo import demo
    from .ebpf.commands import ebpf
    from .ebpf.trace import trace_command
    from .iptables.commands import iptables
    from .probe import probe_command
    for cmd in (probe_command, iptables, ebpf, trace_command, bench, demo, daemon, cni):
        main.add_command(cmd)


_register_subcommands()
