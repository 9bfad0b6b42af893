"""What a pinned program set is: its version and its maps' layouts. Pure.

The version and the map layouts live in a pinned one-entry array map "meta" at
<pin prefix>/meta, not in the node record (/run/meshbpf/<instance>/node.json): it is
created, adopted and removed with the pins themselves (unload removes it with the rest),
so whoever finds the pins finds their version, whatever instance directory, and a lost
or stale /run file can never pass an old program set for a new one. Reading and writing
it is meshbpf.ebpf.loader's (read_meta, write_meta); replacing programs of another
version is meshbpf.ebpf.upgrade's.
"""

import hashlib
import json
import sys

from .. import __version__, bpfsys
from ..errors import ApplyError

META_PIN = "meta"
META_VALUE_SIZE = 16384          # a JSON document, preceded by its length (u32)


def program_set_version(text, flags, version=__version__):
    """Pure: the version of a program set: a hash of the rendered C, its cflags and
    meshbpf's version. Any change to one of them is another program set."""
    doc = json.dumps({"meshbpf": version, "cflags": list(flags), "source": text},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def map_fingerprint(info, key_desc=None, leaf_desc=None):
    """Pure: a map's layout: what the kernel fixes at creation (type, key and value size,
    max_entries, flags) and, when known, a hash of the key and value C types (bcc's type
    descriptions): two maps with the same fingerprint can be used by either program set."""
    fp = {k: int(info[k]) for k in ("type", "key_size", "value_size", "max_entries", "flags")}
    if key_desc is not None or leaf_desc is not None:
        fp["layout"] = hashlib.sha256(f"{key_desc}\0{leaf_desc}".encode()).hexdigest()[:16]
    return fp


_WHY = {
    "type": "the map type cannot change in place",
    "key_size": "the kernel refuses programs using other key sizes and the old entries "
                "would be misread",
    "value_size": "the old entries would be misread",
    "flags": "map flags are fixed when a map is created",
    "layout": "its key or value C struct changed, so the old entries would be read with "
              "the new layout",
}


def compare_layouts(pinned_maps, new_maps):
    """Pure: why the maps pinned now cannot serve the new programs: [(map, reason)].

    `pinned_maps`/`new_maps`: {name: fingerprint}. A map only the new set has is created;
    one only the pinned set has stays pinned, unused, until cleanup; one in both must have
    the same fingerprint (fields only one side knows, e.g. `layout` of a set pinned before
    versions existed, are not compared). A grown max_entries is refused too: a BPF map
    cannot be resized, and copying it into a bigger one while the old programs keep
    writing would lose entries (connections in flight would lose their original
    destination, and sockets in a sockhash cannot be copied from user space)."""
    out = []
    for name in sorted(set(pinned_maps) & set(new_maps)):
        old, new = pinned_maps[name], new_maps[name]
        for field in ("type", "key_size", "value_size", "max_entries", "flags", "layout"):
            if field not in old or field not in new or old[field] == new[field]:
                continue
            if field == "max_entries":
                why = (f"max_entries {old[field]} -> {new[field]}: a BPF map cannot be "
                       "resized, and a copy would lose what the running programs write "
                       "meanwhile (connections in flight, sockhash sockets)")
            elif field == "layout":
                why = _WHY[field]
            else:
                why = f"{field} {old[field]} -> {new[field]}: {_WHY[field]}"
            out.append((name, why))
    return out


def encode_meta(meta):
    """Pure: the meta map's value for `meta` (a JSON-able dict)."""
    doc = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(doc) + 4 > META_VALUE_SIZE:
        raise ApplyError(f"the program set's description ({len(doc)} bytes) does not fit "
                         f"the meta map ({META_VALUE_SIZE - 4} bytes)")
    return len(doc).to_bytes(4, sys.byteorder) + doc + bytes(META_VALUE_SIZE - 4 - len(doc))


def decode_meta(raw):
    """Pure: the dict `encode_meta` wrote, or {} for anything else."""
    if not raw or len(raw) < 4:
        return {}
    n = int.from_bytes(raw[:4], sys.byteorder)
    try:
        meta = json.loads(raw[4:4 + n].decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def patch_map_fds(code, fdmap):
    """Pure: `code` (BPF instructions) with every map reference (ld_imm64 with
    BPF_PSEUDO_MAP_FD) to an fd in `fdmap` pointing at fdmap[fd] instead; returns
    (new code, how many were changed)."""
    out = bytearray(code)
    n, i = 0, 0
    while i + 8 <= len(out):
        if out[i] == bpfsys.BPF_LD_IMM64 and i + 16 <= len(out):
            if out[i + 1] >> 4 == bpfsys.BPF_PSEUDO_MAP_FD:
                imm = int.from_bytes(out[i + 4:i + 8], sys.byteorder, signed=True)
                if imm in fdmap:
                    out[i + 4:i + 8] = int(fdmap[imm]).to_bytes(4, sys.byteorder, signed=True)
                    n += 1
            i += 16            # ld_imm64 takes two instruction slots
        else:
            i += 8
    return bytes(out), n
