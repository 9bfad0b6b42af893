"""`meshbpf probe`: the click command and its text rendering (registered on the root group
by meshbpf.cli)."""

import json
import sys

import click

from ..errors import MeshbpfError
from . import prober
from .features import ASSUME_ENV, DEGRADES, FEATURES, INFO, IPTABLES, REQUIRED, fmt_version


def _role_words(f):
    if f.role == DEGRADES:
        return "optional"
    return {REQUIRED: "required", IPTABLES: "iptables", INFO: "info"}[f.role]


def render_text(report):
    """The human table `meshbpf probe` prints."""
    kernel = report["kernel"]
    if report.get("assumed_kernel"):
        kernel += f" (assuming {report['assumed_kernel']})"
    lines = [f"kernel: {kernel}", ""]
    rows = [("FEATURE", "MAINLINE", "ROLE", "STATUS", "DETAIL")]
    for f in FEATURES:
        r = report["features"].get(f.name, {"ok": False, "detail": "not probed"})
        rows.append((f.name, fmt_version(f.mainline) if f.mainline else "-", _role_words(f),
                     "ok" if r["ok"] else "missing", r["detail"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    lines.append("")
    lines.append(f"mode: {report['mode']} — {report['reason']}")
    if report.get("degraded"):
        lines.append("degraded: " + "; ".join(report["degraded"]))
    if report["mode"] == "ebpf" and "inbound_reuseport" in report:
        lines.append("inbound to SO_REUSEPORT listeners: " + {
            "sk_assign": "assigned by tc (bpf_sk_assign)",
            "sk_lookup": "through sk_lookup (bpf_sk_assign refuses them before Linux 6.5)"}.get(
                report["inbound_reuseport"], "not possible: the sidecar's inbound listener "
                "must not use SO_REUSEPORT"))
    return "\n".join(lines)


@click.command("probe")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
@click.option("--assume-kernel", metavar="X.Y", envvar=ASSUME_ENV, default=None,
              help=f"Treat kernel features newer than X.Y as absent (also ${ASSUME_ENV}).")
def probe_command(output, assume_kernel):
    """Try each kernel feature meshbpf uses and print the mode it would choose, and why.

    \b
    Examples:
      meshbpf probe
      meshbpf probe -o json
      meshbpf probe --assume-kernel 3.10    # what an old kernel would get
    """
    try:
        report = prober.probe(assume_kernel=assume_kernel)
    except MeshbpfError as e:
        click.echo(f"meshbpf: error: {e}", err=True)
        sys.exit(e.exit_code)
    if output == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(render_text(report))
