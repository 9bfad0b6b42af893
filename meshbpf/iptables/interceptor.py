"""IptablesInterceptor: the Interceptor that installs Istio-identical iptables rules per pod.

Works on any kernel with iptables (nft or legacy) and never imports bcc. One attach is
one `iptables-restore --noflush` per address family in the pod's netns (see apply.py),
plus what Istio's ConfigureRoutes adds: ::6/128 on lo with IPv6, and in TPROXY mode the
fwmark rule and local route table (each removed on detach if meshbpf added it);
the record it returns (saved by meshbpf.service) remembers the config, families and
backend so that `detach`, `status` and `cleanup` work from any later process.

Options (keyword arguments, from meshbpf.backends.backend("iptables", **options)):
  iptables_binary  "nft" or "legacy" to force a variant (default: detect as Istio does)
  reconcile        replace differing meshbpf rules instead of refusing (default False)
  ipv6_auto        IPv6 rules when the pod has an IPv6 address even if the config does
                   not ask for them (default True; `config_from_options` sets it)
  group_file       resolve owner-group names against this group file (tests)
  cleanup_config   for detach of a pod with no record (rules applied by istio-init):
                   the config they were applied with, to find non-jump rules
"""

import contextlib

from . import apply as ops
from ..config import InterceptConfig
from ..errors import MeshbpfError, NotFoundError, UsageError
from ..interceptor import DEFAULT_PIN_PREFIX, Interceptor
from ..pod import host_netns_allowed


def _host_scope(pod=None, rec=None):
    """Around work on a host workload (its Pod or its record says "host"): the agent's own
    netns is then allowed (meshbpf.pod.guard_netns); on anything else, nothing changes."""
    if getattr(pod, "host", False) or (rec or {}).get("host"):
        return host_netns_allowed()
    return contextlib.nullcontext()


class IptablesInterceptor(Interceptor):
    mode = "iptables"

    def __init__(self, pin_prefix=DEFAULT_PIN_PREFIX, cgroup_root=None, **options):
        super().__init__(pin_prefix=pin_prefix, cgroup_root=cgroup_root, **options)
        self.force = options.get("iptables_binary") or None
        self.reconcile = bool(options.get("reconcile", False))
        ipv6_auto = options.get("ipv6_auto", True)
        self.ipv6_auto = True if ipv6_auto is None else bool(ipv6_auto)
        self.group_file = options.get("group_file")
        self.cleanup_config = options.get("cleanup_config")

    # ---- helpers ------------------------------------------------------------------

    def _effective_config(self, pod, config):
        v6 = bool(config.enable_ipv6) or (self.ipv6_auto and pod.has_ipv6)
        return config.replace(enable_ipv6=v6)

    @staticmethod
    def _families(cfg):
        return (4, 6) if cfg.enable_ipv6 else (4,)

    # ---- Interceptor --------------------------------------------------------------

    def attach(self, pod, config, previous=None, ctx=None):
        """A host workload gets Istio's VM-mode rules: the whole host netns is captured
        (uid/gid 1337 excluded), whatever the workload's cgroup; PREROUTING takes every
        interface but the config's exclude_interfaces."""
        if getattr(pod, "host", False) and pod.inbound_interfaces != "*":
            raise UsageError(f"pod {pod.name}: iptables mode captures a host workload's inbound "
                             "traffic on every interface (Istio's rules have no interface "
                             f"list), not only on {', '.join(pod.inbound_interfaces or [])}",
                             hint='set "inbound_interfaces": "*" (the config\'s '
                                  "exclude_interfaces leaves some out), or run the node in "
                                  "eBPF mode")
        with _host_scope(pod, previous):
            return self._attach(pod, config, previous)

    def _attach(self, pod, config, previous):
        cfg = self._effective_config(pod, config)
        families = self._families(cfg)
        old = previous
        # A pod we attached with another config is an update we own: replace atomically.
        reconcile = self.reconcile or bool(old and old.get("config") != cfg.to_dict())
        recorded = (old or {}).get("builtin")
        # TPROXY policy routing first (Istio's ConfigureRoutes): a failure changes nothing.
        new_routes = ops.ensure_tproxy_routes(pod.netns, cfg, families)
        try:
            result = ops.apply(pod.netns, cfg, families=families, force=self.force,
                               reconcile=reconcile, group_file=self.group_file, recorded=recorded)
        except BaseException:
            ops.remove_routes(pod.netns, new_routes)
            raise
        dropped = [f for f in (old or {}).get("families", []) if int(f) not in families]
        if dropped:
            old_cfg = InterceptConfig.from_dict(old["config"])
            ops.cleanup(pod.netns, old_cfg, families=dropped, force=self.force,
                        group_file=self.group_file, recorded=recorded)
        added_v6 = bool((old or {}).get("added_inbound_v6_address"))
        warnings = []
        if 6 in families:
            try:
                added_v6 = ops.ensure_inbound_v6_address(pod.netns) or added_v6
            except MeshbpfError as e:
                warnings.append(f"could not add ::6/128 to lo (IPv6 inbound passthrough): {e}")
        elif added_v6:
            ops.remove_inbound_v6_address(pod.netns)
            added_v6 = False
        wanted_routes = ops.tproxy_route_specs(cfg, families)
        old_routes = (old or {}).get("added_routes", [])
        ops.remove_routes(pod.netns, [r for r in old_routes if r not in wanted_routes])
        routes = [r for r in old_routes if r in wanted_routes] + new_routes
        backends = {str(f): r["backend"] for f, r in result["families"].items()}
        created = dict((old or {}).get("created_tables") or {})
        for fam, tables in result["created_tables"].items():
            created[fam] = sorted(set(created.get(fam, [])) | set(tables))
        return {
            "config": cfg.to_dict(),
            "families": list(families),
            "backend": backends["4"],
            "backends": backends,
            "builtin": result["builtin"],
            "created_tables": created,
            "added_inbound_v6_address": added_v6,
            "added_routes": routes,
            "warnings": warnings,
            "actions": {str(f): r["action"] for f, r in result["families"].items()},
        }

    def detach(self, record, pod=None, ctx=None):
        """Remove the rules `record` lists; with no record, the rules Istio's config
        (`cleanup_config`, or the default) would have put in `pod`'s netns."""
        with _host_scope(pod, record):
            return self._detach(record, pod)

    def _detach(self, record, pod):
        rec = record or {}
        netns = pod.netns if pod is not None else rec.get("netns")
        cfg = InterceptConfig.from_dict(rec["config"]) if record else self.cleanup_config
        try:
            res = ops.cleanup(netns, cfg, families=(4, 6), force=self.force or rec.get("backend"),
                              group_file=self.group_file, recorded=rec.get("builtin"),
                              created_tables=rec.get("created_tables"))
        except NotFoundError:
            if pod is not None:
                raise
            return {}            # the pod's netns is gone, and its rules with it
        if rec.get("added_inbound_v6_address"):
            ops.remove_inbound_v6_address(netns)
        ops.remove_routes(netns, rec.get("added_routes"))
        return res

    def status(self, records):
        pods = {}
        for rec in records:
            live = {}
            try:
                cfg = InterceptConfig.from_dict(rec["config"])
                with _host_scope(rec=rec):
                    res = ops.verify(rec["netns"], cfg, families=rec.get("families", [4]),
                                     force=rec.get("backend"), group_file=self.group_file)
                live["in_sync"] = all(r["in_sync"] for r in res.values())
                live["drift"] = [f"IPv{f}: {d}" for f, r in res.items() for d in r["drift"]]
            except (MeshbpfError, OSError) as e:
                live["in_sync"] = None
                live["drift"] = [f"cannot verify: {e}"]
            live["state"] = "attached" if live["in_sync"] else "drifted"
            pods[rec["id"]] = live
        return {"mode": self.mode, "pods": pods}

    def cleanup(self, records):
        errors = []
        for rec in records:
            try:
                cfg = InterceptConfig.from_dict(rec["config"])
                with _host_scope(rec=rec):
                    ops.cleanup(rec["netns"], cfg, families=(4, 6),
                                force=self.force or rec.get("backend"),
                                group_file=self.group_file, recorded=rec.get("builtin"),
                                created_tables=rec.get("created_tables"))
                    if rec.get("added_inbound_v6_address"):
                        ops.remove_inbound_v6_address(rec["netns"])
                    ops.remove_routes(rec["netns"], rec.get("added_routes"))
            except NotFoundError:
                pass  # the pod's netns is gone, and its rules with it
            except MeshbpfError as e:
                errors.append(f"{rec.get('name')}: {e}")
        if errors:
            raise MeshbpfError("cleanup left rules behind: " + "; ".join(errors))
        return {"mode": self.mode, "cleaned": True}
