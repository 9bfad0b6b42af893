"""`meshbpf daemon`: the node agent's command and its logs (one line per decision, with
the pod's name; JSON lines with --log-format json)."""

import json
import logging
import os
import sys
import time

import click

_EXTRA = ("pod", "pod_id", "action", "reason", "error", "mode")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the decision's fields."""

    def format(self, record):
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k in _EXTRA:
            v = getattr(record, k, None)
            if v is not None:
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=True)


def setup_logging(fmt, level=logging.INFO):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("meshbpf")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.command()
@click.option("--pods-file", type=click.Path(dir_okay=False),
              help="YAML or JSON: {pods: [{name, pid} | {name, netns, cgroup} | {name: "
                   "namespace/name} (its CNI ADD says where), + id, config, host]}.")
@click.option("--kube", is_flag=True,
              help="Serve this node's meshed pods from the Kubernetes API (list + watch).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="With --kube: the kubeconfig (default: in-cluster, else $KUBECONFIG).")
@click.option("--node-name", envvar="NODE_NAME", default=None,
              help="With --kube: this node's name (default: $NODE_NAME).")
@click.option("--pin-prefix", default=None, envvar="MESHBPF_PIN_PREFIX",
              help="bpffs directory for meshbpf's pinned programs and maps.")
@click.option("--cgroup-root", type=click.Path(), default=None,
              envvar="MESHBPF_CGROUP_ROOT",
              help="cgroup v2 directory the eBPF hooks attach to (default: the cgroup v2 "
                   "mount's root; with --kube: auto). Every meshed pod must be below it. On a Kubernetes node "
                   "`kubepods`: the kubelet's kubepods cgroup (kubepods/ or kubepods.slice/, "
                   "found under the cgroup v2 mount), below a CNI's socket load balancer at "
                   "the root, so the sidecar sees the ClusterIP; `auto`: kubepods where there "
                   "is one, else the root.")
@click.option("--mode", type=click.Choice(["auto", "ebpf", "iptables"]), default="auto",
              show_default=True, help="auto: eBPF where the kernel allows it, else iptables.")
@click.option("--splice/--no-splice", default=True, show_default=True,
              help="eBPF: splice same-node sockets through the sockhash.")
@click.option("--metrics-addr", default=":9841", show_default=True,
              help="[HOST]:PORT for /metrics, /healthz and /readyz.")
@click.option("--resync", type=click.FloatRange(min=0.05), default=10.0, show_default=True,
              help="Seconds between full reconciles (drift repair).")
@click.option("--cleanup-on-exit", is_flag=True,
              help="On SIGTERM/SIGINT remove every pod's interception (default: leave it).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--cni-socket", default=None, metavar="PATH",
              help="Unix socket where meshbpf-cni has pods enrolled at their CNI ADD "
                   "(default /run/meshbpf/cni.sock; with another --pin-prefix, cni.sock in "
                   "that instance's state directory; 'none': no socket).")
def daemon(pods_file, kube, kubeconfig, node_name, pin_prefix, cgroup_root, mode, splice,
           metrics_addr, resync, cleanup_on_exit, log_format, cni_socket):
    """Run the node agent: keep every pod the pods file names, and with --kube every
    meshed pod Kubernetes schedules on this node, intercepted.

    Level-triggered: attaches new pods, applies changed configs, detaches removed pods and
    repairs drift (every --resync seconds), each pod on its own (backoff per pod). A
    change of the file is acted on within 100 ms; a file that does not parse is not acted
    on. SIGTERM leaves interception in place; --cleanup-on-exit removes it.

    \b
    Example:
      meshbpf daemon --pods-file /etc/meshbpf/pods.yaml --log-format json
      NODE_NAME=node-a meshbpf daemon --kube --kubeconfig ~/.kube/config
    """
    from ..errors import UsageError
    from ..interceptor import DEFAULT_PIN_PREFIX
    from ..service import NodeService
    from .daemon import Daemon
    from .metrics import Metrics
    from ..k8s.cgroups import KEYWORDS, resolve_cgroup_root
    if not pods_file and not kube:
        raise UsageError("name at least one pod source: --pods-file PATH and/or --kube")
    if kubeconfig and not kube:
        raise UsageError("--kubeconfig goes with --kube")
    setup_logging(log_format)
    if cgroup_root is None and kube:
        # On a Kubernetes node attach below a CNI's socket load balancer at the root (so the
        # sidecar sees the ClusterIP): the kubepods cgroup, or the root where there is none.
        cgroup_root = "auto"
    if cgroup_root in KEYWORDS:
        asked, cgroup_root = cgroup_root, resolve_cgroup_root(cgroup_root)
        logging.getLogger("meshbpf.agent").info(
            "attach point %s (--cgroup-root %s)", cgroup_root or "the cgroup v2 root", asked)
    sources = []
    if kube:
        from ..k8s.source import KubeSource
        sources.append(KubeSource(node_name, kubeconfig=kubeconfig, cgroup_root=cgroup_root))
    pin_prefix = pin_prefix or DEFAULT_PIN_PREFIX
    # reconcile: iptables mode re-applies drifted rules in place (no window without them);
    # upgrade: pinned programs of another version (an older agent's) are replaced in place
    svc = NodeService(pin_prefix=pin_prefix, cgroup_root=cgroup_root, mode=mode, splice=splice,
                      reconcile=True, upgrade=True)
    metrics = Metrics(pin_prefix)
    metrics.serve(metrics_addr)
    from .cniserver import default_socket
    if cni_socket is None:
        cni_socket = default_socket(pin_prefix, svc.store.instance_dir)
    Daemon(svc, pods_file, metrics=metrics, resync=resync, cleanup_on_exit=cleanup_on_exit,
           sources=sources,
           cni_socket=None if cni_socket == "none" else os.path.abspath(cni_socket)).run()
