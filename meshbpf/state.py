"""What meshbpf has attached on a node, kept on a tmpfs: pod records, the writers' lock,
the eBPF pod-index allocator and the cached kernel probe.

The kernel holds the truth (pinned maps, iptables chains); these records let `status`,
`update` and `detach` find a pod, its config and exactly the kernel entries it owns
after the process that attached it has exited. They live under
/run/meshbpf/<instance>, where <instance> is the basename of the pin prefix, so tests
with their own prefix never see the node's records.

A record is keyed by the pod's stable id (a name or UID its caller gives, see
meshbpf.pod.Pod.id), never by the netns inode the kernel reuses; `by-cookie/<netns
cookie>` links a live netns back to its pod id (cookies are never reused within a boot).
"""

import contextlib
import fcntl
import json
import os
import re
import time

STATE_ROOT = os.environ.get("MESHBPF_STATE_ROOT", "/run/meshbpf")

# A pod id is a file name: Kubernetes UIDs and names, or the generated ones.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}$")


def valid_pod_id(pod_id):
    return isinstance(pod_id, str) and bool(_ID.match(pod_id))


def _write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True, indent=1)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


class StateStore:
    """Pod records of one pin prefix (instance)."""

    def __init__(self, pin_prefix):
        self.instance_dir = os.path.join(STATE_ROOT, os.path.basename(pin_prefix.rstrip("/")))
        self.dir = os.path.join(self.instance_dir, "pods")
        self.cookie_dir = os.path.join(self.instance_dir, "by-cookie")

    def _path(self, pod_id):
        return os.path.join(self.dir, f"{pod_id}.json")

    def save(self, pod_id, record):
        """Write `record` as pod `pod_id`'s; links its netns cookie to the id."""
        os.makedirs(self.dir, exist_ok=True)
        record = dict(record, id=pod_id, updated=time.time())
        _write_json(self._path(pod_id), record)
        cookie = record.get("netns_cookie")
        if cookie is not None:
            os.makedirs(self.cookie_dir, exist_ok=True)
            link = os.path.join(self.cookie_dir, str(cookie))
            if os.path.lexists(link) and os.readlink(link) != pod_id:
                os.unlink(link)
            if not os.path.lexists(link):
                os.symlink(pod_id, link)
        return record

    def load(self, pod_id):
        if not valid_pod_id(str(pod_id)):
            return None
        return _read_json(self._path(pod_id))

    def id_of_cookie(self, cookie):
        """The id of the pod whose record holds netns cookie `cookie`, or None."""
        try:
            pod_id = os.readlink(os.path.join(self.cookie_dir, str(cookie)))
        except OSError:
            return None
        rec = self.load(pod_id)
        return pod_id if rec and rec.get("netns_cookie") == cookie else None

    def remove(self, pod_id):
        rec = self.load(pod_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(pod_id))
        if rec and rec.get("netns_cookie") is not None:
            link = os.path.join(self.cookie_dir, str(rec["netns_cookie"]))
            with contextlib.suppress(OSError):
                if os.readlink(link) == pod_id:
                    os.unlink(link)

    def ids(self):
        if not os.path.isdir(self.dir):
            return []
        return sorted(n[:-5] for n in os.listdir(self.dir) if n.endswith(".json"))

    def all(self):
        return [r for r in (self.load(i) for i in self.ids()) if r]

    def destroy(self):
        """Remove every record and the instance directory (the lock file stays to its owner)."""
        for pod_id in self.ids():
            self.remove(pod_id)
        for name in ("probe.json", "indexes.json", "ifaces.json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.instance_dir, name))
        for d in (self.dir, self.cookie_dir):
            with contextlib.suppress(OSError):
                for n in os.listdir(d):
                    os.unlink(os.path.join(d, n))
                os.rmdir(d)

    def remove_instance_dir(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.instance_dir)

    # ---- the one lock every writer of this instance takes --------------------------
    @contextlib.contextmanager
    def locked(self):
        """Serialise every writer of this pin prefix across processes (CLI, agent, CNI
        plugin), whichever mode. If a cleanup removed the lock file while we waited, the
        lock we got is on a dead inode: take the new file's."""
        os.makedirs(self.instance_dir, exist_ok=True)
        path = os.path.join(self.instance_dir, "lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            os.makedirs(self.instance_dir, exist_ok=True)
        try:
            yield
        finally:
            os.close(fd)

    def unlink_lock(self):
        """Called by cleanup while it holds the lock: waiters re-open the new file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.instance_dir, "lock"))

    # ---- cached node facts ------------------------------------------------------------
    def cached_probe(self, key):
        doc = _read_json(os.path.join(self.instance_dir, "probe.json"))
        return doc["result"] if doc and doc.get("key") == key else None

    def cache_probe(self, key, result):
        os.makedirs(self.instance_dir, exist_ok=True)
        _write_json(os.path.join(self.instance_dir, "probe.json"), {"key": key, "result": result})


class IndexAllocator:
    """Small integer ids of one instance, each owned by a pod id, with a free list: eBPF
    pod indexes (the scope of a pod's rule keys, "indexes") and inbound filter ids
    ("ifaces"). Callers hold StateStore.locked()."""

    def __init__(self, store, lowest=1, limit=None, name="indexes"):
        self.path = os.path.join(store.instance_dir, f"{name}.json")
        self.lowest, self.limit = lowest, limit

    def __repr__(self):
        return f"IndexAllocator({self.path})"

    def _load(self):
        doc = _read_json(self.path) or {}
        return {int(k): v for k, v in doc.get("owners", {}).items()}, doc.get("free", []), \
            doc.get("next", self.lowest)

    def _save(self, owners, free, nxt):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _write_json(self.path, {"owners": {str(k): v for k, v in owners.items()},
                                "free": free, "next": nxt})

    def owner(self, index):
        return self._load()[0].get(index)

    def allocate(self, pod_id, limit=None):
        """A free index for `pod_id`, or None when `limit` (or the allocator's) is reached."""
        limit = limit if limit is not None else self.limit
        owners, free, nxt = self._load()
        if free:
            index = free.pop()
        else:
            index = nxt
            if limit is not None and index >= limit:
                return None
            nxt += 1
        owners[index] = pod_id
        self._save(owners, free, nxt)
        return index

    def claim(self, index, pod_id):
        """Record `index` as `pod_id`'s (adoption of a pinned pod entry)."""
        owners, free, nxt = self._load()
        owners[index] = pod_id
        if index in free:
            free.remove(index)
        self._save(owners, free, max(nxt, index + 1))

    def release(self, index):
        owners, free, nxt = self._load()
        if owners.pop(index, None) is not None and index not in free:
            free.append(index)
        self._save(owners, free, nxt)
