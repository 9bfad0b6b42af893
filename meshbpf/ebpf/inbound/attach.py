"""Enroll a pod's inbound traffic and undo it: map entries, tc filters, the TIME_WAIT path.

`attach_pod(pod, config, maps, progs)` writes the pod IPs' policy entries (policy.py),
installs tc_inbound_ingress on the pod's interfaces (tc.py) and, where the node has
mb_sk_lookup pinned, sets up the TIME_WAIT path first: the sk_lookup link (sklookup.py),
`inbound_netns` (pod IP -> netns cookie) and the sidecar's existing capture listeners
(listeners.py), with INBOUND_POD_SK_LOOKUP in the pod's entries so that tc marks SYNs that
meet a TIME_WAIT in `inbound_tw` and leaves them to the kernel. On failure everything it
changed is restored. `detach_pod(pod, maps, record)` removes exactly what attach added
(the clsact qdisc only if meshbpf created it); `owners(maps, addresses)` says which pod
owns an address's entries.

`maps` maps a map name to a map fd, a bcc table or a PinnedMap (a meshbpf.ebpf.maps.Maps
of the pin prefix is what gives the TIME_WAIT path a place to pin its link); `progs` a
program name to a program fd or a bcc function. Nothing here loads or pins programs:
meshbpf/ebpf/loader.py does.
"""

import contextlib
import ctypes
import ipaddress
import os

from ... import bpfsys, system
from ...errors import AddressInUseError, ApplyError, MeshbpfError, NotFoundError, UsageError
from .. import structs
from . import listeners, sklookup, tc
from .policy import (IFACE_MAX_ID, INBOUND_IFACE_MAJOR, MAP_IFACES, MAP_LISTENERS, MAP_NETNS, MAP_PODS,
                     MAP_PORTS, MAP_TW, PROG_INGRESS, PROG_SK_LOOKUP, iface_id, iface_value,
                     inbound_policy, netns_entries, pod_owner, policy_entries)

_POD_VAL_SIZE = ctypes.sizeof(structs.InboundPodVal)
_PORT_KEY_SIZE = ctypes.sizeof(structs.InboundPortKey)
_PORT_VAL_SIZE = 4                      # __u32 action
_NETNS_VAL_SIZE = 8                     # __u64 netns cookie
_IFACE_KEY_SIZE = 4                     # __u32 id
_IFACE_VAL_SIZE = ctypes.sizeof(structs.InboundIfaceVal)
_TW_KEY_SIZE = ctypes.sizeof(structs.InboundTwKey)
_LISTENER_KEY_SIZE = ctypes.sizeof(structs.CaptureListenerKey)


def _fd(obj, attr):
    """An fd from an int, a bcc object (.map_fd / .fd) or a PinnedMap (.fd)."""
    if isinstance(obj, int):
        return obj
    for name in (attr, "fd"):
        fd = getattr(obj, name, None)
        if isinstance(fd, int):
            return fd
    raise UsageError(f"{obj!r} is not a file descriptor or an object with .{attr}")


def _map_fds(maps):
    try:
        return {name: _fd(maps[name], "map_fd") for name in (MAP_PODS, MAP_PORTS)}
    except KeyError as e:
        raise UsageError(f"the loaded eBPF object has no map {e.args[0]!r}; "
                         "was bpf/tc_inbound.c compiled in?")


def _prog_fd(progs):
    try:
        return _fd(progs[PROG_INGRESS], "fd")
    except KeyError:
        raise UsageError(f"the loaded eBPF object has no program {PROG_INGRESS!r}")


def _has_map(maps, name):
    if hasattr(maps, "exists"):                 # meshbpf.ebpf.maps.Maps
        return maps.exists(name)
    try:
        maps[name]
    except KeyError:
        return False
    return True


def _pin_prefix(maps):
    """The pin prefix of a meshbpf.ebpf.maps.Maps (`<prefix>/maps`), else None."""
    d = getattr(maps, "dir", None)
    return os.path.dirname(d) if isinstance(d, str) else None


def _sk_lookup_prog(maps, progs):
    """(program fd, owned, None) of mb_sk_lookup (owned: opened here, the caller closes it),
    or (None, False, reason) when the TIME_WAIT path cannot be set up: the program is not
    loaded (a kernel without sk_lookup or ctx->ingress_ifindex) or the maps are not the
    node's pinned ones (no place to pin the link)."""
    if _pin_prefix(maps) is None:
        return None, False, "maps are not meshbpf's pinned maps: no place to pin a link"
    if not all(_has_map(maps, m) for m in (MAP_NETNS, MAP_TW, MAP_LISTENERS)):
        return None, False, "the loaded eBPF object has no sk_lookup maps"
    if PROG_SK_LOOKUP in progs:
        return _fd(progs[PROG_SK_LOOKUP], "fd"), False, None
    pin = os.path.join(_pin_prefix(maps), "progs", PROG_SK_LOOKUP)
    if not os.path.exists(pin):
        return None, False, (f"program {PROG_SK_LOOKUP} is not loaded (this kernel lacks "
                             "sk_lookup programs, Linux 5.9)")
    return bpfsys.obj_get(pin), True, None


def _ifaces(ops, fd):
    """{id: netns cookie} of inbound_ifaces."""
    out = {}
    for k in ops.map_keys(fd, _IFACE_KEY_SIZE):
        v = ops.map_lookup_elem(fd, k, _IFACE_VAL_SIZE)
        if v is not None:
            out[structs.from_bytes(structs.U32, k).value] = \
                structs.from_bytes(structs.InboundIfaceVal, v).netns
    return out


def _listener_keys(ops, fd, cookie):
    """The capture_listeners keys of the netns with `cookie`."""
    return [k for k in ops.map_keys(fd, _LISTENER_KEY_SIZE)
            if structs.from_bytes(structs.CaptureListenerKey, k).netns == cookie]


def _pod_port_keys(ops, ports_fd, pod_keys):
    ips = {bytes(k)[:16] for k in pod_keys}
    return [k for k in ops.map_keys(ports_fd, _PORT_KEY_SIZE) if k[:16] in ips]


def _owned(ops, pods_fd, addr, owner):
    """Is `addr`'s inbound_pods entry (if any) `owner`'s? Entries without an owner (0, from
    before owners were recorded) count as anyone's; an unknown `owner` owns only those."""
    raw = ops.map_lookup_elem(pods_fd, structs.inbound_pod_key(addr), _POD_VAL_SIZE)
    if raw is None:
        return True                      # nothing to take from anyone (ports, marks: ours)
    cur = pod_owner(raw)
    return cur == 0 or cur == owner


def owners(maps, addresses):
    """{address: owner netns cookie} of the addresses enrolled in inbound_pods."""
    fd = _map_fds(maps)[MAP_PODS]
    out = {}
    for a in addresses:
        raw = bpfsys.map_lookup_elem(fd, structs.inbound_pod_key(a), _POD_VAL_SIZE)
        if raw is not None:
            out[str(ipaddress.ip_address(a))] = pod_owner(raw)
    return out


def _recorded_port_keys(record):
    """The inbound_ports keys a pod's inbound record says it wrote."""
    policy = (record or {}).get("policy") or {}
    ports = list(policy.get("capture", ())) + list(policy.get("bypass", ()))
    return {structs.inbound_port_key(a, p) for a in (record or {}).get("addresses", ())
            for p in ports}


def _recorded_listener_keys(record, cookie):
    """The capture_listeners keys of the pod's capture port (one per family: sockops adds
    later listeners under the same keys)."""
    port = ((record or {}).get("policy") or {}).get("capture_port")
    if port is None or cookie is None:
        return None
    return [structs.capture_listener_key(cookie, port, f)
            for f in (structs.MB_AF_INET, structs.MB_AF_INET6)]


def _recorded_iface_id(record):
    classid = ((record or {}).get("iface") or {}).get("classid")
    return classid & 0xffff if classid else None


def attach_pod(pod, config, maps, progs, interfaces=None, hook="auto", owner_alive=None,
               previous=None, iface_ids=None, phase=None):
    """Steer `pod`'s inbound TCP per `config`; returns a JSON-able record for detach/status.

    Writes the pod IPs' entries into inbound_pods/inbound_ports (replacing the pod's old
    ones) and puts tc_inbound_ingress on the ingress of each chosen interface (creating a
    clsact qdisc where there is none). Where mb_sk_lookup is available (see the module
    docstring) it first sets up the TIME_WAIT path; the record's "sk_lookup" says whether
    it did ({"enabled": False, "reason": ...} otherwise). Idempotent. On failure
    everything this call changed is restored and ApplyError is raised.

    Entries carry the pod's netns cookie as owner. An address whose entry another pod owns
    is refused (UsageError, nothing changed) unless `owner_alive(cookie)` says that pod is
    gone (its entries are then taken over); without `owner_alive` every owner counts as alive.

    `previous` is the pod's earlier inbound record (a re-attach): what it lists and this
    config drops is removed, by key. `iface_ids` allocates a filter id (a callable giving
    an int, or None when none is free). With both, nothing here walks a map: the cost
    does not grow with the number of pods on the node. `phase(name)` (a context manager)
    times the steps: "tc", "sk_lookup", "maps".
    """
    phase = phase or _untimed
    policy = inbound_policy(config)
    fds = _map_fds(maps)
    prog_fd = _prog_fd(progs)
    ops = bpfsys
    with phase("tc"), system.in_netns(pod.netns):
        with tc.netlink() as ipr:
            chosen = tc.pick_interfaces(tc.links(ipr), config, interfaces)
            hooks = {l["name"]: tc.select_hook(hook, l["kind"]) for l in chosen}
            addrs = tc.addresses(ipr, {l["index"] for l in chosen})
    me = pod.netns_cookie
    taken = [(a, o) for a, o in owners(maps, addrs).items()
             if o and o != me and (owner_alive is None or owner_alive(o))]
    if taken:
        raise AddressInUseError(f"pod {pod.name}: inbound address "
                         + ", ".join(f"{a} (netns cookie {o})" for a, o in taken)
                         + " belongs to another pod that is still running; refused, nothing changed")
    skl_fd, skl_owned, skl_why = _sk_lookup_prog(maps, progs)
    sk_lookup = skl_fd is not None
    entries = policy_entries(policy, addrs, sk_lookup=sk_lookup, owner=me)
    if not entries[MAP_PODS]:
        if skl_owned:
            os.close(skl_fd)
        raise NotFoundError(f"pod {pod.name} has no IP address on {', '.join(hooks)} to "
                            "steer inbound traffic for")

    undo = []          # callables restoring what was there before, newest last
    added = []         # interface records
    skl_rec = {"enabled": False, "reason": skl_why}
    try:
        # 0. the TIME_WAIT path: sk_lookup linked in the pod's netns, the pod IPs' netns
        # cookie and the existing capture listener, all before tc is told to rely on it
        # (INBOUND_POD_SK_LOOKUP in the inbound_pods entries written in 1).
        if sk_lookup:
            with phase("sk_lookup"):
                cookie = pod.netns_cookie
                path = sklookup.link_path(_pin_prefix(maps), cookie)
                if sklookup.link(pod, skl_fd, path):
                    undo.append(lambda p=path: bpfsys.unpin_link(p))
                nfd, lfd = _fd(maps[MAP_NETNS], "map_fd"), _fd(maps[MAP_LISTENERS], "map_fd")
                for key, value in netns_entries(entries[MAP_PODS], cookie).items():
                    old = ops.map_lookup_elem(nfd, key, _NETNS_VAL_SIZE)
                    ops.map_update_elem(nfd, key, value)
                    undo.append(_restore(ops, nfd, key, old))
                adopted, new_keys, err = listeners.adopt_listeners(pod, cookie,
                                                                   policy.capture_port, lfd)
                for key in new_keys:
                    undo.append(lambda k=key: ops.map_delete_elem(lfd, k))
                skl_rec = {"enabled": True, "link": path, "netns_cookie": cookie,
                           "listeners": adopted}
                if err:
                    skl_rec["adopt_error"] = err
            old_listeners = _recorded_listener_keys(previous, cookie)
            if old_listeners and previous["policy"]["capture_port"] != policy.capture_port:
                for key in old_listeners:           # the capture port moved
                    ops.map_delete_elem(lfd, key)
        with phase("maps"):
            # 1. map entries: remember the previous values of every key touched.
            # Port entries an earlier attach wrote for these IPs and this config drops: from
            # the previous record; without one (a lost record), by scanning inbound_ports.
            if previous is not None:
                stale = [(MAP_PORTS, k) for k in _recorded_port_keys(previous)
                         if k not in entries[MAP_PORTS]]
            else:
                enrolled = [k for k in entries[MAP_PODS]
                            if ops.map_lookup_elem(fds[MAP_PODS], k, _POD_VAL_SIZE) is not None]
                stale = [(MAP_PORTS, k) for k in _pod_port_keys(ops, fds[MAP_PORTS], enrolled)
                         if k not in entries[MAP_PORTS]] if enrolled else []
            for name, table in entries.items():
                for key, value in table.items():
                    old = ops.map_lookup_elem(fds[name], key, len(value))
                    ops.map_update_elem(fds[name], key, value)
                    undo.append(_restore(ops, fds[name], key, old))
            for name, key in stale:
                old = ops.map_lookup_elem(fds[name], key, _PORT_VAL_SIZE)
                ops.map_delete_elem(fds[name], key)
                undo.append(_restore(ops, fds[name], key, old))
            # 1b. the interface's pod: every address its interfaces deliver follows its policy
            # (tc_inbound reads the filter's classid), not only the IPs enrolled above.
            classid = cookie = None
            if _has_map(maps, MAP_IFACES):
                ifd = _fd(maps[MAP_IFACES], "map_fd")
                cookie = pod.netns_cookie
                n = _recorded_iface_id(previous)
                if n is None and iface_ids is not None:
                    n = iface_ids()
                    if n is None:
                        raise ApplyError(f"inbound_ifaces is full ({IFACE_MAX_ID} pods)")
                if n is None:
                    n = iface_id(_ifaces(ops, ifd), cookie)
                classid = INBOUND_IFACE_MAJOR | n
                key = structs.u32_bytes(n)
                old = ops.map_lookup_elem(ifd, key, _IFACE_VAL_SIZE)
                ops.map_update_elem(ifd, key, iface_value(entries[MAP_PODS], cookie))
                undo.append(_restore(ops, ifd, key, old))
        # 2. filters.
        with phase("tc"), system.in_netns(pod.netns):
            with tc.netlink() as ipr:
                for l in chosen:
                    had_clsact = tc.has_clsact(ipr, l["index"])
                    if not had_clsact:
                        ipr.tc("add", "clsact", l["index"])
                        undo.append(tc.in_pod(pod, lambda r, i=l["index"]:
                                              r.tc("del", "clsact", i)))
                    before = [f for f in tc.filters(ipr, l["index"], tc.TC_INGRESS_PARENT)
                              if f["ours"]]
                    tc.add_filter(ipr, l["index"], tc.TC_INGRESS_PARENT, prog_fd, classid)
                    if not before:
                        undo.append(tc.in_pod(pod, lambda r, i=l["index"]:
                                              tc.del_filter(r, i, tc.TC_INGRESS_PARENT)))
                    # True: this call created the qdisc; False: it was someone else's;
                    # None: a re-attach (ours already there) cannot tell, so detach
                    # removes it only if no filter at all is left on it.
                    owned = (not had_clsact) or (None if before else False)
                    added.append({"name": l["name"], "index": l["index"], "kind": l["kind"],
                                  "hook": hooks[l["name"]], "direction": "ingress",
                                  "clsact_added": owned})
    except BaseException as e:
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort; the first error is reported
                pass
        if isinstance(e, MeshbpfError):
            raise
        if isinstance(e, Exception):
            raise ApplyError(f"steering inbound traffic of pod {pod.name} failed and was "
                             f"rolled back: {e}") from e
        raise
    finally:
        if skl_owned:                        # we opened the pinned program: close it
            os.close(skl_fd)
    return {"hook": "tc", "policy": policy.to_dict(),
            "addresses": [str(a) for a in sorted(addrs, key=lambda a: (a.version, a))
                          if structs.inbound_pod_key(a) in entries[MAP_PODS]],
            "interfaces": added, "sk_lookup": skl_rec, "owner": me,
            "iface": {"classid": classid, "netns_cookie": cookie} if classid else None}


@contextlib.contextmanager
def _untimed(name):
    yield


def _restore(ops, fd, key, old):
    def fn():
        if old is None:
            ops.map_delete_elem(fd, key)
        else:
            ops.map_update_elem(fd, key, old)
    return fn


def detach_pod(pod, maps=None, record=None):
    """Stop steering `pod`'s inbound traffic: remove exactly what attach_pod added.

    Removes meshbpf's filters from every interface of the pod (found by priority and
    name, so a lost record still cleans up); the clsact qdisc where the record says
    meshbpf created it, and where it cannot tell (no record, or a re-attach's record)
    only if no filter is left on it, never where it was someone else's; and, when
    `maps` is given, the inbound map entries of the record's and the pod's current IPs;
    and the TIME_WAIT path: the pod's sk_lookup link (pin from the record, else derived
    from the pin prefix of `maps` and the pod's netns cookie), its inbound_netns, inbound_tw
    and capture_listeners entries. A pod whose netns is gone only has its map entries and
    link pin removed. Idempotent.
    """
    skl = (record or {}).get("sk_lookup") or {}
    link = skl.get("link")
    if not link and _pin_prefix(maps) is not None:
        try:
            link = sklookup.link_path(_pin_prefix(maps), pod.netns_cookie)
        except (MeshbpfError, OSError, AttributeError):
            link = None
    addrs = set()
    if record:
        addrs |= {ipaddress.ip_address(a) for a in record.get("addresses", [])}
    ifs = {i["index"]: i.get("clsact_added") for i in (record or {}).get("interfaces", [])}
    if os.path.exists(pod.netns):
        with system.in_netns(pod.netns):
            with tc.netlink() as ipr:
                for l in tc.links(ipr):
                    if l["name"] == "lo" or not tc.has_clsact(ipr, l["index"]):
                        continue
                    for parent in (tc.TC_INGRESS_PARENT, tc.TC_EGRESS_PARENT):
                        if any(f["ours"] for f in tc.filters(ipr, l["index"], parent)):
                            tc.del_filter(ipr, l["index"], parent)
                    left = (tc.filters(ipr, l["index"], tc.TC_INGRESS_PARENT) +
                            tc.filters(ipr, l["index"], tc.TC_EGRESS_PARENT))
                    owned = ifs.get(l["index"])          # True / False / None (unknown)
                    if left or owned is False:
                        continue       # someone else's qdisc, or filters still on it
                    ipr.tc("del", "clsact", l["index"])
                addrs |= set(tc.addresses(ipr, {l["index"] for l in tc.links(ipr)
                                              if l["name"] != "lo"}))
    if link:
        # after the filters: until then tc may leave TIME_WAIT SYNs to the kernel, and
        # without sk_lookup that path would reach the app's own listener
        bpfsys.unpin_link(link)
    owner = (record or {}).get("owner") or skl.get("netns_cookie")
    if owner is None:
        try:
            owner = pod.netns_cookie
        except (MeshbpfError, OSError, AttributeError):
            owner = None
    if maps is not None and addrs:
        fds = _map_fds(maps)
        ops = bpfsys
        # Only entries this pod owns: its address may belong to another pod by now (a dead
        # pod's address reused by a live one, which took the entries over).
        mine = {a for a in addrs if _owned(ops, fds[MAP_PODS], a, owner)}
        addrs = mine
        keys = {structs.inbound_pod_key(a) for a in addrs}
        if (record or {}).get("policy"):
            # The record's policy says which ports have entries: no scan of inbound_ports
            # (for an address it does not list, deleting absent keys is harmless).
            ports = _recorded_port_keys(dict(record, addresses=sorted(addrs, key=str)))
        else:
            ports = _pod_port_keys(ops, fds[MAP_PORTS], keys)
        for k in ports:
            ops.map_delete_elem(fds[MAP_PORTS], k)
        for k in keys:
            ops.map_delete_elem(fds[MAP_PODS], k)
        if _has_map(maps, MAP_NETNS):
            nfd = _fd(maps[MAP_NETNS], "map_fd")
            for k in keys:
                ops.map_delete_elem(nfd, k)
        if _has_map(maps, MAP_TW):
            # Marks not consumed: normally none, so this walk of an empty map is one call.
            tfd = _fd(maps[MAP_TW], "map_fd")
            for k in [k for k in ops.map_keys(tfd, _TW_KEY_SIZE) if k[:16] in keys]:
                ops.map_delete_elem(tfd, k)
    if maps is not None and _has_map(maps, MAP_IFACES):
        cookie = ((record or {}).get("iface") or {}).get("netns_cookie") or skl.get("netns_cookie")
        if cookie is None:
            try:
                cookie = pod.netns_cookie
            except (MeshbpfError, OSError, AttributeError):
                cookie = None
        ops = bpfsys
        ifd = _fd(maps[MAP_IFACES], "map_fd")
        n = _recorded_iface_id(record)
        if n is not None:
            raw = ops.map_lookup_elem(ifd, structs.u32_bytes(n), _IFACE_VAL_SIZE)
            if raw is not None and structs.from_bytes(structs.InboundIfaceVal, raw).netns == cookie:
                ops.map_delete_elem(ifd, structs.u32_bytes(n))
        else:                                # a lost record: find the pod's ids
            for n, owner in _ifaces(ops, ifd).items():
                if owner == cookie:
                    ops.map_delete_elem(ifd, structs.u32_bytes(n))
    if maps is not None and _has_map(maps, MAP_LISTENERS):
        cookie = skl.get("netns_cookie")
        if cookie is None:
            try:
                cookie = pod.netns_cookie
            except (MeshbpfError, OSError, AttributeError):
                cookie = None
        if cookie is not None:
            ops = bpfsys
            lfd = _fd(maps[MAP_LISTENERS], "map_fd")
            for k in _recorded_listener_keys(record, cookie) or _listener_keys(ops, lfd, cookie):
                ops.map_delete_elem(lfd, k)

