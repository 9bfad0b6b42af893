"""The contract both data paths implement. Backends change the kernel; they keep no records.

eBPF (`meshbpf.ebpf.interceptor.EbpfInterceptor`) and iptables
(`meshbpf.iptables.interceptor.IptablesInterceptor`) implement it; `meshbpf.backends`
picks one by name and `meshbpf.service.NodeService` is the only caller: it holds the
node lock, loads and saves the pod's record and hands it in. Every method is idempotent,
and a failing `attach` leaves the pod as it was.
"""

import abc
import os

DEFAULT_PIN_PREFIX = os.environ.get("MESHBPF_PIN_PREFIX", "/sys/fs/bpf/meshbpf")


class Interceptor(abc.ABC):
    """Moves pods' traffic into their sidecars."""

    mode = None

    def __init__(self, pin_prefix=DEFAULT_PIN_PREFIX, cgroup_root=None, **options):
        self.pin_prefix = pin_prefix
        self.cgroup_root = cgroup_root
        self.options = options

    @abc.abstractmethod
    def attach(self, pod, config, previous=None, ctx=None):
        """Intercept `pod` (a meshbpf.pod.Pod) per `config` (an InterceptConfig).

        `previous` is the pod's record when it is already attached (a re-attach or an
        update: replace its rules without a window); `ctx` is the service's AttachContext
        (owner lookups, index allocation, phase timings). Returns the new record body.
        """

    @abc.abstractmethod
    def detach(self, record, pod=None, ctx=None):
        """Remove exactly what `record` says was installed; `pod` is None when the pod's
        netns is gone."""

    @abc.abstractmethod
    def status(self, records):
        """{"mode", "pods": {pod id: live facts}, ...node-wide facts} for `records`."""

    @abc.abstractmethod
    def cleanup(self, records):
        """Remove everything this pin prefix ever installed in this mode; returns a dict."""
