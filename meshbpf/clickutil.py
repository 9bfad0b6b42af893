"""Click plumbing every meshbpf command group shares: one-line errors with meaningful
exit codes, and the text-or-JSON output option.

Kept apart from cli.py so command groups in subpackages can use it without importing the
root command (which imports them).
"""

import json
import sys

import click

from .errors import MeshbpfError


class MeshGroup(click.Group):
    """Turns MeshbpfError into a one-line message and its exit code (no traceback)."""

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
