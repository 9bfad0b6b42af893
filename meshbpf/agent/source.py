"""The pods file: what the operator wants meshed on this node (pure: text in, pods out).

    {"pods": [{"name": "web", "pid": 4242},
              {"name": "db", "netns": "/run/netns/db", "cgroup": "/sys/fs/cgroup/.../db",
               "id": "7f3c-uid", "config": {"outbound_ip_ranges_exclude": "10.96.0.0/12"}},
              {"name": "vm-app", "netns": "/proc/1/ns/net", "cgroup": "/sys/fs/cgroup/app.slice",
               "host": true, "inbound_interfaces": ["eth0"]}]}

YAML or JSON (JSON is YAML). A file that does not parse as a whole, or whose top level is
not {"pods": [...]}, is an error for the file: the caller keeps its last good desired state
(a half-written file is never acted on). A bad entry is an error for that entry only (its
name and the reason); the other entries are still served. Two entries with one id are
both errors: neither is served, since either could be the one meant.

The host network namespace (a VM or bare-metal workload whose sidecar is a system
service) is only accepted with an explicit "host": true; the daemon also compares the
named netns with its own by inode (a side effect, not done here). A host entry must say
where its inbound traffic is captured, since that is the whole machine's:
"inbound_interfaces" lists interface names, or is "*" for every non-loopback one.

A "pending" entry names a Kubernetes pod by "namespace/name" and nothing else (no pid, no
netns; a "cgroup" may be given): the container runtime's CNI ADD for that pod (meshbpf-cni,
served by meshbpf.agent.cniserver) tells the agent its netns before any container starts,
and `complete()` turns the entry into a served pod with it. Its id defaults to the name
with "/" as ":" ("shop/web-0" -> "shop:web-0"). Until its ADD the entry is only reported.

What the CNI server asks of a pod source is `lookup(namespace, name, uid)`: the desired
pod the runtime's identity names, or None (not meshed). For the pods file that is
`lookup(pods, ...)` below; a Kubernetes source answers by the pod's UID.
"""

import dataclasses
import json

from ..errors import MeshbpfError, UsageError
from ..state import valid_pod_id

# Paths that name the machine's own network namespace whatever the pid namespace.
HOST_NETNS_PATHS = ("/proc/1/ns/net", "/proc/self/ns/net", "/proc/thread-self/ns/net")
ENTRY_KEYS = {"name", "id", "pid", "netns", "cgroup", "config", "host", "inbound_interfaces"}
IFNAMSIZ = 16


class PodsFileError(UsageError):
    """The pods file as a whole cannot be used (does not parse, wrong top level)."""


@dataclasses.dataclass(frozen=True)
class DesiredPod:
    id: str
    name: str
    pid: int = None
    netns: str = None
    cgroup: str = None
    host: bool = False
    config: object = None          # meshbpf.config.InterceptConfig
    inbound_interfaces: object = None  # host entries: tuple of names, or "*"
    source: str = "pods-file"
    # The CNI ADD's binding (same name, same pod UID as the id) says where the pod is, also
    # once the source finds it itself (Kubernetes: the runtime's netns path and the one read
    # from /proc name one netns; keeping the binding's means a later watch event is no change)
    by_cni: bool = False

    @property
    def pending(self):
        """Named only by "namespace/name": waiting for its CNI ADD to say its netns."""
        return self.pid is None and self.netns is None

    @property
    def cni_enrolled(self):
        """Does a CNI ADD enroll this pod (and its DEL detach it)?"""
        return self.pending or self.by_cni

    def spec(self):
        """What identifies the pod's kernel objects: a change means attach again."""
        return (self.pid, self.netns, self.cgroup, self.host, self.inbound_interfaces)

    def config_dict(self):
        return self.config.to_dict()


@dataclasses.dataclass(frozen=True)
class EntryError:
    index: int
    name: str
    id: str
    reason: str
    source: str = "pods-file"

    def to_dict(self):
        return dataclasses.asdict(self)


def parse_document(text):
    """The file's text as a document; PodsFileError if it does not parse as a whole."""
    if not text.strip():
        raise PodsFileError("the pods file is empty")
    try:
        doc = json.loads(text)
    except ValueError:
        import yaml
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PodsFileError(f"the pods file is neither JSON nor YAML: {_one_line(e)}")
    if not isinstance(doc, dict) or not isinstance(doc.get("pods"), list):
        raise PodsFileError('the pods file must be an object with a "pods" list')
    unknown = sorted(set(doc) - {"pods"})
    if unknown:
        raise PodsFileError(f"unknown top-level key(s) in the pods file: {', '.join(unknown)}")
    return doc


def parse(text):
    """(pods {id: DesiredPod}, [EntryError]) from the pods file's text; PodsFileError if
    the file as a whole is unusable."""
    doc = parse_document(text)
    good, errors = [], []
    for i, entry in enumerate(doc["pods"]):
        try:
            good.append((i, parse_entry(entry)))
        except MeshbpfError as e:
            name = entry.get("name") if isinstance(entry, dict) else None
            pid_ = entry.get("id") if isinstance(entry, dict) else None
            errors.append(EntryError(i, name if isinstance(name, str) else None,
                                     pid_ if isinstance(pid_, str) else None, str(e)))
    by_id, by_name = {}, {}
    for i, p in good:
        by_id.setdefault(p.id, []).append(i)
        by_name.setdefault(p.name, []).append(i)
    pods = {}
    for i, p in good:
        dup = []
        if len(by_id[p.id]) > 1:
            dup.append(f"id {p.id!r}")
        if len(by_name[p.name]) > 1:
            dup.append(f"name {p.name!r}")
        if dup:
            others = sorted(set(by_id[p.id] + by_name[p.name]) - {i})
            errors.append(EntryError(i, p.name, p.id, f"duplicate {' and '.join(dup)} "
                                     f"(also entry {', '.join(map(str, others))})"))
        else:
            pods[p.id] = p
    errors.sort(key=lambda e: e.index)
    return pods, errors


def parse_entry(entry):
    """One entry as a DesiredPod; UsageError saying what is wrong with it."""
    from ..config import InterceptConfig
    if not isinstance(entry, dict):
        raise UsageError("an entry must be an object")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}",
                         hint=f"known: {', '.join(sorted(ENTRY_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise UsageError('"name" (a non-empty string) is required')
    pod_id = entry.get("id", default_id(name))
    if not valid_pod_id(pod_id):
        raise UsageError(f"id {pod_id!r} is not usable: letters, digits and ._:@- only, "
                         "starting with a letter or digit" +
                         ("" if "id" in entry else ' (the id defaults to the name; give "id")'))
    host = entry.get("host", False)
    if not isinstance(host, bool):
        raise UsageError('"host" must be true or false')
    pid, netns, cgroup = entry.get("pid"), entry.get("netns"), entry.get("cgroup")
    if pid is not None and netns is not None:
        raise UsageError('name the pod with exactly one of "pid" or "netns" (+ "cgroup"), '
                         'or neither ("namespace/name": its CNI ADD says where it is)')
    if pid is None and netns is None:
        if host:
            raise UsageError('a host workload has no CNI ADD: name it with "pid" or "netns"')
        if cgroup is not None and not (isinstance(cgroup, str) and cgroup.startswith("/")):
            raise UsageError('"cgroup" must be an absolute cgroup v2 directory')
    elif pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise UsageError(f'"pid" must be a positive integer, not {pid!r}')
        if cgroup is not None:
            raise UsageError('"cgroup" goes with "netns"; with "pid" the process\'s cgroup is used')
        if pid == 1 and not host:
            raise UsageError("pid 1 runs in the host's network namespace; "
                             'a host workload needs "host": true')
    else:
        if not isinstance(netns, str) or not netns:
            raise UsageError('"netns" must be a path or a name under /run/netns')
        if "/" not in netns:
            netns = f"/run/netns/{netns}"
        if cgroup is None or not isinstance(cgroup, str) or not cgroup.startswith("/"):
            raise UsageError('"cgroup" (an absolute cgroup v2 directory) is required with "netns"')
        if is_host_netns_path(netns) and not host:
            raise UsageError(f"{netns} is the host's network namespace; a VM or bare-metal "
                             'workload whose sidecar is a system service needs "host": true')
    ifaces = inbound_interfaces(entry.get("inbound_interfaces"), host)
    cfg = entry.get("config", {})
    if not isinstance(cfg, dict):
        raise UsageError('"config" must be an object of InterceptConfig fields')
    try:
        config = InterceptConfig.from_dict(cfg)
    except TypeError as e:
        raise UsageError(f"config: {e}")
    except MeshbpfError as e:
        raise UsageError(f"config: {e}")
    return DesiredPod(id=pod_id, name=name, pid=pid, netns=netns, cgroup=cgroup, host=host,
                      config=config, inbound_interfaces=ifaces)


def inbound_interfaces(value, host):
    """An entry's "inbound_interfaces" as kept: a tuple of names, "*", or None (a pod).

    Only a host entry has one, and it must: tc (eBPF mode) or PREROUTING (iptables mode)
    on the host's interfaces takes every inbound connection of the machine, so where is
    never a default."""
    if not host:
        if value is not None:
            raise UsageError('"inbound_interfaces" is for host entries ("host": true); a '
                             "pod's inbound traffic is captured on its own interfaces")
        return None
    if value is None:
        raise UsageError('a host entry must say where its inbound traffic is captured: '
                         '"inbound_interfaces": ["eth0", ...], or "*" for every '
                         "non-loopback interface of the machine")
    if value == "*":
        return "*"
    if not isinstance(value, list) or not value:
        raise UsageError('"inbound_interfaces" must be a non-empty list of interface names, or "*"')
    for n in value:
        if not isinstance(n, str) or not 0 < len(n) < IFNAMSIZ or "/" in n or \
                any(c.isspace() for c in n) or n in (".", "..", "lo"):
            raise UsageError(f'"inbound_interfaces": {n!r} is not an interface name '
                             "(lo is never captured)")
    if len(set(value)) != len(value):
        raise UsageError('"inbound_interfaces" names an interface twice')
    return tuple(value)


def union(parts):
    """One desired state from several sources' (pods {id: DesiredPod}, [EntryError]): the
    union; an id that two sources serve is an error for each (neither is served, since
    either could be the one meant)."""
    by_id = {}
    errors = []
    for pods, errs in parts:
        errors.extend(errs)
        for pod_id, p in pods.items():
            by_id.setdefault(pod_id, []).append(p)
    out = {}
    for pod_id, ps in by_id.items():
        if len(ps) == 1:
            out[pod_id] = ps[0]
            continue
        for p in ps:
            others = ", ".join(f"{o.name} ({o.source})" for o in ps if o is not p)
            errors.append(EntryError(-1, p.name, pod_id, f"duplicate id {pod_id!r} "
                                     f"(also {others})", source=p.source))
    return out, errors


def default_id(name):
    """The id of an entry that gives none: its name, "/" (namespace/name) written ":"."""
    return name.replace("/", ":")


def lookup(pods, namespace, name, uid=None):
    """The desired pod (of `pods`, {id: DesiredPod}) a CNI ADD's identity names: the entry
    named "namespace/name", else the one whose id is the pod's UID; None if there is none
    (the pod is not meshed)."""
    if not namespace or not name:
        return None
    key = f"{namespace}/{name}"
    for p in (pods or {}).values():
        if p.name == key:
            return p
    if uid and uid in (pods or {}):
        return pods[uid]
    return None


def complete(pods, bindings):
    """(served {id: DesiredPod}, waiting [DesiredPod]): every pending pod that a CNI ADD
    bound (`bindings`: {"namespace/name": {"netns", "cgroup", ...}}) gets that netns (and
    that cgroup, unless its entry names one); a pending pod without a binding waits. A
    `by_cni` pod takes only a binding of its own UID, and takes it even when its source
    found it on the node; after its DEL (a "deleted" binding) it waits."""
    served, waiting = {}, []
    for pod_id, p in (pods or {}).items():
        b = (bindings or {}).get(p.name)
        if b is not None and p.by_cni and b.get("uid") != p.id:
            b = None            # another pod of that name (a StatefulSet's earlier web-0)
        if b is not None and b.get("deleted"):
            if p.by_cni:        # its DEL came: not served again while its sandbox goes
                waiting.append(p)
                continue
            b = None
        if not p.pending:
            if p.by_cni and b is not None and b.get("netns"):
                p = dataclasses.replace(p, pid=None, netns=b["netns"],
                                        cgroup=b.get("cgroup") or p.cgroup)
            served[pod_id] = p
            continue
        if b is None or not b.get("netns"):
            waiting.append(p)
            continue
        served[pod_id] = dataclasses.replace(p, netns=b["netns"],
                                             cgroup=p.cgroup or b.get("cgroup"))
    return served, waiting


def is_host_netns_path(path):
    return path in HOST_NETNS_PATHS


def _one_line(e):
    return " ".join(str(e).split())
