"""Which module implements which mode. Names only: importing this imports no backend,
so iptables mode works without bcc and nothing imports the service back."""

import importlib

MODES = ("ebpf", "iptables")

_REGISTRY = {
    "ebpf": ("meshbpf.ebpf.interceptor", "EbpfInterceptor"),
    "iptables": ("meshbpf.iptables.interceptor", "IptablesInterceptor"),
}

# The options each backend takes (the service passes only these).
OPTIONS = {
    "ebpf": ("splice", "ipv6_auto", "pod_conn_limit", "inbound_sk_lookup", "features", "upgrade"),
    "iptables": ("iptables_binary", "reconcile", "ipv6_auto", "group_file", "cleanup_config"),
}


def backend(mode, **options):
    """An instance of `mode`'s Interceptor with the options it takes."""
    if mode not in _REGISTRY:
        raise ValueError(f"unknown mode {mode!r}")
    module, name = _REGISTRY[mode]
    cls = getattr(importlib.import_module(module), name)
    keep = OPTIONS[mode] + ("pin_prefix", "cgroup_root")
    return cls(**{k: v for k, v in options.items() if k in keep and v is not None})
