"""Finding a pod on the node by its UID: its cgroup and its network namespace.

The kubelet names a pod's cgroup after the pod's UID, in one of two layouts:

  cgroupfs driver: kubepods/[burstable/|besteffort/]pod<uid>/<container>
      containerd: <container> is the 64-hex container id; CRI-O: crio-<id>
  systemd driver:  kubepods.slice/[kubepods-burstable.slice/]kubepods[-burstable]-pod<u>.slice/
                   cri-containerd-<id>.scope | crio-<id>.scope   (<u>: the uid, '-' -> '_')

The default places are checked first; otherwise the tree is walked (a few levels, never
into other pods) for a directory of either name, which also finds a kubelet with its own
--cgroup-root (kind: kubelet.slice/kubelet-kubepods.slice/.../kubelet-kubepods-pod<u>.slice).

The pod's cgroup is the pod<uid> directory (the unit meshbpf attaches to: every container
of the pod below it). Its network namespace is read from a process in it: every
container of a pod joins the sandbox's netns, so any of them gives the same one.

If they disagree (a process inside a container made its own netns with unshare/setns),
the netns of the pod's oldest process is used: that is the sandbox (pause) process, which
holds the pod's network namespace by definition; a warning names the others. Processes in
the node's own netns (host init's, and the agent's own: it runs with hostNetwork) are never
chosen: CRI-O's conmon can live in the pod cgroup (its crio-conmon-<id> scope, which is
skipped) and runs in the host's netns, and a pod must never resolve to the node's network.

Pure path parsing (names, candidate paths, /proc/<pid>/stat and ns links) is separate
from the filesystem walk, so both drivers and both runtimes are unit-tested on fake trees.
The walk reads `cgroup.procs`, whose pids are in the reader's pid namespace: the agent
must share the host's (hostPID), with the host's /proc as `proc_root`.
"""

import dataclasses
import logging
import os
import re

from .. import system
from ..errors import MeshbpfError, PodNotFoundError, PodNotRunningError, UsageError

log = logging.getLogger(__name__)

QOS_CLASSES = ("", "burstable", "besteffort")      # "" = Guaranteed (directly under kubepods)
WALK_DEPTH = 6          # kubepods below a custom --cgroup-root / nested (kind) node cgroup

_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,127}$")
_POD_DIR_CGROUPFS = re.compile(r"^pod([0-9A-Za-z-]{8,})$")
# A systemd slice name carries its parents' names: kubepods[-qos]-pod<u>.slice, with the
# kubelet's --cgroup-root as a prefix when it is not the root (kind: kubelet-kubepods-...).
_POD_DIR_SYSTEMD = re.compile(r"^(?:[0-9A-Za-z_]+(?:-[0-9A-Za-z_]+)*-)?kubepods-"
                              r"(?:(?:burstable|besteffort)-)?pod([0-9A-Za-z_]{8,})\.slice$")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_NS_LINK = re.compile(r"^net:\[(\d+)\]$")


# ---- pure parsing -------------------------------------------------------------------------

def normalize_uid(uid):
    """The pod UID with dashes (a systemd-escaped one with '_' is accepted too)."""
    if not isinstance(uid, str) or not _UID.match(uid):
        raise UsageError(f"pod uid {uid!r} is not a Kubernetes UID (letters, digits, '-')")
    return uid.replace("_", "-")


def pod_dir_names(uid):
    """Every name the kubelet gives pod `uid`'s cgroup directory, both drivers, every QoS."""
    uid = normalize_uid(uid)
    u = uid.replace("-", "_")
    return (f"pod{uid}", f"kubepods-pod{u}.slice", f"kubepods-burstable-pod{u}.slice",
            f"kubepods-besteffort-pod{u}.slice")


def candidate_paths(uid):
    """Where the pod's cgroup is under the default cgroup root, relative to the cgroup
    mount: cgroupfs first, then systemd, Guaranteed/Burstable/BestEffort."""
    uid = normalize_uid(uid)
    u = uid.replace("-", "_")
    out = []
    for qos in QOS_CLASSES:
        out.append(os.path.join("kubepods", qos, f"pod{uid}") if qos
                   else os.path.join("kubepods", f"pod{uid}"))
    for qos in QOS_CLASSES:
        if qos:
            out.append(os.path.join("kubepods.slice", f"kubepods-{qos}.slice",
                                    f"kubepods-{qos}-pod{u}.slice"))
        else:
            out.append(os.path.join("kubepods.slice", f"kubepods-pod{u}.slice"))
    return out


def uid_of_pod_dir(name):
    """The pod UID (with dashes) a kubelet pod cgroup directory name carries, or None.
    systemd escapes every '-' of the uid as '_'; cgroupfs keeps the uid as it is."""
    m = _POD_DIR_CGROUPFS.match(name) or _POD_DIR_SYSTEMD.match(name)
    return m.group(1).replace("_", "-") if m else None


@dataclasses.dataclass(frozen=True)
class ContainerDir:
    runtime: str          # "containerd" | "cri-o" | "docker" | "unknown"
    id: str
    monitor: bool = False  # a runtime monitor (CRI-O's conmon), not a container of the pod


def parse_container_dir(name):
    """What a directory under a pod cgroup is: a ContainerDir, or None if not a container."""
    for prefix, runtime, monitor in (("cri-containerd-", "containerd", False),
                                     ("crio-conmon-", "cri-o", True),
                                     ("crio-", "cri-o", False),
                                     ("docker-", "docker", False)):
        if name.startswith(prefix):
            cid = name[len(prefix):]
            cid = cid.removesuffix(".scope")
            return ContainerDir(runtime, cid, monitor) if cid else None
    if _HEX_ID.match(name):
        return ContainerDir("containerd", name)     # cgroupfs: the bare id
    return None


def netns_ident(link):
    """The inode of a /proc/<pid>/ns/net link text ('net:[4026532281]'), or None."""
    m = _NS_LINK.match(link or "")
    return int(m.group(1)) if m else None


def start_time(stat_text):
    """Field 22 (starttime, clock ticks since boot) of a /proc/<pid>/stat text, or None."""
    try:
        return int(stat_text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    started: int          # clock ticks since boot
    netns: int            # netns inode


def choose_netns(procs, node_netns):
    """(chosen Proc, [Procs in other netns]) among `procs` not in any of `node_netns` (the
    node's own netns inodes); (None, []) when none is left. The oldest process wins (the
    pod's sandbox)."""
    node_netns = set(node_netns)
    procs = [p for p in procs if p.netns not in node_netns]
    if not procs:
        return None, []
    chosen = min(procs, key=lambda p: (p.started, p.pid))
    return chosen, [p for p in procs if p.netns != chosen.netns]


# ---- the filesystem walk -------------------------------------------------------------------

def detect_cgroup_root():
    """The cgroup v2 mount of this machine (what the DaemonSet mounts from the host)."""
    return system.cgroup2_mount()


def find_pod_cgroup(uid, cgroup_root):
    """The absolute pod<uid> cgroup directory under `cgroup_root`."""
    for rel in candidate_paths(uid):
        path = os.path.join(cgroup_root, rel)
        if os.path.isdir(path):
            return path
    found = []
    _walk(cgroup_root, uid, WALK_DEPTH, found)
    if len(found) > 1:
        raise MeshbpfError(f"pod {uid} has several cgroups: {', '.join(sorted(found))}")
    if not found:
        raise PodNotFoundError(f"pod {uid} has no cgroup under {cgroup_root}",
                               hint="not on this node, or not created yet")
    return found[0]


def _walk(path, uid, depth, found):
    if depth <= 0:
        return
    try:
        entries = list(os.scandir(path))
    except OSError:
        return                      # removed meanwhile, or not readable
    for e in entries:
        try:
            if not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        pod = uid_of_pod_dir(e.name)
        if pod == uid:
            found.append(e.path)
        elif pod is None and not e.name.endswith(".scope"):
            _walk(e.path, uid, depth - 1, found)     # other pods and leaf units: not below


def pod_pids(pod_cgroup):
    """Pids in the pod's cgroup and below, except those of runtime monitors."""
    pids = []
    for dirpath, dirnames, _ in os.walk(pod_cgroup):
        dirnames[:] = [d for d in dirnames if not _is_monitor(d)]
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split() if int(x) > 0)
        except (OSError, ValueError):
            continue
    return pids


def node_netns(proc_root):
    """The node's own netns inodes: the host init's (pid 1 of `proc_root`) and this
    process's own (the agent runs with hostNetwork); either may be unreadable (pid 1 across
    a user namespace), not both."""
    found, errors = set(), []
    for who in ("1", "self"):
        try:
            ident = netns_ident(os.readlink(os.path.join(proc_root, who, "ns", "net")))
        except OSError as e:
            errors.append(f"{who}: {e.strerror}")
            continue
        if ident is not None:
            found.add(ident)
    if not found:
        raise MeshbpfError(f"cannot read the node's network namespace from {proc_root} "
                           f"({'; '.join(errors) or 'no net namespace link'})",
                           hint="the host's /proc and hostPID are needed")
    return found


def _is_monitor(name):
    c = parse_container_dir(name)
    return c is not None and c.monitor


def _read_proc(proc_root, pid):
    try:
        link = os.readlink(os.path.join(proc_root, str(pid), "ns", "net"))
        with open(os.path.join(proc_root, str(pid), "stat")) as f:
            stat = f.read()
    except OSError:
        return None                 # exited meanwhile
    ns, started = netns_ident(link), start_time(stat)
    if ns is None or started is None:
        return None
    return Proc(pid, started, ns)


def find_pod(uid, proc_root="/proc", cgroup_root=None):
    """(netns_path, cgroup_path) of pod `uid` on this node.

    netns_path is `<proc_root>/<pid>/ns/net` of the pod's sandbox process; cgroup_path the
    pod<uid> directory. PodNotFoundError: no such pod cgroup here. PodNotRunningError: the
    cgroup exists but no process of the pod runs (yet, or any more)."""
    uid = normalize_uid(uid)
    if cgroup_root is None:
        cgroup_root = detect_cgroup_root()
    cgroup = find_pod_cgroup(uid, cgroup_root)
    host = node_netns(proc_root)
    procs = [p for p in (_read_proc(proc_root, pid) for pid in pod_pids(cgroup)) if p]
    chosen, others = choose_netns(procs, host)
    if chosen is None:
        raise PodNotRunningError(f"pod {uid} has no process in its own network namespace yet "
                                 f"(cgroup {cgroup})")
    if others:
        log.warning("pod %s: processes %s are in other network namespaces than its sandbox "
                    "(pid %d); using the sandbox's", uid, ",".join(str(p.pid) for p in others),
                    chosen.pid)
    return os.path.join(proc_root, str(chosen.pid), "ns", "net"), cgroup
