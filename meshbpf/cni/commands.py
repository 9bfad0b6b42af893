"""`meshbpf cni install|uninstall`: put meshbpf-cni on a node and take it off again."""

import click

from ..clickutil import MeshGroup, emit, output_option


@click.group("cni", cls=MeshGroup)
def cni():
    """The chained CNI plugin that enrolls a pod before its containers start."""


def _dirs(f):
    from .install import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR
    f = click.option("--conf-dir", default=DEFAULT_CONF_DIR, show_default=True,
                     type=click.Path(file_okay=False),
                     help="The runtime's CNI network configuration directory.")(f)
    f = click.option("--bin-dir", default=DEFAULT_BIN_DIR, show_default=True,
                     type=click.Path(file_okay=False), help="The runtime's CNI plugin directory.")(f)
    return f


def _text(r, verb):
    click.echo(f"{r['plugin']}: {verb if r['plugin_changed'] else 'unchanged'}")
    for n in r["written"]:
        click.echo(f"  wrote {n}")
    for n in r["removed"]:
        click.echo(f"  removed {n}")
    if not (r["written"] or r["removed"]):
        click.echo("  network configuration unchanged")


@cni.command()
@_dirs
@click.option("--agent-socket", default=None, metavar="PATH",
              help="The agent's CNI socket (plugin default /run/meshbpf/cni.sock).")
@click.option("--fail-open", is_flag=True,
              help="Let pods start unintercepted when the agent cannot be reached.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=None, help="The plugin's log level (default warning).")
@click.option("--log-file", default=None, metavar="PATH",
              help="The plugin's log file (default: stderr, which the runtime logs).")
@click.option("--python", "python", default=None, metavar="PATH",
              help="The node's Python 3 that runs the plugin (default /usr/bin/python3).")
@output_option
def install(bin_dir, conf_dir, agent_socket, fail_open, log_level, log_file, python, output):
    """Copy meshbpf-cni into BIN-DIR and chain it into the node's network configuration
    (the first file of CONF-DIR by name; a .conf becomes a .conflist). Idempotent.

    \b
    Example:
      meshbpf cni install --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
    """
    from . import install as inst
    r = inst.install(bin_dir, conf_dir, python=python or inst.DEFAULT_PYTHON,
                     agent_socket=agent_socket, fail_open=fail_open, log_level=log_level,
                     log_file=log_file)
    emit(r, output, lambda r: _text(r, "installed"))


@cni.command()
@_dirs
@output_option
def uninstall(bin_dir, conf_dir, output):
    """Remove meshbpf-cni from BIN-DIR and from every configuration in CONF-DIR, restoring
    the file install changed.

    \b
    Example:
      meshbpf cni uninstall --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
    """
    from . import install as inst
    emit(inst.uninstall(bin_dir, conf_dir), output, lambda r: _text(r, "removed"))
