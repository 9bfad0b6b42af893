"""`meshbpf iptables ...`: render, apply, verify and clean up Istio's rules by hand.

Thin click layer over rules.py (pure) and apply.py (the netns side); every user error
is a MeshbpfError printed as one sentence with its exit code, never a traceback.

    meshbpf iptables render -i 10.0.0.0/8 --redirect-dns --dns-servers-v4 10.96.0.10
    meshbpf iptables apply --netns /run/netns/pod1 -b '*' -d 15020,15021,15090
    meshbpf iptables verify --pid 4242
    meshbpf iptables apply --pid 4242 --reconcile -x 10.1.0.0/16
    meshbpf iptables cleanup --pid 4242
"""

import json

import click

from . import apply as ops
from . import rules
from .backend import VARIANTS
from ..clickutil import MeshGroup
from ..cliopts import config_from_options, config_options
from ..errors import MeshbpfError, UsageError  # noqa: F401
from ..pod import Pod


@click.group("iptables", cls=MeshGroup)
def iptables():
    """Istio-identical iptables interception (the fallback when eBPF cannot)."""


def _target_options(f):
    from ..interceptor import DEFAULT_PIN_PREFIX
    f = click.option("--pin-prefix", default=DEFAULT_PIN_PREFIX, show_default=True,
                     envvar="MESHBPF_PIN_PREFIX",
                     help="meshbpf instance whose pod records are used (as for attach).")(f)
    f = click.option("--output", type=click.Choice(["text", "json"]), default="text",
                     show_default=True, help="Output format.")(f)
    f = click.option("--iptables-binary", type=click.Choice(VARIANTS), default=None,
                     help="Force the nft or legacy iptables (default: detect as Istio does).")(f)
    f = click.option("--pid", type=int, default=None, help="A process of the pod.")(f)
    f = click.option("--netns", default=None, metavar="PATH",
                     help="The pod's network namespace (a path, or a name under /run/netns).")(f)
    return f


def _pod(netns, pid):
    if (netns is None) == (pid is None):
        raise UsageError("name the pod with exactly one of --netns PATH or --pid PID")
    return Pod.from_pid(pid) if pid is not None else Pod.from_netns(netns)


def _families(pod, cfg, ipv6_auto):
    if cfg.enable_ipv6:
        return cfg, (4, 6)
    if ipv6_auto and pod.has_ipv6:
        return cfg.replace(enable_ipv6=True), (4, 6)
    return cfg, (4,)


def _emit(obj, output, text):
    if output == "json":
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


@iptables.command()
@config_options
@click.option("--family", type=click.Choice(["4", "6"]), default="4", show_default=True,
              help="Address family of the payload (6 implies --ipv6).")
def render(family, **kwargs):
    """Print the iptables-restore --noflush payload for these options (no side effects)."""
    cfg, rest = config_from_options(kwargs)
    if family == "6":
        if not cfg.enable_ipv6 and not rest["ipv6_auto"]:
            raise UsageError("--family 6 was asked for, but IPv6 is turned off (--no-ipv6 or the config)")
        cfg = cfg.replace(enable_ipv6=True)
    click.echo(rules.render(cfg, int(family)), nl=False)


def _service(pin_prefix, iptables_binary, **options):
    from ..service import NodeService
    return NodeService(pin_prefix=pin_prefix, mode="iptables", iptables_binary=iptables_binary,
                       **options)


@iptables.command()
@config_options
@_target_options
@click.option("--reconcile", is_flag=True,
              help="Replace meshbpf/Istio rules that differ (drift or another config) atomically.")
def apply(netns, pid, iptables_binary, output, pin_prefix, reconcile, **kwargs):
    """Install the rules in a pod's netns (one iptables-restore per family; idempotent).

    The pod is recorded like `meshbpf attach --mode iptables` does, so `meshbpf status`
    shows it and `cleanup` removes exactly what was added.
    """
    cfg, rest = config_from_options(kwargs)
    pod = _pod(netns, pid)
    rec = _service(pin_prefix, iptables_binary, reconcile=reconcile,
                       ipv6_auto=rest["ipv6_auto"]).attach(pod, cfg)
    out = {k: rec[k] for k in ("name", "netns", "families", "backend", "actions", "config", "warnings")}
    text = "\n".join([f"IPv{f}: {a} ({rec['backends'][f]})" for f, a in rec["actions"].items()]
                     + [f"warning: {w}" for w in rec["warnings"]])
    _emit(out, output, text)


@iptables.command()
@config_options
@_target_options
def verify(netns, pid, iptables_binary, output, pin_prefix, **kwargs):
    """Compare a pod's rules with these options; exit 1 and list the drift if they differ.

    Without options, a pod attached by meshbpf is compared with the config it was
    attached with.
    """
    from ..config import InterceptConfig
    pod = _pod(netns, pid)
    rec = _service(pin_prefix, iptables_binary).record_of(pod)
    explicit = any(v is not None for k, v in kwargs.items())
    if rec and not explicit:
        cfg = InterceptConfig.from_dict(rec["config"])
        fams = tuple(rec.get("families", [4]))
        iptables_binary = iptables_binary or rec.get("backend")
    else:
        cfg, rest = config_from_options(kwargs)
        cfg, fams = _families(pod, cfg, rest["ipv6_auto"])
    res = ops.verify(pod.netns, cfg, families=fams, force=iptables_binary,
                     recorded=(rec or {}).get("builtin"))
    out = {"pod": pod.describe(), "in_sync": all(r["in_sync"] for r in res.values()),
           "families": {str(f): r for f, r in res.items()}}
    lines = []
    for f, r in res.items():
        lines.append(f"IPv{f}: {'in sync' if r['in_sync'] else 'DRIFT'} ({r['backend']})")
        lines += [f"  {d}" for d in r["drift"]]
    _emit(out, output, "\n".join(lines))
    if not out["in_sync"]:
        raise MeshbpfError("the pod's rules differ from the wanted ones",
                           hint="`meshbpf iptables apply --reconcile` repairs them")


@iptables.command()
@config_options
@_target_options
def cleanup(netns, pid, iptables_binary, output, pin_prefix, **kwargs):
    """Remove exactly what meshbpf added: ISTIO_* chains and their rules in built-in chains.

    For a pod meshbpf applied, its record says what was added. For rules applied by
    something else (istio-init), pass the options they were applied with so that
    built-in-chain rules that are not jumps (interface exclusions, TPROXY marks) are
    found too.
    """
    cfg, _ = config_from_options(kwargs)
    pod = _pod(netns, pid)
    res = _service(pin_prefix, iptables_binary, cleanup_config=cfg).detach(pod)
    fams = res.get("result") or {}
    out = {"pod": pod.describe(), "families": {str(f): r for f, r in fams.items()}}
    text = "\n".join(f"IPv{f}: {'removed' if r['removed'] else 'nothing to remove'} ({r['backend']})"
                     for f, r in fams.items())
    _emit(out, output, text)
