"""Which data path a pod gets, and the attach/detach flow every caller shares.

`--mode auto` takes eBPF where the probe allows it and iptables otherwise, and says why.
If eBPF was chosen automatically but loading or attaching fails for a pod at run time,
that pod falls back to iptables instead of being left unintercepted, and the record says
so. A forced mode never falls back: its failure is the answer.
"""

import logging

from .errors import MeshbpfError, UsageError
from .interceptor import MODES, get_interceptor
from .state import StateStore

log = logging.getLogger(__name__)


def choose_mode(requested, assume_kernel=None):
    """(mode, reason) for `requested` in auto|ebpf|iptables."""
    if requested in MODES:
        return requested, f"{requested} mode requested by the operator"
    if requested != "auto":
        raise UsageError(f"unknown mode {requested!r}", hint="use auto, ebpf or iptables")
    from . import probe
    result = probe.probe(assume_kernel=assume_kernel)
    return result["mode"], result["reason"]


def attach(pod, config, mode="auto", assume_kernel=None, **kw):
    """Attach `pod` with `config`; returns its record, with `mode`, `reason` and `fallback`."""
    chosen, reason = choose_mode(mode, assume_kernel)
    fallback = None
    try:
        record = get_interceptor(chosen, **_for(chosen, kw)).attach(pod, config)
    except MeshbpfError as e:
        if mode != "auto" or chosen != "ebpf" or getattr(e, "no_fallback", False):
            raise
        fallback = f"eBPF attach failed ({e}); fell back to iptables"
        log.warning("%s: %s", pod.name, fallback)
        chosen, reason = "iptables", fallback
        record = get_interceptor("iptables", **_for("iptables", kw)).attach(pod, config)
    record = dict(record, mode=chosen, reason=reason, fallback=fallback)
    StateStore(kw["pin_prefix"]).save(pod.key, record)
    return record


def detach(pod, **kw):
    """Detach `pod` in whichever mode it was attached; returns the mode, or None if it was not."""
    store = StateStore(kw["pin_prefix"])
    rec = store.load(pod.key)
    modes = [rec["mode"]] if rec and rec.get("mode") in MODES else list(MODES)
    for m in modes:
        if m == "ebpf" and rec is None and not _ebpf_present(kw["pin_prefix"]):
            continue
        get_interceptor(m, **_for(m, kw)).detach(pod)
    store.remove(pod.key)
    return rec["mode"] if rec else None


def _ebpf_present(pin_prefix):
    import os
    return os.path.isdir(pin_prefix)


def _for(mode, kw):
    """The keyword arguments `mode`'s interceptor takes."""
    keys = {"ebpf": ("pin_prefix", "cgroup_root", "splice", "ipv6_auto"),
            "iptables": ("pin_prefix", "iptables_binary", "reconcile", "ipv6_auto")}[mode]
    return {k: kw[k] for k in keys if k in kw}
