"""Inbound steering for meshed pods: TCP that arrives on a meshed pod's interface for a
captured port reaches the sidecar's inbound listener with its original destination intact.

The data path is bpf/tc_inbound.c (tc clsact ingress, bpf_sk_assign) with bpf/sk_lookup.c
for SYNs that meet a TIME_WAIT; docs/inbound.md explains both. One module per concern:

  policy.py     pure: Istio's inbound include/exclude semantics and the map entries
  tc.py         netlink: clsact qdiscs and meshbpf's filters on the pod's interfaces
  sklookup.py   the pod's pinned sk_lookup link (the TIME_WAIT path)
  listeners.py  the sidecar's capture listeners, adopted into capture_listeners
  attach.py     attach_pod / detach_pod / owners: all of the above, rolled back on failure

The feature probe that tries this steering for real is meshbpf.probe.inbound.
"""

from .attach import attach_pod, detach_pod, owners
from .policy import IFACE_MAX_ID, MAP_PODS
from .tc import list_hooks

__all__ = ["attach_pod", "detach_pod", "owners", "list_hooks", "IFACE_MAX_ID", "MAP_PODS"]
