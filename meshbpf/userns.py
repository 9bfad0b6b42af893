"""User namespace id mappings (pure): /proc/<pid>/uid_map and gid_map text -> host ids.

In a pod with its own user namespace (Kubernetes `hostUsers: false`) the proxy runs as
uid 1337 inside, which the kernel (and `bpf_get_current_uid_gid()`, which always answers
in the initial user namespace) sees as some other host uid, e.g. 101337. eBPF mode
compares host ids, so the pod's configured ids are translated through its maps at attach.
"""

import dataclasses

from .errors import UsageError

IDENTITY = "0 0 4294967295"


def parse_map(text):
    """[(inside, outside, count)] from the text of a uid_map or gid_map."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise UsageError(f"not an id map line: {line.strip()!r}")
        inside, outside, count = (int(p) for p in parts)
        out.append((inside, outside, count))
    return out


def to_host(id_, ranges):
    """The host id that `id_` inside the namespace is, or None when the map has no entry
    for it (then no process of the namespace can run with it)."""
    for inside, outside, count in ranges:
        if inside <= id_ < inside + count:
            return outside + (id_ - inside)
    return None


def is_identity(ranges):
    return all(inside == outside for inside, outside, _ in ranges) and bool(ranges)


@dataclasses.dataclass(frozen=True)
class IdMap:
    """A pod's user namespace as the host sees it: uid and gid maps."""
    uid_map: tuple = ((0, 0, 4294967295),)
    gid_map: tuple = ((0, 0, 4294967295),)

    @classmethod
    def from_text(cls, uid_text, gid_text):
        return cls(tuple(parse_map(uid_text)), tuple(parse_map(gid_text)))

    @property
    def identity(self):
        return is_identity(self.uid_map) and is_identity(self.gid_map)

    def host_uids(self, ids):
        """Host uids of `ids`; an id the map does not cover is kept as it is."""
        return [_or(to_host(i, self.uid_map), i) for i in ids]

    def host_gids(self, ids):
        return [_or(to_host(i, self.gid_map), i) for i in ids]

    def to_dict(self):
        return {"uid_map": [list(r) for r in self.uid_map],
                "gid_map": [list(r) for r in self.gid_map]}


def _or(value, default):
    return default if value is None else value
