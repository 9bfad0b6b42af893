"""EbpfInterceptor: the eBPF implementation of meshbpf.interceptor.Interceptor.

attach(pod, config) makes sure the node programs are loaded and attached once (adopting
pins left by an earlier process), then enrols the pod with map updates only: its pods-map
entry (keyed by netns cookie), its outbound CIDR and port rules, its addresses in
local_ips (same-node splicing), every address of its netns in netns_addrs (what is
reached over `lo`) and its source addresses in netns_src, and the inbound tc hook (meshbpf.ebpf.inbound, when
present). detach removes exactly those entries; cleanup removes everything, programs and
pins included. Interception outlives the process: everything lives in pinned maps.
"""

import contextlib
import fcntl
import json
import os
import types

from .. import pod as podmod
from .. import system
from ..config import InterceptConfig
from ..errors import AddressInUseError, ApplyError, MeshbpfError, UsageError
from ..interceptor import DEFAULT_PIN_PREFIX, Interceptor
from ..state import StateStore
from . import loader, structs
from .maps import Maps


# The per-pod share of the node's connection maps (node_cfg.pod_conn_limit) when the
# interceptor is not given one; unset or 0: half of MB_MAX_CONNS (bpf/meshbpf.h).
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
                 features=None, pod_conn_limit=None, inbound_sk_lookup=False, **options):
        super().__init__(pin_prefix=pin_prefix, cgroup_root=cgroup_root, **options)
        self.splice = bool(splice)
        # node_cfg.pod_conn_limit: how many connections one pod may keep recorded (None or
        # 0: the header's default, half the node's capacity); see bpf/meshbpf.h "Full maps"
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
        self.store = StateStore(pin_prefix)
        # where the node programs were attached (so status/cleanup find them later)
        self.node_file = os.path.join(os.path.dirname(self.store.dir), "node.json")

    # -- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """One attach/detach/cleanup at a time per instance (CLI and agent may race)."""
        d = os.path.dirname(self.store.dir)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

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
        res = loader.ensure_loaded(self.pin_prefix, self.root, self.features, self.splice)
        if not res["adopted"]:
            os.makedirs(os.path.dirname(self.node_file), exist_ok=True)
            with open(self.node_file, "w") as f:
                json.dump({"cgroup_root": self.root, "splice": self.splice,
                           "degraded": res.get("degraded", [])}, f)
        with Maps(self.pin_prefix) as maps:
            # splicing needs the sk_msg program, loaded only if the node was loaded with it
            want = structs.node_config(self.splice and "mb_sk_msg" in res["programs"],
                                       self.pod_conn_limit, self.inbound_sk_lookup)
            cur = maps["node_cfg"].lookup(structs.U32(0))
            if cur is None or bytes(cur) != bytes(want):
                maps["node_cfg"].update(structs.U32(0), want)
        return res

    @staticmethod
    def _pod_index(maps, cookie):
        existing = maps["pods"].lookup(structs.U64(cookie))
        if existing is not None:
            return existing.pod_index
        used = {v.pod_index for _, v in maps["pods"].items()}
        i = 1
        while i in used:
            i += 1
        if i >= structs.MB_MAX_PODS:
            raise ApplyError(f"this node already has {structs.MB_MAX_PODS} meshed pods")
        return i

    # -- Interceptor ---------------------------------------------------------------------
    def attach(self, pod, config):
        if not isinstance(config, InterceptConfig):
            raise UsageError("attach needs an InterceptConfig")
        config.validate()
        self._check_pod_cgroup(pod)
        with self._locked():
            return self._attach(pod, config)

    def _attach(self, pod, config):
        cookie = pod.netns_cookie
        addresses = list(pod.addresses())
        local = list(pod.local_addresses())
        if not config.enable_ipv6 and self.ipv6_auto and any(a.version == 6 for a in addresses):
            config = config.replace(enable_ipv6=True)
        idmap = pod.user_namespace() if hasattr(pod, "user_namespace") else None
        # Pure part first: a config eBPF mode cannot express fails before anything changes.
        pc = structs.pod_struct(config, 0, idmap)
        # The pod's own addresses are not excluded by range: as in Istio, only the app's
        # connections over `lo` are left alone (mb_should_capture, from netns_addrs).
        cidrs = structs.cidr_rules(config)
        ports = structs.port_rules(config)
        dns = structs.dns_rules(config)
        old_rec = self.store.load(pod.key) or {}
        if old_rec.get("netns_cookie") not in (None, cookie):
            # The record's pod is dead and this netns got its inode (the record key): its
            # entries are stale; remove them (where still its own) before enrolling.
            self._detach_record(pod.key, old_rec)
            old_rec = {}
        # ::6 first, so no IPv6 inbound connection is steered to a passthrough that cannot
        # bind it (no init container does this in eBPF mode).
        added_v6 = bool(old_rec.get("added_inbound_v6_address"))
        added_v6_now, warnings = False, []
        if config.enable_ipv6:
            try:
                added_v6_now = podmod.ensure_inbound_v6_address(pod.netns)
            except MeshbpfError as e:
                warnings.append(f"could not add ::6/128 to lo (IPv6 inbound passthrough): {e}")
        try:
            node = self._ensure_node()
        except BaseException:
            if added_v6_now:
                podmod.remove_inbound_v6_address(pod.netns)
            raise
        try:
            with Maps(self.pin_prefix) as maps:
                self._check_addresses(maps, pod, cookie, addresses)
                index = self._pod_index(maps, cookie)
                pc.pod_index = index
                snap = self._snapshot(maps, cookie, index,
                                      set(old_rec.get("addresses", [])) | {str(a) for a in addresses})
                try:
                    self._write(maps, cookie, index, pc, cidrs, ports, addresses, dns, local)
                    inbound = self._attach_inbound(pod, config, maps)
                except (MeshbpfError, OSError, ValueError) as e:
                    self._restore(maps, snap, cookie, index)
                    if isinstance(e, MeshbpfError):
                        raise
                    raise ApplyError(f"enrolling pod {pod.name} failed, rolled back: {e}")
        except BaseException:
            if added_v6_now:
                podmod.remove_inbound_v6_address(pod.netns)
            if not node["adopted"]:
                with Maps(self.pin_prefix) as maps:
                    empty = len(maps["pods"]) == 0
                if empty:            # this call loaded the node for nothing: undo that too
                    self._cleanup_node()
            raise
        if added_v6 and not config.enable_ipv6:     # re-attached without IPv6 capture
            podmod.remove_inbound_v6_address(pod.netns)
            added_v6 = False
        record = {
            "name": pod.name, "netns": pod.netns, "cgroup": pod.cgroup, "mode": self.mode,
            "netns_cookie": cookie, "pod_index": index,
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
        return self.store.save(pod.key, record)

    def _owner_alive(self, cookie):
        """Is the pod with netns cookie `cookie` still there? Only a pod meshbpf has a
        record of whose netns still exists with that cookie is; a pod whose netns is gone
        (deleted without a detach) is not, and its addresses may be taken over."""
        for rec in self.store.all():
            if rec.get("netns_cookie") != cookie:
                continue
            netns = rec.get("netns")
            if not netns or not os.path.exists(netns):
                return False
            try:
                return system.netns_cookie(netns) == cookie
            except (MeshbpfError, OSError):
                return False
        return False

    def _check_addresses(self, maps, pod, cookie, addresses):
        """Refuse (nothing changed) an address another live enrolled pod holds: the
        node-wide maps keyed by address (local_ips, inbound_pods, ...) have room for one
        owner, and a second would break the first's interception or be broken by its
        detach."""
        by_index = {v.pod_index: k.value for k, v in maps["pods"].items()}
        holders = {}
        for a in addresses:
            v = maps["local_ips"].lookup(structs.ip_key(a))
            if v is not None:
                holders[str(a)] = by_index.get(v.value)
        mod = _inbound()
        if mod is not None and hasattr(mod, "owners") and maps.exists(mod.MAP_PODS):
            for a, owner in mod.owners(maps, addresses).items():
                if holders.get(a) is None and owner:
                    holders[a] = owner
        clash = address_conflicts(addresses, holders, cookie, self._owner_alive)
        if clash:
            names = {r.get("netns_cookie"): r.get("name") for r in self.store.all()}
            what = ", ".join(f"{a} (pod {names.get(o) or o})" for a, o in clash)
            raise AddressInUseError(
                f"pod {pod.name}: its address {what} is held by another meshed pod that is "
                "still running; refused, nothing changed",
                hint="detach the other pod first, or give this pod another address")

    @staticmethod
    def _snapshot(maps, cookie, index, addresses):
        """The pod's current entries (raw bytes), to restore on a failed (re-)attach."""
        def raw(name, key):
            v = maps[name].lookup_raw(key)
            return bytes(v) if v is not None else None
        return {
            "pods": raw("pods", structs.U64(cookie)),
            "cidr_rules": {bytes(k): raw("cidr_rules", k)
                           for k in maps["cidr_rules"].keys() if k.pod_index in structs.scopes(index)},
            "port_rules": {bytes(k): raw("port_rules", k)
                           for k in maps["port_rules"].keys() if k.pod_index in structs.scopes(index)},
            "local_ips": {bytes(structs.ip_key(a)): raw("local_ips", structs.ip_key(a))
                          for a in addresses},
            "netns_addrs": {bytes(k): raw("netns_addrs", k)
                            for k in maps["netns_addrs"].keys() if k.netns == cookie},
            "netns_src": raw("netns_src", structs.U64(cookie)),
        }

    @staticmethod
    def _restore(maps, snap, cookie, index):
        if snap["pods"] is None:
            maps["pods"].delete(structs.U64(cookie))
        else:
            maps["pods"].update(structs.U64(cookie), snap["pods"])
        for name in ("cidr_rules", "port_rules"):
            for k in [bytes(k) for k in maps[name].keys() if k.pod_index in structs.scopes(index)]:
                if k not in snap[name]:
                    maps[name].delete(k)
            for k, v in snap[name].items():
                if v is not None:
                    maps[name].update(k, v)
        for k, v in snap["local_ips"].items():
            if v is None:
                maps["local_ips"].delete(k)
            else:
                maps["local_ips"].update(k, v)
        for k in [bytes(k) for k in maps["netns_addrs"].keys() if k.netns == cookie]:
            if k not in snap["netns_addrs"]:
                maps["netns_addrs"].delete(k)
        for k, v in snap["netns_addrs"].items():
            maps["netns_addrs"].update(k, v)
        if snap["netns_src"] is None:
            maps["netns_src"].delete(structs.U64(cookie))
        else:
            maps["netns_src"].update(structs.U64(cookie), snap["netns_src"])

    @staticmethod
    def _write(maps, cookie, index, pc, cidrs, ports, addresses, dns=(), local=None):
        """Write the pod's entries; the pods entry last, so connect never sees half a pod.
        Rules the pod no longer has (a re-attach with another config) are removed, and so
        are addresses its netns no longer has (a re-attach refreshes them)."""
        want_cidr, want_ports = {}, {}
        for net, rule in cidrs:
            want_cidr[bytes(structs.cidr_key(index, net))] = rule
        for net, rule in dns:
            want_cidr[bytes(structs.cidr_key(index | structs.MB_DNS_SCOPE, net))] = rule
        for port, rule in ports:
            want_ports[bytes(structs.port_key(index, port))] = rule
        for name, want in (("cidr_rules", want_cidr), ("port_rules", want_ports)):
            for k, rule in want.items():
                maps[name].update(k, structs.U32(rule))
        for a in addresses:
            maps["local_ips"].update(structs.ip_key(a), structs.U32(index))
        local = addresses if local is None else local
        want_local = {bytes(structs.netns_addr_key(cookie, a)) for a in local}
        for k in want_local:
            maps["netns_addrs"].update(k, structs.U32(index))
        for k in [bytes(k) for k in maps["netns_addrs"].keys() if k.netns == cookie]:
            if k not in want_local:
                maps["netns_addrs"].delete(k)
        maps["netns_src"].update(structs.U64(cookie), structs.netns_src(addresses, local))
        maps["pods"].update(structs.U64(cookie), pc)
        for name, want in (("cidr_rules", want_cidr), ("port_rules", want_ports)):
            for k in [bytes(k) for k in maps[name].keys() if k.pod_index in structs.scopes(index)]:
                if k not in want:
                    maps[name].delete(k)

    def _attach_inbound(self, pod, config, maps):
        mod = _inbound()
        if mod is None or not hasattr(mod, "attach_pod"):
            return None
        progs = self._tc_prog_fds()
        try:
            return mod.attach_pod(pod, config, maps, progs,
                                  owner_alive=self._owner_alive) if progs else None
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

    @staticmethod
    def _remove_entries(maps, cookie, index, addresses):
        maps["pods"].delete(structs.U64(cookie))           # first: the pod stops being meshed
        if index is None:
            index = -1
        for k in [k for k in maps["cidr_rules"].keys() if k.pod_index in structs.scopes(index)]:
            maps["cidr_rules"].delete(k)
        for k in [k for k in maps["port_rules"].keys() if k.pod_index in structs.scopes(index)]:
            maps["port_rules"].delete(k)
        for a in addresses:
            # only our own: a dead pod's address may have been taken over by a live pod
            cur = maps["local_ips"].lookup(structs.ip_key(a))
            if cur is not None and cur.value == index:
                maps["local_ips"].delete(structs.ip_key(a))
        if maps.exists("pod_conns"):
            maps["pod_conns"].delete(structs.U64(cookie))
        for k in [k for k in maps["netns_addrs"].keys() if k.netns == cookie]:
            maps["netns_addrs"].delete(k)
        maps["netns_src"].delete(structs.U64(cookie))

    def detach(self, pod):
        with self._locked():
            self._detach(pod)

    def detach_key(self, key, netns_cookie=None):
        """Detach a pod known only by its record key (its netns may be gone already):
        remove its map entries and inbound hooks from the record. Returns False if no
        record exists. The key is the netns inode, which a new netns may reuse once the
        old one is gone: with `netns_cookie` (the dead pod's), a record of another pod
        under that key is left alone (False)."""
        with self._locked():
            rec = self.store.load(key)
            if rec is None:
                return False
            if netns_cookie is not None and rec.get("netns_cookie") != netns_cookie:
                return False
            self._detach_record(key, rec)
            return True

    def _detach_record(self, key, rec):
        """Remove what a record says was enrolled, where it is still the record's own."""
        if loader.is_loaded(self.pin_prefix) and rec.get("netns_cookie") is not None:
            with Maps(self.pin_prefix) as maps:
                cur = maps["pods"].lookup(structs.U64(rec["netns_cookie"]))
                if cur is None or cur.pod_index == rec.get("pod_index"):
                    self._remove_entries(maps, rec["netns_cookie"], rec.get("pod_index"),
                                         rec.get("addresses", []))
        ghost = types.SimpleNamespace(netns=rec.get("netns") or "", name=rec.get("name"),
                                      key=key)
        try:
            self._detach_inbound(ghost, rec)
        except (MeshbpfError, OSError):
            pass
        if rec.get("added_inbound_v6_address"):
            podmod.remove_inbound_v6_address(rec.get("netns"))
        self.store.remove(key)

    def _detach(self, pod):
        rec = self.store.load(pod.key)
        if not loader.is_loaded(self.pin_prefix):
            if (rec or {}).get("added_inbound_v6_address"):
                podmod.remove_inbound_v6_address(pod.netns)
            self.store.remove(pod.key)
            return
        try:
            cookie = pod.netns_cookie
        except MeshbpfError:
            cookie = rec.get("netns_cookie") if rec else None
        with Maps(self.pin_prefix) as maps:
            if cookie is not None:
                cur = maps["pods"].lookup(structs.U64(cookie))
                index = cur.pod_index if cur is not None else (rec or {}).get("pod_index")
                addrs = (rec or {}).get("addresses")
                if addrs is None:
                    try:
                        addrs = [str(a) for a in pod.addresses()]
                    except MeshbpfError:
                        addrs = []
                if index is not None:
                    self._remove_entries(maps, cookie, index, addrs)
        self._detach_inbound(pod, rec)
        if (rec or {}).get("added_inbound_v6_address"):
            podmod.remove_inbound_v6_address(pod.netns)
        self.store.remove(pod.key)

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

    def status(self):
        out = {"mode": self.mode, "pin_prefix": self.pin_prefix, "cgroup_root": self.root,
               "degraded": self._node_record().get("degraded", []),
               "splice": self.splice, "loaded": loader.is_loaded(self.pin_prefix),
               "pins": loader.pinned(self.pin_prefix), "pods": [], "programs": [],
               "counters": {}}
        records = {r.get("netns_cookie"): r for r in self.store.all()}
        if not out["loaded"]:
            out["pods"] = list(records.values())
            return out
        out["programs"] = loader.attachments(self.pin_prefix, self.root)
        with Maps(self.pin_prefix) as maps:
            out["counters"] = maps.counters()
            ncfg = maps["node_cfg"].lookup(structs.U32(0))
            out["splice"] = bool(ncfg and ncfg.flags & structs.NODE_F_SPLICE)
            held = ({k.value: v.value for k, v in maps["pod_conns"].items()}
                    if maps.exists("pod_conns") else {})
            for key, pc in maps["pods"].items():
                cookie = key.value
                rec = records.pop(cookie, {})
                out["pods"].append({
                    "name": rec.get("name"), "netns": rec.get("netns"),
                    "netns_cookie": cookie, "config": rec.get("config"),
                    "addresses": rec.get("addresses"), "map": structs.describe_pod_struct(pc),
                    "connections": held.get(cookie, 0),      # its use of the per-pod share
                })
            ncfg_limit = ncfg.pod_conn_limit if ncfg is not None else 0
            out["connections"] = {"orig_dst": len(maps["orig_dst"]), "pairs": len(maps["pairs"]),
                                  "capacity": maps["orig_dst"].info.get("max_entries"),
                                  "pod_limit": ncfg_limit or None}
        for rec in records.values():          # recorded but not in the map: stale
            out["pods"].append(dict(rec, stale=True))
        return out

    def cleanup(self):
        with self._locked():
            self._cleanup()
        for d in (os.path.join(os.path.dirname(self.store.dir), "lock"),):
            with contextlib.suppress(OSError):
                os.unlink(d)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.store.dir))

    def _cleanup_node(self):
        if os.path.isdir(self.pin_prefix):
            loader.unload(self.pin_prefix, self.root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.node_file)

    def _cleanup(self):
        errors = []
        for rec in self.store.all():
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
        try:
            os.unlink(self.node_file)
        except FileNotFoundError:
            pass
        self.store.destroy()
        if errors:
            raise ApplyError("cleanup finished with errors: " + "; ".join(errors))
