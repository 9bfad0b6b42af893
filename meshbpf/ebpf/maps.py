"""Typed access to meshbpf's pinned maps: open by pin path, update/delete/lookup/iterate.

Works in any process (no bcc needed): maps are opened with BPF_OBJ_GET from their pins
under <pin_prefix>/maps/ and accessed with raw bpf(2) calls (meshbpf.bpfsys). Keys and
values are the ctypes structs of meshbpf.ebpf.structs. Per-CPU counters are summed here.
"""

import ctypes
import os

from .. import bpfsys
from ..errors import NotFoundError
from . import structs

# map name -> (key type, value type); per-CPU maps are marked in PERCPU.
MAP_TYPES = {
    "pods": (structs.U64, structs.PodConfig),
    "cidr_rules": (structs.CidrKey, structs.U32),
    "port_rules": (structs.PortKey, structs.U32),
    "local_ips": (structs.IpKey, structs.U32),
    "node_cfg": (structs.U32, structs.NodeConfig),
    "orig_dst": (structs.U64, structs.OrigDst),
    "pairs": (structs.SockKey, structs.OrigDst),
    "sock_hash": (structs.SockKey, structs.U64),
    "dns_orig": (structs.U64, structs.OrigDst),
    "netns_addrs": (structs.NetnsAddrKey, structs.U32),
    "netns_src": (structs.U64, structs.NetnsSrc),
    "pod_cgroups": (structs.U64, structs.PodCgroup),
    "netns_ino": (structs.U32, structs.U64),
    "counters": (structs.U32, structs.U64),
    "pod_conns": (structs.U64, structs.U64),
}
PERCPU = {"counters"}


def possible_cpus():
    """Number of possible CPUs (the stride of per-CPU map values)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class PinnedMap:
    """One map opened from its pin (raw key/value bytes, or ctypes structs)."""

    def __init__(self, path, key_type=None, value_type=None, percpu=False):
        self.path = path
        try:
            self.fd = bpfsys.obj_get(path)
        except OSError as e:
            raise NotFoundError(f"pinned map {path} cannot be opened: {os.strerror(e.errno)}")
        info = bpfsys.map_get_info(self.fd)
        self.info = info
        self.key_size, self.value_size = info["key_size"], info["value_size"]
        self.key_type, self.value_type, self.percpu = key_type, value_type, percpu

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _k(self, key):
        raw = bytes(key) if not isinstance(key, (bytes, bytearray)) else bytes(key)
        if len(raw) != self.key_size:
            raise ValueError(f"{self.path}: key of {len(raw)} bytes, map wants {self.key_size}")
        return raw

    def update(self, key, value, flags=bpfsys.BPF_ANY):
        raw = bytes(value)
        if len(raw) != self.value_size:
            raise ValueError(f"{self.path}: value of {len(raw)} bytes, map wants {self.value_size}")
        bpfsys.map_update_elem(self.fd, self._k(key), raw, flags)

    def delete(self, key):
        return bpfsys.map_delete_elem(self.fd, self._k(key))

    def lookup_raw(self, key):
        size = self.value_size
        if self.percpu:
            size = ((self.value_size + 7) // 8) * 8 * possible_cpus()
        return bpfsys.map_lookup_elem(self.fd, self._k(key), size)

    def lookup(self, key):
        raw = self.lookup_raw(key)
        if raw is None or self.value_type is None or self.percpu:
            return raw
        return self.value_type.from_buffer_copy(raw[:ctypes.sizeof(self.value_type)])

    def keys(self):
        for raw in bpfsys.map_keys(self.fd, self.key_size):
            yield self.key_type.from_buffer_copy(raw) if self.key_type else raw

    def items(self):
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def __len__(self):
        return sum(1 for _ in bpfsys.map_keys(self.fd, self.key_size))

    def percpu_sum(self, key):
        """Sum of a per-CPU u64 value over all CPUs."""
        raw = self.lookup_raw(key)
        if raw is None:
            return 0
        stride = ((self.value_size + 7) // 8) * 8
        return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), stride))


class Maps:
    """All of meshbpf's maps under `<pin_prefix>/maps`, opened lazily by name."""

    def __init__(self, pin_prefix):
        self.dir = os.path.join(pin_prefix, "maps")
        self._open = {}

    def path(self, name):
        return os.path.join(self.dir, name)

    def exists(self, name):
        return os.path.exists(self.path(name))

    def __getitem__(self, name):
        if name not in self._open:
            kt, vt = MAP_TYPES.get(name, (None, None))
            self._open[name] = PinnedMap(self.path(name), kt, vt, percpu=name in PERCPU)
        return self._open[name]

    def fd(self, name):
        return self[name].fd

    def close(self):
        for m in self._open.values():
            m.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def counters(self):
        """{counter name: total over CPUs} for every named counter index."""
        m = self["counters"]
        return {name: m.percpu_sum(structs.U32(i)) for i, name in enumerate(structs.COUNTERS)}
