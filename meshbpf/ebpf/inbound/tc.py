"""tc: meshbpf's filter on a pod's interfaces, found by its priority and name. Side effects.

tc_inbound_ingress (bpf/tc_inbound.c) runs at clsact ingress, direct-action: it hands a
SYN to the sidecar's listener with bpf_sk_assign(), which only exists at tc (hence
`select_hook`, which refuses XDP). Everything here runs netlink (pyroute2) in the pod's
netns: call it under `system.in_netns(pod.netns)` with a handle from `netlink()`, except
`list_hooks`, which enters the netns itself.
"""

import errno
import ipaddress
import json

from ... import system
from ...config import split_list
from ...errors import NotFoundError, UnsupportedError, UsageError

# How meshbpf's filters are recognised in a pod: this priority and name, handle 1.
TC_PRIO = 0x6d62                        # "mb"
TC_HANDLE = 1
TC_NAME = "meshbpf_inbound"
TC_INGRESS_PARENT = 0xFFFFFFF2          # clsact ingress (ffff:fff2)
TC_EGRESS_PARENT = 0xFFFFFFF3
ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
HOOKS = ("auto", "tc", "xdp")


def select_hook(hook, link_kind):
    """The hook that steers on an interface of kind `link_kind` ("veth", "macvlan", ...).

    Always "tc": steering hands the SYN to the listener socket with bpf_sk_assign(),
    which only exists at tc ingress; XDP has no socket to hand a packet to, and on veth
    it would also see CHECKSUM_PARTIAL/GSO packets whose checksum it cannot fix. "auto"
    and "tc" select tc; "xdp" is refused with the reason (see docs/inbound.md).
    """
    if hook not in HOOKS:
        raise UsageError(f"inbound hook {hook!r} is unknown: choose one of {', '.join(HOOKS)}")
    if hook == "xdp":
        raise UnsupportedError(
            f"inbound steering cannot run at XDP (interface kind {link_kind or 'unknown'}): it "
            "hands connections to the sidecar's listener with bpf_sk_assign, which exists only "
            "at tc ingress", hint="use hook 'tc' or 'auto'; docs/inbound.md explains")
    return "tc"


def netlink():
    """A netlink handle in the current thread's netns (call under system.in_netns)."""
    from pyroute2 import IPRoute
    return IPRoute()


def in_pod(pod, fn):
    """`fn(netlink handle)` to run later in the pod's netns (an undo step)."""
    def run():
        with system.in_netns(pod.netns):
            with netlink() as ipr:
                fn(ipr)
    return run


def links(ipr):
    out = []
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        out.append({"name": link.get_attr("IFLA_IFNAME"), "index": link["index"],
                    "type": link["ifi_type"], "kind": kind})
    return out


def pick_interfaces(all_links, config, interfaces):
    """The pod's links to hook: named ones, else every Ethernet link except lo and
    config.exclude_interfaces."""
    by_name = {l["name"]: l for l in all_links}
    if interfaces:
        missing = [n for n in interfaces if n not in by_name]
        if missing:
            raise NotFoundError(f"the pod has no interface {', '.join(missing)}")
        chosen = [by_name[n] for n in interfaces]
        bad = [l["name"] for l in chosen if l["type"] != ARPHRD_ETHER]
        if bad:
            raise UnsupportedError(f"interface {', '.join(bad)} has no Ethernet framing; "
                                   "tc_inbound parses Ethernet frames only")
        return chosen
    excluded = set(split_list(config.exclude_interfaces or ""))
    chosen = [l for l in all_links
              if l["name"] != "lo" and l["type"] == ARPHRD_ETHER and l["name"] not in excluded]
    if not chosen:
        raise NotFoundError("the pod has no Ethernet interface to steer inbound traffic on")
    return chosen


def addresses(ipr, indexes):
    out = []
    for a in ipr.get_addr():
        if a["index"] in indexes:
            out.append(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
    return out


def _qdiscs(ipr, index):
    return [q for q in ipr.get_qdiscs(index=index) if q["index"] == index]


def has_clsact(ipr, index):
    return any(q.get_attr("TCA_KIND") == "clsact" for q in _qdiscs(ipr, index))


def filters(ipr, index, parent):
    """Filters on `index`/`parent` (any classifier) as dicts: kind, prio, handle, name, ours.

    A tc filter shows up as a chain head (no options) plus its instances; only instances
    are listed."""
    out = []
    try:
        msgs = ipr.get_filters(index=index, parent=parent)
    except Exception as e:  # noqa: BLE001 - no clsact yet: no filters
        if getattr(e, "code", None) in (errno.EINVAL, errno.ENOENT):
            return out
        raise
    for f in msgs:
        opts = f.get_attr("TCA_OPTIONS")
        if not opts:
            continue
        kind = f.get_attr("TCA_KIND")
        prio = (f["info"] >> 16) & 0xFFFF
        name = (opts.get_attr("TCA_BPF_NAME") or "") if kind == "bpf" else ""
        out.append({"kind": kind, "prio": prio, "handle": f["handle"], "name": name,
                    "ours": kind == "bpf" and prio == TC_PRIO and name.startswith(TC_NAME)})
    return out


def add_filter(ipr, index, parent, fd, classid=None):
    extra = {} if classid is None else {"classid": classid}
    ipr.tc("replace-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO,
           protocol=ETH_P_ALL, fd=fd, name=TC_NAME, direct_action=True, **extra)


def del_filter(ipr, index, parent):
    try:
        ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO,
               protocol=ETH_P_ALL)
    except Exception as e:  # noqa: BLE001
        if getattr(e, "code", None) not in (errno.ENOENT, errno.EINVAL):
            raise


def list_hooks(pod):
    """meshbpf's inbound filters in `pod`: [{interface, index, kind, hook, direction, prio,
    name, prog_id, prog_name}] (from `tc -j filter show`, which reports program ids)."""
    out = []
    with system.in_netns(pod.netns):
        with netlink() as ipr:
            hooked = [l for l in links(ipr) if l["name"] != "lo" and has_clsact(ipr, l["index"])]
    for l in hooked:
        for direction in ("ingress", "egress"):
            res = system.run(["tc", "-j", "filter", "show", "dev", l["name"], direction],
                             netns=pod.netns, check=False)
            if res.returncode != 0:
                continue
            for f in json.loads(res.stdout or "[]"):
                opts = f.get("options") or {}
                if f.get("kind") != "bpf" or f.get("pref") != TC_PRIO or \
                        not str(opts.get("bpf_name", "")).startswith(TC_NAME):
                    continue
                prog = opts.get("prog") or {}
                out.append({"interface": l["name"], "index": l["index"], "kind": l["kind"],
                            "hook": "tc", "direction": direction, "prio": f["pref"],
                            "name": opts.get("bpf_name"), "direct_action":
                            bool(opts.get("direct-action")), "prog_id": prog.get("id"),
                            "prog_name": prog.get("name")})
    return out
