"""EbpfInterceptor: the eBPF implementation of meshbpf.interceptor.Interceptor.

attach makes sure the node programs are loaded and attached once (adopting pins left by
an earlier process), then enrols the pod with map updates only: its pods-map entry (keyed
by netns cookie), its outbound CIDR and port rules, its addresses in local_ips
(same-node splicing), every address of its netns in netns_addrs (what is reached over
`lo`), its source addresses in netns_src, and the inbound hooks (meshbpf.ebpf.inbound).
The record lists every key written, so attach, update and detach touch those keys and
nothing else: their cost does not grow with the number of pods on the node. cleanup
removes everything, programs and pins included. Interception outlives the process:
everything lives in pinned maps.
"""

import contextlib
import json
import os
import types

from .. import pod as podmod
from .. import system
from ..config import InterceptConfig
from ..errors import AddressInUseError, ApplyError, MeshbpfError, UnsupportedError, UsageError
from ..interceptor import DEFAULT_PIN_PREFIX, Interceptor
from ..state import StateStore
from . import loader, structs
from .maps import Maps


# The per-pod share of the node's connection maps (node_cfg.pod_conn_limit) when the
# interceptor is not given one; unset or 0: half of MB_MAX_CONNS (bpf/lib/types.h).
POD_CONN_LIMIT_ENV = "MESHBPF_POD_CONN_LIMIT"


def address_conflicts(addresses, holders, me, alive):
    """Pure: the addresses of a pod being attached that another LIVE pod holds.

    `holders` maps an address (str) to the netns cookie of the pod whose entries hold it in
    the node-wide maps (None: an entry no live pod can own, e.g. a half-made attach),
    `me` is the attaching pod's cookie, `alive(cookie)` says whether that pod still exists.
    Returns [(address, owner cookie)]; a dead owner's address may be taken over.
    """
    out = []
    for a in addresses:
        owner = holders.get(str(a))
        if owner is not None and owner != me and alive(owner):
            out.append((str(a), owner))
    return out


def _inbound():
    """meshbpf.ebpf.inbound if the inbound helper's module is installed, else None."""
    try:
        from . import inbound
    except ImportError:
        return None
    return inbound


class EbpfInterceptor(Interceptor):
    mode = "ebpf"

    def __init__(self, pin_prefix=DEFAULT_PIN_PREFIX, cgroup_root=None, splice=True,
                 features=None, pod_conn_limit=None, inbound_sk_lookup=False, upgrade=False,
                 **options):
        super().__init__(pin_prefix=pin_prefix, cgroup_root=cgroup_root, **options)
        self.splice = bool(splice)
        # replace pinned programs of another version in place (meshbpf.ebpf.upgrade)
        self.upgrade = bool(upgrade)
        # node_cfg.pod_conn_limit: how many connections one pod may keep recorded (None or
        # 0: the header's default, half the node's capacity); see bpf/lib/conn.h
        if pod_conn_limit is not None and (not isinstance(pod_conn_limit, int) or
                                           not 0 <= pod_conn_limit < 1 << 32):
            raise UsageError(f"pod_conn_limit {pod_conn_limit!r} must be a number of "
                             "connections (0: the default)")
        if pod_conn_limit is None and os.environ.get(POD_CONN_LIMIT_ENV, "").strip():
            try:
                pod_conn_limit = int(os.environ[POD_CONN_LIMIT_ENV])
            except ValueError:
                pod_conn_limit = -1
        if pod_conn_limit is not None and not 0 <= pod_conn_limit < 1 << 32:
            raise UsageError(f"{POD_CONN_LIMIT_ENV}={os.environ.get(POD_CONN_LIMIT_ENV)!r} "
                             "must be a number of connections (0: the default)")
        self.pod_conn_limit = pod_conn_limit or 0
        # NODE_F_INBOUND_SK_LOOKUP: inbound always through sk_lookup (proves that path here)
        self.inbound_sk_lookup = bool(inbound_sk_lookup)
        self.features = features
        # As in iptables mode: capture IPv6 when the pod has an IPv6 address even if the
        # config does not say enable_ipv6 (the CLI passes False for an explicit choice).
        ipv6_auto = options.get("ipv6_auto", True)
        self.ipv6_auto = True if ipv6_auto is None else bool(ipv6_auto)
        # where the node programs were attached (so status/cleanup find them later)
        self.node_file = os.path.join(StateStore(pin_prefix).instance_dir, "node.json")
        self._node = None          # _ensure_node's answer, once per process

    # -- helpers -------------------------------------------------------------------------
    def _node_record(self):
        try:
            with open(self.node_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    @property
    def root(self):
        if self.cgroup_root:
            return os.path.realpath(self.cgroup_root)
        return self._node_record().get("cgroup_root") or os.path.realpath(system.cgroup2_mount())

    def _check_pod_cgroup(self, pod):
        """The node hooks see a pod's sockets only if its cgroup is under their attach point
        (the one asked for, and the one the loaded node really uses, if it differs)."""
        roots = {self.root}
        if loader.is_loaded(self.pin_prefix) and self._node_record().get("cgroup_root"):
            roots.add(self._node_record()["cgroup_root"])
        if pod.cgroup is None:
            return
        cg = os.path.realpath(pod.cgroup)
        for root in sorted(roots):
            if not (cg == root or cg.startswith(root.rstrip("/") + "/")):
                raise UsageError(f"pod {pod.name}: its cgroup {pod.cgroup} is not under {root}, "
                                 "where meshbpf's programs are attached, so they would not "
                                 "see its sockets",
                                 hint="attach with a cgroup_root that contains it")

    def _ensure_node(self):
        """Load or adopt the node programs and set node_cfg: once per process while the
        pins stay (a deleted pin is noticed and repaired)."""
        if self._node is not None and loader.is_loaded(self.pin_prefix):
            return dict(self._node, adopted=True)
        upgraded = None
        if self.upgrade and loader.is_loaded(self.pin_prefix):
            from . import upgrade
            upgraded = upgrade.upgrade_programs(self.pin_prefix, self.root, self.features,
                                                self.splice, self.repoint_tc)
        res = loader.ensure_loaded(self.pin_prefix, self.root, self.features, self.splice)
        res["upgraded"] = upgraded
        if upgraded:
            res["degraded"] = upgraded["degraded"]
        if not res["adopted"] or upgraded:
            os.makedirs(os.path.dirname(self.node_file), exist_ok=True)
            with open(self.node_file, "w") as f:
                json.dump({"cgroup_root": self.root, "splice": self.splice,
                           "degraded": res.get("degraded", []),
                           "version": loader.read_meta(self.pin_prefix).get("version")}, f)
        with Maps(self.pin_prefix) as maps:
            # splicing needs the sk_msg program, loaded only if the node was loaded with it
            want = structs.node_config(self.splice and "mb_sk_msg" in res["programs"],
                                       self.pod_conn_limit, self.inbound_sk_lookup)
            cur = maps["node_cfg"].lookup(structs.U32(0))
            if cur is None or bytes(cur) != bytes(want):
                maps["node_cfg"].update(structs.U32(0), want)
        self._node = res
        return res

    def repoint_tc(self, prog_fd):
        """Point every enrolled pod's tc filters at `prog_fd` (an upgrade): `tc filter
        replace` on the same prio/handle/classid swaps the program in the filter in one
        step. Returns how many filters were replaced; a pod whose netns is gone is skipped."""
        from .inbound import tc
        n = 0
        for rec in StateStore(self.pin_prefix).all():
            inbound = rec.get("inbound") if isinstance(rec.get("inbound"), dict) else {}
            ifaces = inbound.get("interfaces") or []
            netns = rec.get("netns")
            if not ifaces or not netns or not os.path.exists(netns):
                continue
            classid = (inbound.get("iface") or {}).get("classid")
            with system.in_netns(netns), tc.netlink() as ipr:
                for l in ifaces:
                    if any(f["ours"] for f in tc.filters(ipr, l["index"],
                                                         tc.TC_INGRESS_PARENT)):
                        tc.add_filter(ipr, l["index"], tc.TC_INGRESS_PARENT, prog_fd, classid)
                        n += 1
        return n

    # -- Interceptor ---------------------------------------------------------------------
    def attach(self, pod, config, previous=None, ctx=None):
        """Enrol `pod`: map writes only, touching exactly the keys its record lists.

        A changed rule set is written under a fresh pod index and switched to by the one
        update of the pod's `pods` entry: no connect ever sees old and new rules mixed."""
        ctx = ctx or _own_context(self.pin_prefix)
        self._check_pod_cgroup(pod)
        cookie = pod.netns_cookie
        with ctx.phase("addresses"):
            addresses, local = pod.address_sets()
        if not config.enable_ipv6 and self.ipv6_auto and any(a.version == 6 for a in addresses):
            config = config.replace(enable_ipv6=True)
        idmap = pod.user_namespace() if hasattr(pod, "user_namespace") else None
        # Pure part first: a config eBPF mode cannot express fails before anything changes.
        pc = structs.pod_struct(config, 0, idmap)
        scope = _host_cgroup(pod)
        rules = structs.pod_rules(config)
        prev = previous or {}
        added_v6 = bool(prev.get("added_inbound_v6_address"))
        added_v6_now, warnings = False, []
        # ::6 first, so no IPv6 inbound connection is steered to a passthrough that cannot
        # bind it (no init container does this in eBPF mode).
        if config.enable_ipv6:
            try:
                with podmod.host_netns_allowed(getattr(pod, "host", False)):
                    added_v6_now = podmod.ensure_inbound_v6_address(pod.netns)
            except MeshbpfError as e:
                warnings.append(f"could not add ::6/128 to lo (IPv6 inbound passthrough): {e}")
        node = None
        try:
            with ctx.phase("node"):
                node = self._ensure_node()
            with Maps(self.pin_prefix) as maps:
                with ctx.phase("maps"):
                    if scope is not None and not maps.exists("pod_cgroups"):
                        raise UnsupportedError(
                            f"pod {pod.name}: the pinned programs predate host workloads",
                            hint="run the agent with the upgrade on, or `meshbpf cleanup` first")
                    self._check_addresses(maps, pod, cookie, addresses, ctx)
                    index, want, saved = self._write(maps, ctx, cookie, pc, rules,
                                                     addresses, local, prev, scope,
                                                     system.netns_inode(pod.netns))
                try:
                    inbound = self._attach_inbound(pod, config, maps, ctx, prev.get("inbound"))
                    _unhook_dropped(pod, prev.get("inbound"), inbound)
                except (MeshbpfError, OSError, ValueError) as e:
                    self._restore(maps, want, saved, index, prev.get("pod_index"), ctx)
                    if isinstance(e, MeshbpfError):
                        raise
                    raise ApplyError(f"enrolling pod {pod.name} failed, rolled back: {e}")
                with ctx.phase("maps"):
                    self._drop_stale(maps, ctx, _unhex(prev.get("keys")), want,
                                     prev.get("pod_index"), index)
        except BaseException:
            if added_v6_now:
                podmod.remove_inbound_v6_address(pod.netns)
            if node is not None and not node["adopted"] and not ctx.store.ids():
                self.cleanup([])        # this call loaded the node for nothing: undo that too
            raise
        if added_v6 and not config.enable_ipv6:     # re-attached without IPv6 capture
            podmod.remove_inbound_v6_address(pod.netns)
            added_v6 = False
        return {
            "netns_cookie": cookie, "pod_index": index,
            "keys": {name: sorted(k.hex() for k in entries) for name, entries in want.items()},
            "addresses": [str(a) for a in addresses], "config": config.to_dict(),
            "splice": self.splice, "programs": node["programs"],
            "degraded": node.get("degraded") or self._node_record().get("degraded", []),
            "inbound": inbound if isinstance(inbound, (dict, list, str, type(None))) else str(inbound),
            "not_supported": (["redirect_dns"] if config.redirect_dns and not all(
                p in node["programs"] for p in loader.DNS_PROGRAMS) else []),
            "added_inbound_v6_address": added_v6 or added_v6_now,
            "userns": idmap.to_dict() if idmap is not None else None,
            "warnings": warnings,
        }

    def _check_addresses(self, maps, pod, cookie, addresses, ctx):
        """Refuse (nothing changed) an address another live enrolled pod holds: the
        node-wide maps keyed by address (local_ips, inbound_pods, ...) have room for one
        owner, and a second would break the first's interception or be broken by its
        detach. One lookup per address, whatever the number of pods."""
        holders = {}
        for a in addresses:
            v = maps["local_ips"].lookup(structs.ip_key(a))
            if v is not None:
                owner_id = ctx.indexes.owner(v.value)
                owner = (ctx.store.load(owner_id) or {}) if owner_id else {}
                holders[str(a)] = owner.get("netns_cookie")
        mod = _inbound()
        if mod is not None and hasattr(mod, "owners") and maps.exists(mod.MAP_PODS):
            for a, owner in mod.owners(maps, addresses).items():
                if holders.get(a) is None and owner:
                    holders[a] = owner
        clash = address_conflicts(addresses, holders, cookie, ctx.owner_alive)
        if clash:
            what = ", ".join(f"{a} (pod {ctx.name_of_cookie(o)})" for a, o in clash)
            raise AddressInUseError(
                f"pod {pod.name}: its address {what} is held by another meshed pod that is "
                "still running; refused, nothing changed",
                hint="detach the other pod first, or give this pod another address")

    def _write(self, maps, ctx, cookie, pc, rules, addresses, local, prev, scope=None,
               netns_ino=None):
        """Write the pod's entries, the `pods` entry last; returns (index, written entries,
        the values they replaced). A changed rule set goes under a fresh index. On failure
        the maps are as they were."""
        old_index = prev.get("pod_index")
        index = old_index
        if index is None or rules != structs.pod_rules(InterceptConfig.from_dict(prev["config"])):
            index = ctx.indexes.allocate(ctx.pod_id, limit=structs.MB_MAX_PODS)
            if index is None:
                raise ApplyError(f"this node already has {structs.MB_MAX_PODS} meshed pods")
        pc.pod_index = index
        want = structs.pod_entries(cookie, index, pc, rules, addresses, local, scope,
                                   netns_ino if maps.exists("netns_ino") else None)
        saved = {name: {k: maps[name].lookup_raw(k) for k in want[name]}
                 for name in structs.SHARED_ENTRY_MAPS}
        try:
            for name in structs.ENTRY_MAPS:
                if name in structs.RULE_MAPS and index == old_index:
                    continue            # the same rules, already there under this index
                for k, v in want[name].items():
                    maps[name].update(k, v)
        except (OSError, ValueError) as e:
            self._restore(maps, want, saved, index, old_index, ctx)
            raise ApplyError(f"enrolling the pod failed, rolled back: {e}")
        return index, want, saved

    @staticmethod
    def _restore(maps, want, saved, index, old_index, ctx):
        for name in reversed(structs.ENTRY_MAPS):
            for k in want[name]:
                old = saved.get(name, {}).get(k)
                if old is None:
                    if name in saved or index != old_index:
                        maps[name].delete(k)
                else:
                    maps[name].update(k, old)
        if index != old_index:
            ctx.indexes.release(index)

    @staticmethod
    def _drop_stale(maps, ctx, old_keys, want, old_index, index):
        """Delete what the pod had and no longer has: its old rule index, lost addresses."""
        for name, keys in old_keys.items():
            for k in keys - set(want.get(name, {})):
                if name == "local_ips":
                    cur = maps[name].lookup(k)
                    if cur is None or cur.value != old_index:
                        continue     # a dead pod's address another pod took over
                maps[name].delete(k)
        if old_index is not None and old_index != index:
            ctx.indexes.release(old_index)

    @staticmethod
    def _remove_keys(maps, cookie, index, keys):
        """Delete a pod's listed keys, `pods` first (the pod stops being meshed)."""
        for name in reversed(structs.ENTRY_MAPS):
            for k in keys.get(name, ()):
                if name == "local_ips":
                    cur = maps[name].lookup(k)
                    if cur is None or cur.value != index:
                        continue
                if name == "netns_ino":
                    cur = maps[name].lookup(k)
                    if cur is None or cur.value != cookie:
                        continue     # the inode now names another pod's netns
                maps[name].delete(k)
        if maps.exists("pod_conns"):
            maps["pod_conns"].delete(structs.U64(cookie))

    def _attach_inbound(self, pod, config, maps, ctx, previous):
        mod = _inbound()
        if mod is None or not hasattr(mod, "attach_pod"):
            return None
        progs = self._tc_prog_fds()
        previous = previous if isinstance(previous, dict) else None
        try:
            return mod.attach_pod(
                pod, config, maps, progs, interfaces=_host_interfaces(pod),
                owner_alive=ctx.owner_alive, previous=previous,
                iface_ids=lambda: ctx.iface_ids.allocate(ctx.pod_id, limit=mod.IFACE_MAX_ID + 1),
                phase=ctx.phase) if progs else None
        finally:
            for fd in progs.values():
                os.close(fd)

    def _tc_prog_fds(self):
        """{name: fd} of the pinned inbound tc programs (caller closes the fds)."""
        out = {}
        for name in ("tc_inbound_ingress",):
            if name in loader.pinned(self.pin_prefix)["progs"]:
                out[name] = loader.prog_fd(self.pin_prefix, name)
        return out

    def detach(self, record, pod=None, ctx=None):
        """Remove what `record` lists, where it is still the pod's own; with no record
        (a pod meshbpf has no record of), whatever is keyed by its netns cookie."""
        ctx = ctx or _own_context(self.pin_prefix)
        if record is None:
            self._detach_unrecorded(pod)
            return
        if loader.is_loaded(self.pin_prefix) and record.get("netns_cookie") is not None:
            with Maps(self.pin_prefix) as maps:
                self._remove_keys(maps, record["netns_cookie"], record.get("pod_index"),
                                  _unhex(record.get("keys")))
        if record.get("pod_index") is not None:
            ctx.indexes.release(record["pod_index"])
        classid = ((record.get("inbound") or {}).get("iface") or {}).get("classid") \
            if isinstance(record.get("inbound"), dict) else None
        if classid:
            ctx.iface_ids.release(classid & 0xffff)
        target = pod or types.SimpleNamespace(netns=record.get("netns") or "",
                                              name=record.get("name"),
                                              netns_cookie=record.get("netns_cookie"))
        try:
            self._detach_inbound(target, record)
        except (MeshbpfError, OSError):
            if pod is not None:
                raise
        if record.get("added_inbound_v6_address"):
            podmod.remove_inbound_v6_address(record.get("netns"))

    def _detach_unrecorded(self, pod):
        """The repair path for entries no record lists: walks the rule maps for the
        pod's index (the one place that does)."""
        if not loader.is_loaded(self.pin_prefix):
            return
        try:
            cookie = pod.netns_cookie
        except MeshbpfError:
            return
        with Maps(self.pin_prefix) as maps:
            cur = maps["pods"].lookup(structs.U64(cookie))
            if cur is None:
                return
            index = cur.pod_index
            maps["pods"].delete(structs.U64(cookie))
            for name in ("cidr_rules", "port_rules"):
                for k in [k for k in maps[name].keys() if k.pod_index in structs.scopes(index)]:
                    maps[name].delete(k)
            for k in [k for k in maps["netns_addrs"].keys() if k.netns == cookie]:
                maps["netns_addrs"].delete(k)
            for a in pod.addresses():
                v = maps["local_ips"].lookup(structs.ip_key(a))
                if v is not None and v.value == index:
                    maps["local_ips"].delete(structs.ip_key(a))
            maps["netns_src"].delete(structs.U64(cookie))
            if maps.exists("pod_conns"):
                maps["pod_conns"].delete(structs.U64(cookie))
        self._detach_inbound(pod, None)

    def _detach_inbound(self, pod, rec=None):
        mod = _inbound()
        if mod is None or not hasattr(mod, "detach_pod"):
            return
        record = (rec or {}).get("inbound") if isinstance((rec or {}).get("inbound"), dict) else None
        if loader.is_loaded(self.pin_prefix):
            with Maps(self.pin_prefix) as maps:
                mod.detach_pod(pod, maps=maps, record=record)
        else:
            mod.detach_pod(pod, record=record)

    def status(self, records):
        """Node-wide facts and, per recorded pod, its live entry: lookups by key, no walks."""
        out = {"mode": self.mode, "pin_prefix": self.pin_prefix, "cgroup_root": self.root,
               "degraded": self._node_record().get("degraded", []),
               "splice": self.splice, "loaded": loader.is_loaded(self.pin_prefix),
               "pins": loader.pinned(self.pin_prefix), "pods": {}, "programs": [],
               "counters": {}}
        if not out["loaded"]:
            return out
        out["programs"] = loader.attachments(self.pin_prefix, self.root)
        # the pinned set's version: which programs run, e.g. after an agent's upgrade
        out["version"] = loader.read_meta(self.pin_prefix).get("version")
        with Maps(self.pin_prefix) as maps:
            out["counters"] = maps.counters()
            ncfg = maps["node_cfg"].lookup(structs.U32(0))
            out["splice"] = bool(ncfg and ncfg.flags & structs.NODE_F_SPLICE)
            held = 0
            for rec in records:
                cookie = rec.get("netns_cookie")
                pc = maps["pods"].lookup(structs.U64(cookie)) if cookie is not None else None
                conns = maps["pod_conns"].lookup(structs.U64(cookie)) \
                    if cookie is not None and maps.exists("pod_conns") else None
                n = conns.value if conns is not None else 0
                held += n
                out["pods"][rec["id"]] = (
                    {"map": structs.describe_pod_struct(pc), "connections": n, "state": "attached"}
                    if pc is not None else {"stale": True, "state": "stale"})
            out["connections"] = {"held": held,
                                  "capacity": maps["orig_dst"].info.get("max_entries"),
                                  "pod_limit": (ncfg.pod_conn_limit if ncfg is not None else 0) or None}
        return out

    def adopt(self):
        """Take over the pinned node programs (load them if none are pinned)."""
        return self._ensure_node()

    def cleanup(self, records):
        errors = []
        for rec in records:
            netns = rec.get("netns")
            if netns and os.path.exists(netns):
                try:
                    from ..pod import Pod
                    self._detach_inbound(Pod(netns=netns, name=rec.get("name")), rec)
                except MeshbpfError as e:
                    errors.append(str(e))
                if rec.get("added_inbound_v6_address"):
                    podmod.remove_inbound_v6_address(netns)
        if os.path.isdir(self.pin_prefix):
            loader.unload(self.pin_prefix, self.root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.node_file)
        self._node = None
        if errors:
            raise ApplyError("cleanup finished with errors: " + "; ".join(errors))
        return {"mode": self.mode, "cleaned": True}


def _host_cgroup(pod):
    """(cgroup id, level) that scopes a host workload's outbound (None for a pod): the
    cgroup v2 id is its directory's inode. The agent must see the machine's cgroup tree
    (no cgroup namespace of its own) for the level to be the kernel's."""
    if not getattr(pod, "host", False):
        return None
    path = os.path.realpath(pod.cgroup)
    try:
        ino = os.stat(path).st_ino
    except OSError as e:
        raise UsageError(f"pod {pod.name}: cannot read its cgroup {path}: {e.strerror}")
    return ino, structs.cgroup_level(path, os.path.realpath(system.cgroup2_mount()))


def _unhook_dropped(pod, old, new):
    """A re-attach that steers fewer interfaces (a host entry's inbound_interfaces shrank)
    takes meshbpf's filter off the others, and the clsact qdisc where meshbpf added it and
    nothing else is left on it."""
    def hooked(rec):
        ifaces = rec.get("interfaces") if isinstance(rec, dict) else None
        return {i["name"]: i for i in (ifaces or []) if isinstance(i, dict) and "name" in i}
    gone = {n: i for n, i in hooked(old).items() if n not in hooked(new)}
    if not gone:
        return
    from .inbound import tc
    with system.in_netns(pod.netns), tc.netlink() as ipr:
        for link in tc.links(ipr):
            if link["name"] not in gone or not tc.has_clsact(ipr, link["index"]):
                continue
            if any(f["ours"] for f in tc.filters(ipr, link["index"], tc.TC_INGRESS_PARENT)):
                tc.del_filter(ipr, link["index"], tc.TC_INGRESS_PARENT)
            left = (tc.filters(ipr, link["index"], tc.TC_INGRESS_PARENT) +
                    tc.filters(ipr, link["index"], tc.TC_EGRESS_PARENT))
            if not left and gone[link["name"]].get("clsact_added"):
                ipr.tc("del", "clsact", link["index"])


def _host_interfaces(pod):
    """The interfaces a host workload's inbound is steered on (None: the pod's own, all)."""
    ifaces = getattr(pod, "inbound_interfaces", None)
    return None if ifaces in (None, "*") else list(ifaces)


def _unhex(keys):
    """A record's {map: [hex key]} as {map: {key bytes}}."""
    return {name: {bytes.fromhex(k) for k in ks} for name, ks in (keys or {}).items()}


def _own_context(pin_prefix):
    """The service's OpContext, for this backend used without the service (its allocators
    and records are the instance's all the same)."""
    from ..service import OpContext
    from ..state import StateStore
    return OpContext(StateStore(pin_prefix), None)
