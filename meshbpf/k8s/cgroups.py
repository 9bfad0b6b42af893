"""Where a Kubernetes node keeps its pods in the cgroup v2 tree, and the attach point that
follows from it.

Why not the cgroup root: a CNI's socket load balancer (Cilium's, and others) attaches its own
`cgroup/connect4` at the root and rewrites a ClusterIP to a backend there. The kernel runs a
socket's programs from its own cgroup upwards (the deepest first), so meshbpf attached at the
root too runs after the load balancer, and the sidecar is told the backend, not the ClusterIP
(Istio then routes by the wrong service; cilium#16583). Attached at the kubepods cgroup, one
level below, meshbpf sees the ClusterIP first and sends the connection to the sidecar; the
sidecar's own connect (proxy uid, left alone by meshbpf) then meets the load balancer.

The kubelet puts every pod below one cgroup, `kubepods`:
  - cgroupfs driver: `<root>/kubepods/` (QoS classes below: `burstable/`, `besteffort/`,
    guaranteed pods directly: `pod<uid>/`);
  - systemd driver:  `<root>/kubepods.slice/` (`kubepods-burstable.slice/...`);
  - a kubelet `--cgroup-root` (kind, some distributions) moves it one or two levels down:
    `kubelet/kubepods/`, `kubelet.slice/kubelet-kubepods.slice/`.

`find_kubepods(dirs)` is the choice, on relative directory paths (pure); `kubepods_cgroup(root)`
lists the tree (the only filesystem look) and asks it; `resolve_cgroup_root(value)` turns the
daemon's `--cgroup-root` into a path (`kubepods`, `auto`; any other value is kept as given).
"""

import os

from ..errors import NotFoundError, UsageError

MAX_DEPTH = 3                     # kubepods lies at most this many levels below the root
KUBEPODS = "kubepods"             # --cgroup-root keyword: the kubepods cgroup, or an error
AUTO = "auto"                     # --cgroup-root keyword: kubepods if any, else the root
KEYWORDS = (KUBEPODS, AUTO)


def is_kubepods_name(name):
    """A directory name the kubelet gives its pods' parent cgroup (either driver)."""
    return name in ("kubepods", "kubepods.slice") or (
        name.endswith("-kubepods.slice") and "/" not in name)


def driver_of(relpath):
    """"systemd" or "cgroupfs", from the kubepods cgroup's name."""
    return "systemd" if relpath.endswith(".slice") else "cgroupfs"


def find_kubepods(dirs):
    """The kubepods cgroup among `dirs` (paths relative to the cgroup root, "/"-separated):
    the shallowest one whose last part is a kubepods name and that is not inside another.
    NotFoundError if none; UsageError if two are equally shallow (a node that changed its
    cgroup driver keeps both: which one holds the pods is the operator's to say)."""
    found = []
    for d in dirs:
        parts = [p for p in d.strip("/").split("/") if p]
        if not parts or len(parts) > MAX_DEPTH or not is_kubepods_name(parts[-1]):
            continue
        if any(is_kubepods_name(p) for p in parts[:-1]):
            continue                  # a cgroup below kubepods (a pod named so, ...)
        found.append("/".join(parts))
    if not found:
        raise NotFoundError("no kubepods cgroup (kubepods/ of the cgroupfs driver or "
                            "kubepods.slice/ of the systemd driver)",
                            hint="is this a Kubernetes node? pass --cgroup-root PATH")
    depth = min(f.count("/") for f in found)
    best = sorted(f for f in found if f.count("/") == depth)
    if len(best) > 1:
        raise UsageError(f"more than one kubepods cgroup: {', '.join(best)}",
                         hint="pass the one that holds the pods as --cgroup-root PATH")
    return best[0]


def _cgroup_dirs(root, max_depth=MAX_DEPTH):
    """Relative paths of the cgroups below `root`, down to `max_depth` levels, not below a
    kubepods one (its pods are many and never the answer)."""
    out = []
    stack = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        if depth >= max_depth:
            continue
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:
            continue                  # removed meanwhile, or not readable: not ours
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            sub = f"{rel}/{e.name}" if rel else e.name
            if not os.path.isfile(os.path.join(e.path, "cgroup.procs")):
                continue              # not a cgroup
            out.append(sub)
            if not is_kubepods_name(e.name):
                stack.append((sub, depth + 1))
    return out


def kubepods_cgroup(cgroup_root):
    """The absolute kubepods cgroup below `cgroup_root` (a cgroup v2 directory: the mount,
    or in tests a throwaway tree). NotFoundError / UsageError as find_kubepods."""
    if not os.path.isfile(os.path.join(cgroup_root, "cgroup.procs")):
        raise UsageError(f"{cgroup_root} is not a cgroup v2 directory")
    return os.path.join(cgroup_root, find_kubepods(_cgroup_dirs(cgroup_root)))


def resolve_cgroup_root(value, base=None):
    """The daemon's --cgroup-root: None and a path are returned unchanged (None: the service's
    default, the cgroup v2 root or the loaded node's); `kubepods`: the kubepods cgroup below
    `base` (default the cgroup v2 mount), an error if there is none; `auto`: the same, or
    None where there is none (a host without Kubernetes)."""
    if value not in KEYWORDS:
        return value
    if base is None:
        from ..system import cgroup2_mount
        base = cgroup2_mount()
    try:
        return kubepods_cgroup(base)
    except NotFoundError:
        if value == AUTO:
            return None
        raise
