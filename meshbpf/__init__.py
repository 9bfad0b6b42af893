"""meshbpf: move a pod's traffic into its service-mesh sidecar with eBPF, or iptables where eBPF cannot."""

__version__ = "0.1.0"
