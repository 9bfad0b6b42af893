"""Apply, verify and clean up Istio-identical rules inside one pod's network namespace.

`apply` installs the payload of `rules.render` with ONE `iptables-restore --noflush` per
address family; re-applying identical rules changes nothing; rules that differ from the
wanted ones (drift, or an older config) are reported and, with reconcile=True, replaced
in a single restore whose per-table COMMITs are atomic (no window in which traffic skips
the sidecar). Any failure restores every touched table to its saved state before the
error is raised. `cleanup` removes exactly meshbpf's part: the ISTIO_* chains and the
rules it put into built-in chains. Nothing here touches the machine's own netns.
"""

import grp

from . import rules as rules_mod
from . import savefile
from .backend import detect
from .. import system
from ..errors import ApplyError, MeshbpfError, UsageError
# shared with eBPF mode (Istio's ::6/128 on lo is not an iptables matter)
from ..pod import (INBOUND_V6_ADDRESS, ensure_inbound_v6_address,  # noqa: F401
                   guard_netns, remove_inbound_v6_address)


def resolve_owner_groups(cfg, group_file=None):
    """Check every owner-group name resolves on this machine (or in `group_file`).

    Returns {name: gid}; raises UsageError naming the first unknown group.
    """
    names = rules_mod.owner_group_names(cfg)
    known = None
    if group_file:
        known = {}
        try:
            with open(group_file) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) >= 3 and parts[2].isdigit():
                        known.setdefault(parts[0], int(parts[2]))
        except OSError as e:
            raise UsageError(f"cannot read group file {group_file}: {e.strerror}")
    out = {}
    for name in names:
        if known is not None:
            gid = known.get(name)
        else:
            try:
                gid = grp.getgrnam(name).gr_gid
            except KeyError:
                gid = None
        if gid is None:
            field = "owner_groups_include" if cfg.owner_groups_include.strip() not in ("", "*") \
                else "owner_groups_exclude"
            raise UsageError(f"{field}: group {name!r} does not exist on this machine",
                             hint="use a numeric gid or a group listed in /etc/group")
        out[name] = gid
    return out


def _plan(netns, cfg, family, force, group_file, recorded):
    be = detect(netns, family, force=force, group_file=group_file)
    payload = rules_mod.render(cfg, family)
    target = savefile.parse_save(be.canonical(payload))
    before = be.save(netns)
    current = savefile.parse_save(before)
    return {"family": family, "backend": be, "payload": payload, "target": target,
            "before": before, "current": current, "recorded": recorded}


def _recorded(recorded, family):
    if not recorded:
        return None
    return savefile.recorded_from_json(recorded.get(str(family)) or recorded.get(family))


def apply(netns, cfg, families=(4,), force=None, reconcile=False, group_file=None, recorded=None):
    """Make `netns` hold exactly `cfg`'s rules for `families`.

    Returns {"families": {fam: {"action", "backend", "drift"}}, "builtin": {fam: rules}}:
    action is "unchanged", "applied" or "reconciled". Raises MeshbpfError (nothing
    changed) when meshbpf's rules differ and reconcile is False, ApplyError (rolled
    back) when iptables fails.
    """
    guard_netns(netns)
    cfg.validate()
    resolve_owner_groups(cfg, group_file)
    families = tuple(int(f) for f in families)
    plans = [_plan(netns, cfg, fam, force, group_file, _recorded(recorded, fam)) for fam in families]

    refused = []
    for p in plans:
        p["drift"] = savefile.drift(p["current"], p["target"], p["recorded"])
        if not p["drift"]:
            p["action"], p["input"] = "unchanged", None
        elif not savefile.has_ours(p["current"], p["recorded"]):
            p["action"], p["input"] = "applied", p["payload"]
        elif reconcile:
            p["action"] = "reconciled"
            p["input"] = savefile.transition_payload(p["current"], p["payload"], p["target"],
                                                     p["recorded"])
        else:
            refused.append(p)
    if refused:
        lines = [f"IPv{p['family']}: {d}" for p in refused for d in p["drift"]]
        raise MeshbpfError(f"meshbpf/Istio rules already in {netns} differ from the requested ones "
                           f"({'; '.join(lines[:5])}{' ...' if len(lines) > 5 else ''}); nothing was changed",
                           hint="rerun with --reconcile to replace them atomically")

    done = []
    try:
        for p in plans:
            if p["input"] is None:
                continue
            done.append(p)
            ok, err = p["backend"].restore(netns, p["input"])
            if not ok:
                raise ApplyError(f"{p['backend'].restore_bin} failed in {netns}: {err}")
            after = savefile.parse_save(p["backend"].save(netns))
            left = savefile.drift(after, p["target"], p["recorded"])
            if left:
                raise ApplyError(f"IPv{p['family']} rules read back from {netns} differ from the "
                                 f"payload: {'; '.join(left[:3])}")
    except MeshbpfError as e:
        failures = _rollback(netns, done)
        if failures:
            raise ApplyError(f"{e}; rolling back also failed: {'; '.join(failures)}")
        if isinstance(e, ApplyError):
            raise ApplyError(f"{e} (the previous rules were restored)") from None
        raise

    return {
        "families": {p["family"]: {"action": p["action"], "backend": p["backend"].variant,
                                   "drift": p["drift"] if p["action"] != "applied" else []}
                     for p in plans},
        "builtin": {str(p["family"]): savefile.builtin_rules(p["target"]) for p in plans},
        # tables that did not exist before this apply (cleanup may delete them again)
        "created_tables": {str(p["family"]): sorted(set(p["target"]) - set(p["current"]))
                           for p in plans if p["input"] is not None},
    }


def _rollback(netns, done):
    failures = []
    for p in reversed(done):
        tables = set(savefile.payload_sections(p["input"]))
        text = savefile.rollback_payload(p["before"], tables)
        if not text:
            continue
        ok, err = p["backend"].restore(netns, text, noflush=False)
        if not ok:
            failures.append(f"IPv{p['family']}: {err}")
            continue
        p["backend"].delete_empty_tables(netns, sorted(tables - set(p["current"])))
    return failures


def verify(netns, cfg, families=(4,), force=None, group_file=None, recorded=None):
    """{fam: {"in_sync": bool, "drift": [...], "backend": variant}} for `cfg` in `netns`."""
    cfg.validate()
    resolve_owner_groups(cfg, group_file)
    out = {}
    for fam in families:
        p = _plan(netns, cfg, int(fam), force, group_file, _recorded(recorded, fam))
        d = savefile.drift(p["current"], p["target"], p["recorded"])
        out[int(fam)] = {"in_sync": not d, "drift": d, "backend": p["backend"].variant}
    return out


def cleanup(netns, cfg=None, families=(4, 6), force=None, group_file=None, recorded=None,
            created_tables=None):
    """Remove meshbpf's chains and built-in-chain rules from `netns`.

    `cfg` (or `recorded` built-in rules from attach) identifies built-in-chain rules that
    are not jumps into ISTIO_* chains (interface RETURNs, TPROXY marks).
    `created_tables` ({fam: [table]}, from apply) are deleted again when left empty
    (nft). Returns {fam: {"removed": bool, "backend": variant}}.
    """
    guard_netns(netns)
    out = {}
    for fam in families:
        fam = int(fam)
        be = detect(netns, fam, force=force, group_file=group_file)
        before = be.save(netns)
        current = savefile.parse_save(before)
        target = None
        if cfg is not None:
            c = cfg if fam == 4 or cfg.enable_ipv6 else cfg.replace(enable_ipv6=True)
            target = savefile.parse_save(be.canonical(rules_mod.render(c, fam)))
        rec = _recorded(recorded, fam)
        text = savefile.cleanup_payload(current, target, rec)
        if not text:
            out[fam] = {"removed": False, "backend": be.variant}
            continue
        ok, err = be.restore(netns, text)
        if not ok:
            back = savefile.rollback_payload(before, set(savefile.payload_sections(text)))
            be.restore(netns, back, noflush=False)
            raise ApplyError(f"{be.restore_bin} failed removing rules in {netns}: {err} "
                             "(the previous rules were restored)")
        be.delete_empty_tables(netns, (created_tables or {}).get(str(fam), []))
        out[fam] = {"removed": True, "backend": be.variant}
    return out


def tproxy_route_specs(cfg, families):
    """The policy routing TPROXY mode needs, as Istio's configureTProxyRoutes sets it up:
    packets marked `inbound_tproxy_mark` look up table `inbound_tproxy_route_table`, whose
    only route delivers everything locally via lo. [] unless TPROXY captures something."""
    if cfg.inbound_interception_mode != "TPROXY" or not cfg.inbound_ports_include.strip():
        return []
    mark, table = str(cfg.inbound_tproxy_mark), str(cfg.inbound_tproxy_route_table)
    specs = []
    for fam in families:
        v = f"-{int(fam)}"
        specs.append([v, "rule", "fwmark", mark, "lookup", table])
        specs.append([v, "route", "local", "default", "dev", "lo", "table", table])
    return specs


def _route_present(netns, spec):
    v, kind = spec[0], spec[1]
    if kind == "rule":
        mark, table = int(spec[3]), spec[5]
        out = system.run(["ip", v, "rule", "show"], netns=netns).stdout
        return any(f"fwmark {hex(mark)} lookup {table}" in line or
                   f"fwmark {mark} lookup {table}" in line for line in out.splitlines())
    out = system.run(["ip", v, "route", "show", "table", spec[-1]], netns=netns, check=False).stdout
    return any(line.startswith("local default dev lo") for line in out.splitlines())


def ensure_tproxy_routes(netns, cfg, families):
    """Add the missing TPROXY rules/routes in `netns`; returns the specs this call added."""
    guard_netns(netns)
    added = []
    try:
        for spec in tproxy_route_specs(cfg, families):
            if not _route_present(netns, spec):
                system.run(["ip", spec[0], spec[1], "add"] + spec[2:], netns=netns)
                added.append(spec)
    except MeshbpfError as e:
        remove_routes(netns, added)
        raise ApplyError(f"cannot set up TPROXY policy routing in {netns}: {e}")
    return added


def remove_routes(netns, specs):
    """Delete rules/routes that ensure_tproxy_routes added (missing ones are fine)."""
    for spec in reversed(specs or []):
        system.run(["ip", spec[0], spec[1], "del"] + spec[2:], netns=netns, check=False)
