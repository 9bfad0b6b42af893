"""`meshbpf ebpf ...`: look inside the eBPF data path (the C source, the maps, counters).

Thin click commands over meshbpf.ebpf.loader and meshbpf.ebpf.maps; the lead registers
the `ebpf` group on the root command. User errors are MeshbpfErrors (printed as one line).
"""

import json

import click

from ..errors import NotFoundError
from ..interceptor import DEFAULT_PIN_PREFIX

pin_option = click.option("--pin-prefix", default=DEFAULT_PIN_PREFIX, show_default=True,
                          envvar="MESHBPF_PIN_PREFIX",
                          help="bpffs directory of meshbpf's pinned programs and maps.")
output_option = click.option("-o", "--output", type=click.Choice(["text", "json"]),
                             default="text", show_default=True, help="Output format.")


@click.group("ebpf")
def ebpf():
    """Inspect the eBPF data path: its C source, pinned maps and counters."""


@ebpf.command("source")
@click.option("--probe/--no-probe", "use_probe", default=False,
              help="Choose feature flags by probing this kernel (needs root).")
def source_command(use_probe):
    """Print the C text bcc compiles (every program, with the bpf/lib/ headers it includes), as loaded on this node.

    \b
    Example:
      meshbpf ebpf source | less
    """
    from . import loader
    features = None
    if use_probe:
        from .. import probe
        features = probe.probe()
    click.echo(loader.render_source(features))


def _dump(pin_prefix):
    from . import loader, structs
    from .maps import Maps
    if not loader.is_loaded(pin_prefix):
        raise NotFoundError(f"meshbpf's eBPF programs are not loaded (no pins under {pin_prefix})")
    out = {"pods": [], "cidr_rules": [], "port_rules": [], "local_ips": [], "pairs": 0,
           "orig_dst": 0}
    with Maps(pin_prefix) as m:
        for k, v in m["pods"].items():
            out["pods"].append(dict(structs.describe_pod_struct(v), netns_cookie=k.value))
        for k, v in m["cidr_rules"].items():
            index, dns, net = structs.describe_cidr_key(k)
            rule = {"pod_index": index, "cidr": str(net),
                    "rule": "include" if v.value == structs.RULE_INCLUDE else "exclude"}
            if dns:
                rule["dns_server"] = True
            out["cidr_rules"].append(rule)
        for k, v in m["port_rules"].items():
            out["port_rules"].append({"pod_index": k.pod_index, "port": structs.ntohs(k.port),
                                      "rule": "include" if v.value == structs.RULE_INCLUDE
                                      else "exclude"})
        for k, v in m["local_ips"].items():
            out["local_ips"].append({"ip": str(structs.ip_from16(bytes(k.ip))),
                                     "pod_index": v.value})
        out["pairs"] = len(m["pairs"])
        out["orig_dst"] = len(m["orig_dst"])
        out["counters"] = m.counters()
    return out


@ebpf.command("maps")
@pin_option
@output_option
def maps_command(pin_prefix, output):
    """Dump meshbpf's pinned maps: pods, outbound rules, node-local IPs, counters.

    \b
    Example:
      meshbpf ebpf maps -o json
    """
    d = _dump(pin_prefix)
    if output == "json":
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    click.echo(f"pods: {len(d['pods'])}")
    for p in d["pods"]:
        click.echo(f"  cookie={p['netns_cookie']} index={p['pod_index']} "
                   f"proxy={p['proxy_port']}/{p['inbound_port']} uids={p['uids']} "
                   f"gids={p['gids']} flags={p['flags']:#x}")
    for r in d["cidr_rules"]:
        what = "dns server" if r.get("dns_server") else "cidr"
        click.echo(f"  {what}  pod {r['pod_index']}: {r['cidr']} {r['rule']}")
    for r in d["port_rules"]:
        click.echo(f"  port  pod {r['pod_index']}: {r['port']} {r['rule']}")
    click.echo(f"node-local IPs: {', '.join(i['ip'] for i in d['local_ips']) or '-'}")
    click.echo(f"connections: orig_dst={d['orig_dst']} pairs={d['pairs']}")
    click.echo("counters:")
    for k, v in d["counters"].items():
        click.echo(f"  {k:<20} {v}")


@ebpf.command("counters")
@pin_option
@output_option
def counters_command(pin_prefix, output):
    """Print the data path's per-CPU counters, summed."""
    from . import loader
    from .maps import Maps
    if not loader.is_loaded(pin_prefix):
        raise NotFoundError(f"meshbpf's eBPF programs are not loaded (no pins under {pin_prefix})")
    with Maps(pin_prefix) as m:
        c = m.counters()
    if output == "json":
        click.echo(json.dumps(c, indent=2))
    else:
        for k, v in c.items():
            click.echo(f"{k:<20} {v}")

