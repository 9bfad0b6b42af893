"""Member offsets of kernel structs, read from the running kernel's BTF (pure parsing).

bcc compiles meshbpf's programs against whatever kernel headers are installed, which may be
another kernel's (see DESIGN.md), so a struct's layout there can differ from the running
kernel's. The splice reads two `struct tcp_sock` fields through `bpf_skc_to_tcp_sock`, and
the verifier checks such loads against the running kernel's BTF: the offsets come from the
same place (/sys/kernel/btf/vmlinux).
"""

import struct

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# kind -> bytes that follow struct btf_type, as (fixed, per vlen entry)
_KIND_EXTRA = {
    1: (4, 0),    # INT
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY
    4: (0, 12),   # STRUCT
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO
    14: (4, 0),   # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64
}
KIND_STRUCT = 4


class BtfError(Exception):
    pass


def struct_members(data, struct_name):
    """{member name: byte offset} of the first STRUCT named `struct_name` in a raw BTF
    blob (bitfields are skipped). Raises BtfError if the blob is not BTF or has no such
    struct."""
    if len(data) < 24:
        raise BtfError("not BTF: too short")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BtfError("not BTF: bad magic")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = data[hdr_len + type_off:hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off:hdr_len + str_off + str_len]

    def name(off):
        end = strings.find(b"\0", off)
        return strings[off:end].decode()

    want = struct_name.encode()
    pos = 0
    while pos + 12 <= len(types):
        name_off, info, _size = struct.unpack_from("<III", types, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        if kind not in _KIND_EXTRA:
            raise BtfError(f"unknown BTF kind {kind}")
        fixed, per = _KIND_EXTRA[kind]
        body = pos + 12
        if kind == KIND_STRUCT and strings[name_off:name_off + len(want) + 1] == want + b"\0":
            out = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", types, body + i * 12)
                bits = m_off & 0xFFFFFF if kflag else m_off
                bitfield = kflag and (m_off >> 24)
                if not bitfield and bits % 8 == 0 and m_name:
                    out[name(m_name)] = bits // 8
            return out
        pos = body + fixed + per * vlen
    raise BtfError(f"no struct {struct_name} in BTF")


def tcp_sock_offsets(path=VMLINUX):
    """Byte offsets of tcp_sock.copied_seq and .write_seq in the running kernel."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BtfError(f"cannot read kernel BTF {path}: {e.strerror}")
    members = struct_members(data, "tcp_sock")
    try:
        return {"copied_seq": members["copied_seq"], "write_seq": members["write_seq"]}
    except KeyError as e:
        raise BtfError(f"struct tcp_sock has no {e.args[0]} in this kernel's BTF")


def netns_offsets(path=VMLINUX):
    """Byte offsets of a socket's `struct net *` (sock_common.skc_net, at the start of every
    socket struct) and of struct net's inode number (net.ns + ns_common.inum)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BtfError(f"cannot read kernel BTF {path}: {e.strerror}")
    try:
        skc_net = struct_members(data, "sock_common")["skc_net"]
        inum = struct_members(data, "net")["ns"] + struct_members(data, "ns_common")["inum"]
    except KeyError as e:
        raise BtfError(f"no {e.args[0]} in this kernel's BTF")
    return {"skc_net": skc_net, "inum": inum}
