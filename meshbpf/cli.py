"""The `meshbpf` command: parse, call the library, render text or JSON. Nothing else.

Exit codes: 0 ok, 1 failure, 2 bad input, 3 not found, 4 unsupported by this kernel or
machine, 5 apply failed and was rolled back. Errors are one sentence on stderr, never a
traceback, for anything a user can cause.
"""

import json
import sys

import click

from . import __version__
from .errors import MeshbpfError


class MeshGroup(click.Group):
    """Turns MeshbpfError into a one-line message and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MeshbpfError as e:
            click.echo(f"meshbpf: error: {e}", err=True)
            sys.exit(e.exit_code)
        except PermissionError as e:
            click.echo(f"meshbpf: error: {e.strerror}: {e.filename or ''} (run as root)", err=True)
            sys.exit(4)


def emit(obj, output, text_fn):
    """Print `obj` as JSON (-o json) or through `text_fn` (the default text form)."""
    if output == "json":
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        text_fn(obj)


output_option = click.option("-o", "--output", type=click.Choice(["text", "json"]),
                             default="text", show_default=True, help="Output format.")


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
