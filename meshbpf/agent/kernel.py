"""The agent's drift check of one pod, cheaply: its netns cookie and meshbpf's tc filters
on the interfaces its record hooked, in ONE visit of its network namespace.

`tc.list_hooks` (what `status` shows) runs `tc -j filter show` twice per interface and
opens a pyroute2 session: over 5 ms a pod, a second for 200 pods, which is what made the
agent's drift check and restart slow. Here one raw rtnetlink socket asks for the filters
at clsact ingress of each hooked interface (RTM_GETTFILTER dump): tens of microseconds.
rtnetlink has no target-netns attribute for tc, so the socket is made inside the pod's
netns (the one netns entry per pod that remains).

Pure: `filter_dump_request` and `parse_filters` (bytes in, filters out). Side effects:
`filters_here` and `pod_facts`.
"""

import errno
import os
import socket
import struct

from .. import system
from ..ebpf.inbound import tc

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWTFILTER, RTM_GETTFILTER = 44, 46
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_ID = 7, 11          # include/uapi/linux/pkt_cls.h
NLA_TYPE_MASK = 0x3FFF                    # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSG = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BxxxiIII")       # family, ifindex, handle, parent, info
_NLA = struct.Struct("=HH")


def _align(n):
    return (n + 3) & ~3


def filter_dump_request(ifindex, parent, seq):
    """An RTM_GETTFILTER dump request for the filters of `ifindex` under `parent`."""
    body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
    return _NLMSG.pack(_NLMSG.size + len(body), RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP,
                       seq, 0) + body


def _attrs(data):
    out, off = {}, 0
    while off + _NLA.size <= len(data):
        length, typ = _NLA.unpack_from(data, off)
        if length < _NLA.size:
            break
        out.setdefault(typ & NLA_TYPE_MASK, data[off + _NLA.size: off + length])
        off += _align(length)
    return out


def parse_filters(data, seq):
    """(filters, done, error) from one recv of a dump answering request `seq`: filters as
    {ifindex, kind, prio, handle, name, prog_id, ours}; done when NLMSG_DONE or an error
    came; error the errno (0: none). Chain heads (no options) are not filters."""
    out, off, done, err = [], 0, False, 0
    while off + _NLMSG.size <= len(data):
        length, typ, _flags, mseq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            break
        body = data[off + _NLMSG.size: off + length]
        off += _align(length)
        if mseq != seq:
            continue
        if typ == NLMSG_DONE:
            done = True
        elif typ == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
            done = True
        elif typ == RTM_NEWTFILTER and len(body) >= _TCMSG.size:
            _fam, ifindex, handle, _parent, info = _TCMSG.unpack_from(body)
            attrs = _attrs(body[_TCMSG.size:])
            if TCA_OPTIONS not in attrs:
                continue
            kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode(errors="replace")
            opts = _attrs(attrs[TCA_OPTIONS]) if kind == "bpf" else {}
            name = opts.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
            prog = opts.get(TCA_BPF_ID)
            prio = (info >> 16) & 0xFFFF
            out.append({"ifindex": ifindex, "kind": kind, "prio": prio, "handle": handle,
                        "name": name,
                        "prog_id": struct.unpack("=I", prog[:4])[0] if prog and len(prog) >= 4
                        else None,
                        "ours": kind == "bpf" and prio == tc.TC_PRIO and name.startswith(tc.TC_NAME)})
    return out, done, err


def filters_here(ifindexes, parent=tc.TC_INGRESS_PARENT):
    """{ifindex: [filter]} at `parent` of each interface, in this thread's netns. An
    interface that is gone or has no clsact has none."""
    out = {}
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                      socket.NETLINK_ROUTE)
    try:
        s.bind((0, 0))
        for seq, ifindex in enumerate(ifindexes, 1):
            s.send(filter_dump_request(ifindex, parent, seq))
            found, done = [], False
            while not done:
                got, done, err = parse_filters(s.recv(65536), seq)
                found += got
                if err not in (0, errno.ENODEV, errno.EINVAL, errno.ENOENT):
                    raise OSError(err, f"tc filter dump on ifindex {ifindex}: {os.strerror(err)}")
            out[ifindex] = found
    finally:
        s.close()
    return out


def pod_facts(netns, ifindexes):
    """(netns cookie, {ifindex: has meshbpf's ingress filter}) of the netns at `netns`, in
    one visit of it."""
    with system.in_netns(netns):
        cookie = system.netns_cookie()
        found = filters_here(ifindexes) if ifindexes else {}
    return cookie, {i: any(f["ours"] for f in found.get(i, ())) for i in ifindexes}
