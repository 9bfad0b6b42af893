"""The one interface both data paths implement: attach a pod, detach it, report status.

eBPF (`meshbpf.ebpf.interceptor.EbpfInterceptor`) and iptables
(`meshbpf.iptables.interceptor.IptablesInterceptor`) are its implementations; the CLI,
the agent and the benchmark only ever talk to this interface. `get_interceptor` imports
the eBPF backend lazily so iptables mode works without bcc.
"""

import abc
import os

DEFAULT_PIN_PREFIX = os.environ.get("MESHBPF_PIN_PREFIX", "/sys/fs/bpf/meshbpf")
MODES = ("ebpf", "iptables")


class Interceptor(abc.ABC):
    """Moves pods' traffic into their sidecars. Every method is idempotent."""

    mode = None

    def __init__(self, pin_prefix=DEFAULT_PIN_PREFIX, cgroup_root=None, **options):
        self.pin_prefix = pin_prefix
        self.cgroup_root = cgroup_root
        self.options = options

    @abc.abstractmethod
    def attach(self, pod, config):
        """Intercept `pod` (a meshbpf.pod.Pod) per `config`; returns the pod's record (dict).

        Re-attaching with the same config changes nothing; a failure leaves the pod
        as it was (raises a MeshbpfError).
        """

    @abc.abstractmethod
    def detach(self, pod):
        """Stop intercepting `pod`, removing exactly what attach added."""

    @abc.abstractmethod
    def status(self):
        """A JSON-able dict: mode, pods and their configs, and backend details."""

    @abc.abstractmethod
    def cleanup(self):
        """Remove everything this instance (pin prefix) ever installed, on every pod."""


def get_interceptor(mode, **kwargs):
    """The interceptor for `mode` ("ebpf" or "iptables")."""
    if mode == "ebpf":
        from .ebpf.interceptor import EbpfInterceptor
        return EbpfInterceptor(**kwargs)
    if mode == "iptables":
        from .iptables.interceptor import IptablesInterceptor
        return IptablesInterceptor(**kwargs)
    raise ValueError(f"unknown mode {mode!r}")
