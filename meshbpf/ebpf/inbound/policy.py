"""A pod's inbound policy in Istio's terms, and the map entries that carry it. Pure.

`inbound_policy(config)` turns an InterceptConfig into Istio's inbound semantics (include
'*' with excludes, or a list of ports; the ports in `config.inbound_excluded_always()` are
never captured), `steers(policy, port)` says what tc_inbound will decide, and
`policy_entries(policy, ips)` gives the `inbound_pods` / `inbound_ports` entries that make
it decide so. The byte layouts are those of meshbpf.ebpf.structs, the one mirror of the C
structs; this module only says what goes into them. No root, no kernel.
"""

import dataclasses
import ipaddress

from ...config import WILDCARD
from ...errors import ApplyError
from .. import structs

PROG_INGRESS = "tc_inbound_ingress"
PROG_SK_LOOKUP = "mb_sk_lookup"
MAP_PODS = "inbound_pods"
MAP_PORTS = "inbound_ports"
MAP_NETNS = "inbound_netns"
MAP_TW = "inbound_tw"
MAP_LISTENERS = "capture_listeners"
MAP_IFACES = "inbound_ifaces"

INBOUND_IFACE_MAJOR = 0x4d420000        # classid major of meshbpf's filters ("MB")
IFACE_MAX_ID = 0xfff0                   # minors 0xfff2/0xfff3 name clsact's own classes


@dataclasses.dataclass(frozen=True)
class InboundPolicy:
    """Which inbound ports of a pod go to its sidecar, in Istio's terms.

    wildcard: every port not in `bypass` is captured (inbound_ports_include '*');
    otherwise exactly the ports in `capture` are.
    """

    capture_port: int
    wildcard: bool
    capture: tuple = ()
    bypass: tuple = ()

    def to_dict(self):
        return dataclasses.asdict(self)


def inbound_policy(config):
    """InterceptConfig -> InboundPolicy with Istio's inbound include/exclude semantics.

    include '*': everything except inbound_ports_exclude and the always-excluded ports;
    include list: only those ports (Istio ignores inbound_ports_exclude then), minus the
    always-excluded ones; include '': nothing.
    """
    include, exclude = config.inbound_ports()
    always = set(config.inbound_excluded_always())
    if include == WILDCARD:
        return InboundPolicy(config.inbound_capture_port, True, (),
                             tuple(sorted(set(exclude) | always)))
    return InboundPolicy(config.inbound_capture_port, False,
                         tuple(sorted(set(include) - always)), ())


def steers(policy, port):
    """True if tc_inbound steers a connection to `port` of a pod with `policy`."""
    if port in policy.bypass:
        return False
    if port in policy.capture:
        return True
    return policy.wildcard


def pod_value(policy, sk_lookup=False, owner=0):
    """inbound_pods value; `sk_lookup`: mb_sk_lookup is linked in the pod's netns (tc then
    leaves SYNs that meet a TIME_WAIT to the kernel's TIME_WAIT path); `owner`: the netns
    cookie of the pod the entry belongs to (only its owner removes it)."""
    flags = (structs.INBOUND_POD_WILDCARD if policy.wildcard else 0) | \
        (structs.INBOUND_POD_CAPTURES if policy.wildcard or policy.capture else 0) | \
        (structs.INBOUND_POD_SK_LOOKUP if sk_lookup else 0)
    return structs.inbound_pod_val(policy.capture_port, flags, owner)


def pod_owner(raw):
    """The owner (netns cookie) of an inbound_pods value; 0 if unknown."""
    return structs.from_bytes(structs.InboundPodVal, raw).owner


def decode_pod_value(raw):
    v = structs.from_bytes(structs.InboundPodVal, raw)
    return {"capture_port": structs.ntohs(v.capture_port),
            "wildcard": bool(v.flags & structs.INBOUND_POD_WILDCARD),
            "captures": bool(v.flags & structs.INBOUND_POD_CAPTURES)}


def netns_entries(pod_keys, netns_cookie):
    """inbound_netns entries: every pod IP (inbound_pods keys) -> the pod's netns cookie."""
    return {k: structs.u64_bytes(netns_cookie) for k in pod_keys}


def policy_entries(policy, addresses, sk_lookup=False, owner=0):
    """The map entries for a pod with `policy` and IPs `addresses`.

    Returns {map name: {key bytes: value bytes}}: one inbound_pods entry per pod IP and
    one inbound_ports entry per (IP, listed port). Link-local and loopback addresses are
    not pod IPs and are skipped. `sk_lookup`, `owner`: see pod_value.
    """
    pods, ports = {}, {}
    for ip in sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a)):
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        pods[structs.inbound_pod_key(ip)] = pod_value(policy, sk_lookup, owner)
        for port in policy.capture:
            ports[structs.inbound_port_key(ip, port)] = \
                structs.u32_bytes(structs.INBOUND_PORT_CAPTURE)
        for port in policy.bypass:
            ports[structs.inbound_port_key(ip, port)] = \
                structs.u32_bytes(structs.INBOUND_PORT_BYPASS)
    return {MAP_PODS: pods, MAP_PORTS: ports}


def iface_id(current, netns_cookie):
    """The id of a pod's tc filters (classid 4d42:<id>, the inbound_ifaces key): the one its
    netns already has (`current`: {id: netns cookie}), else the lowest free one."""
    for n, cookie in sorted(current.items()):
        if cookie == netns_cookie:
            return n
    for n in range(1, IFACE_MAX_ID + 1):
        if n not in current:
            return n
    raise ApplyError(f"inbound_ifaces is full ({IFACE_MAX_ID} pods)")


def iface_value(pod_keys, netns_cookie):
    """inbound_ifaces value: the pod's first enrolled IP (its policy) and its netns cookie."""
    return structs.inbound_iface_val(sorted(pod_keys)[0], netns_cookie)
