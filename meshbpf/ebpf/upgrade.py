"""Replace the pinned programs by the ones this code loads, in place, on the same maps.

An agent with changed BPF programs must not leave a moment in which a connection goes
uncaptured, and must not lose the pods' entries or the connections' state: the new
programs are loaded against the PINNED maps (their map references rewritten to the
pinned fds), a map whose layout changed is refused before anything changes, and each
program is swapped where it runs (see upgrade_programs).
"""

import ctypes
import os

from .. import __version__, bpfsys
from ..errors import ApplyError, UnsupportedError
from . import loader
from .loader import (PROGRAMS, SOCKHASH_MAP, _attached_ids, _check_cgroup_root, _compile, _has, _load_prog,
                     _pin, _safe_prefix, _unlink, cflags, module_map_layouts, pin_dirs,
                     pinned, read_meta, render_source, wanted_programs, write_meta)
from .maps import Maps
from .versions import compare_layouts, map_fingerprint, patch_map_fds, program_set_version


def wanted(features=None, splice=True):
    """(C text, its version, degraded programs) this code would load on this kernel."""
    degraded = []
    if splice and not _has(features, "splice_backpressure"):
        splice = False
        degraded.append("mb_sk_msg")
    text = render_source(features, splice=splice)
    return text, program_set_version(text, cflags(features, splice)), degraded, splice


def is_current(pin_prefix, features=None, splice=True):
    """Are programs of this code's version pinned (nothing to load or replace)?"""
    return loader.is_loaded(pin_prefix) and \
        read_meta(pin_prefix).get("version") == wanted(features, splice)[1]


def upgrade_programs(pin_prefix, cgroup_root, features=None, splice=True, repoint=None):
    """Replace the pinned programs by the ones this code loads, keeping the pinned maps.

    Nothing happens (returns None) when the pinned set has this code's version. Else the
    new programs are compiled and loaded against the PINNED maps (so every entry, pod and
    connection survives); a map whose layout differs is refused before anything changes
    (UnsupportedError naming the map and what changed). Then each program is swapped
    where it runs without a moment with no program: cgroup hooks and sk_lookup links
    through BPF_LINK_UPDATE, ALLOW_MULTI attachments with BPF_F_REPLACE (else attach the
    new, then detach the old), the sockhash's msg verdict by attaching over it, and the
    tc filters by `repoint(prog_fd)` (the caller knows the pods). Each pin is replaced by
    a rename. Returns {"from", "to", "replaced": [{"program", "how", "old_id", "new_id"}],
    "created_maps", "degraded"}.
    """
    _safe_prefix(pin_prefix)
    text, version, degraded, splice = wanted(features, splice)
    meta = read_meta(pin_prefix)
    if meta.get("version") == version:
        return None
    b = _compile(text)
    dirs = pin_dirs(pin_prefix)
    opened = []
    try:
        from bcc import libbcc
        new_layouts = module_map_layouts(b)
        have = set(pinned(pin_prefix)["maps"])
        old_layouts, fdmap = {}, {}
        for name in new_layouts:
            if name not in have:
                continue
            fd = bpfsys.obj_get(os.path.join(dirs["maps"], name))
            opened.append(fd)
            # the kernel's word for what it fixed at creation; the C layout from meta
            fp = map_fingerprint(bpfsys.map_get_info(fd))
            known = (meta.get("maps") or {}).get(name) or {}
            if "layout" in known:
                fp["layout"] = known["layout"]
            old_layouts[name] = fp
            fdmap[libbcc.lib.bpf_table_fd(b.module, name.encode())] = fd
        problems = compare_layouts(old_layouts, new_layouts)
        if problems:
            raise UnsupportedError(
                "cannot upgrade meshbpf's programs in place, nothing changed: " +
                "; ".join(f"map {m}: {why}" for m, why in problems),
                hint="`meshbpf cleanup` and attach again loads the new programs with new "
                     "maps (meshed pods lose their interception until re-attached)")
        new_fds = {}
        for spec in wanted_programs(text, features, splice):
            _point_at_pinned_maps(b, spec.name, fdmap)
            try:
                new_fds[spec.name] = _load_prog(b, spec)
            except ApplyError:
                if spec.feature:
                    degraded.append(spec.name)
                    continue
                raise
        # From here on things change: new maps pinned, then program by program.
        created = []
        for name in new_layouts:
            if name not in have:
                _pin(libbcc.lib.bpf_table_fd(b.module, name.encode()),
                     os.path.join(dirs["maps"], name))
                created.append(name)
        replaced = _swap_programs(pin_prefix, cgroup_root, new_fds, features, repoint)
        write_meta(pin_prefix, {"version": version, "meshbpf": __version__,
                                "maps": new_layouts})
    finally:
        for fd in opened:
            os.close(fd)
        b.cleanup()
    return {"from": meta.get("version"), "to": version, "replaced": replaced,
            "created_maps": created, "degraded": degraded}


def _swap_programs(pin_prefix, cgroup_root, new_fds, features, repoint):
    dirs = pin_dirs(pin_prefix)
    specs = {p.name: p for p in PROGRAMS}
    cg = _check_cgroup_root(cgroup_root)
    cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        for name, nfd in new_fds.items():
            spec = specs[name]
            ppath = os.path.join(dirs["progs"], name)
            old_fd = bpfsys.obj_get(ppath) if os.path.exists(ppath) else None
            try:
                old_id = bpfsys.prog_get_info(old_fd)["id"] if old_fd is not None else None
                try:
                    how = _swap_one(pin_prefix, spec, nfd, old_fd, old_id, cgfd, dirs,
                                    repoint)
                except OSError as e:
                    raise ApplyError(
                        f"replacing program {name} failed ({e}); the programs replaced "
                        f"before it run the new version, the others the old one, all on "
                        "the same maps; running the upgrade again finishes it")
                _repin(nfd, ppath)
            finally:
                if old_fd is not None:
                    os.close(old_fd)
            out.append({"program": name, "how": how, "old_id": old_id,
                        "new_id": bpfsys.prog_get_info(nfd)["id"]})
    finally:
        os.close(cgfd)
    return out


def _swap_one(pin_prefix, spec, nfd, old_fd, old_id, cgfd, dirs, repoint):
    """Put program `nfd` where `old_fd` runs; returns how (or that it was not attached)."""
    if spec.target == "cgroup":
        link_path = os.path.join(dirs["links"], spec.name)
        if os.path.exists(link_path):
            lfd = bpfsys.obj_get(link_path)
            try:
                bpfsys.link_update(lfd, nfd)
            finally:
                os.close(lfd)
            return "link_update"
        if old_id is not None and _attached_ids(cgfd, spec.attach_type, old_id):
            try:
                bpfsys.prog_attach(cgfd, nfd, spec.attach_type,
                                   bpfsys.BPF_F_ALLOW_MULTI | bpfsys.BPF_F_REPLACE, old_fd)
                return "prog_attach(REPLACE)"
            except OSError:
                pass           # no BPF_F_REPLACE here (< 5.6): both run for a moment
            bpfsys.prog_attach(cgfd, nfd, spec.attach_type, bpfsys.BPF_F_ALLOW_MULTI)
            bpfsys.prog_detach(cgfd, old_fd, spec.attach_type)
            return "attach-then-detach"
        return "not attached (attach_all attaches the new one)"
    if spec.target == "sockhash":
        # a sockhash has one msg verdict slot: attaching swaps it in one step
        with Maps(pin_prefix) as maps:
            bpfsys.prog_attach(maps.fd(SOCKHASH_MAP), nfd, spec.attach_type)
        return "prog_attach(sockhash)"
    if spec.target == "netns":
        n = 0
        if os.path.isdir(dirs["links"]):
            for link in sorted(os.listdir(dirs["links"])):
                if not link.startswith("sk_lookup-"):
                    continue
                lfd = bpfsys.obj_get(os.path.join(dirs["links"], link))
                try:
                    bpfsys.link_update(lfd, nfd)
                finally:
                    os.close(lfd)
                n += 1
        return f"link_update ({n} pod sk_lookup links)"
    if repoint is not None:
        return f"tc filter replace ({repoint(nfd)} pod filters)"
    return "pinned (per-pod filters not re-pointed: no pod list given)"


def _repin(fd, path):
    """Pin `fd` at `path` in place of what is pinned there: pinned in a staging directory
    (bpffs refuses names with a dot), then renamed over it (bpffs renames atomically), so
    the pin never goes missing."""
    staging = os.path.join(os.path.dirname(os.path.dirname(path)), "staging")
    os.makedirs(staging, exist_ok=True)
    tmp = os.path.join(staging, os.path.basename(path))
    _unlink(tmp)
    _pin(fd, tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        _unlink(path)
        os.rename(tmp, path)



def _point_at_pinned_maps(b, name, fdmap):
    """Make the compiled program `name` use the pinned maps: bcc created its own maps and
    wrote their fds into the instructions; those are rewritten, in bcc's buffer, before
    bcc loads it (so bcc still passes its BTF and license as usual)."""
    from bcc import libbcc
    start = libbcc.lib.bpf_function_start(b.module, name.encode())
    size = libbcc.lib.bpf_function_size(b.module, name.encode())
    if not start or not size:
        raise ApplyError(f"program {name} is missing from the compiled module")
    code, _ = patch_map_fds(ctypes.string_at(start, size), fdmap)
    ctypes.memmove(start, code, size)
