"""The agent's cheap tc filter check, pure part: the RTM_GETTFILTER dump request and the
parsing of its answer (filters, chain heads, done, errors), on hand-made netlink bytes."""

import errno
import socket
import struct

from meshbpf.agent import kernel
from meshbpf.ebpf.inbound import tc


def _nla(typ, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, typ) + payload + b"\0" * (kernel._align(n) - n)


def _msg(typ, seq, body):
    return struct.pack("=IHHII", 16 + len(body), typ, 2, seq, 0) + body + \
        b"\0" * (kernel._align(16 + len(body)) - 16 - len(body))


def _filter(seq, ifindex, prio, kind=b"bpf\0", name=None, prog_id=None, options=True):
    body = struct.pack("=BxxxiIII", 0, ifindex, 1, tc.TC_INGRESS_PARENT, (prio << 16) | 0x0300)
    body += _nla(kernel.TCA_KIND, kind)
    if options:
        opts = b""
        if name is not None:
            opts += _nla(kernel.TCA_BPF_NAME, name.encode() + b"\0")
        if prog_id is not None:
            opts += _nla(kernel.TCA_BPF_ID, struct.pack("=I", prog_id))
        body += _nla(kernel.TCA_OPTIONS | 0x8000, opts)        # NLA_F_NESTED set
    return _msg(kernel.RTM_NEWTFILTER, seq, body)


def test_request_is_a_filter_dump_of_one_interface_and_parent():
    req = kernel.filter_dump_request(7, tc.TC_INGRESS_PARENT, 3)
    length, typ, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, typ, seq, pid) == (len(req), kernel.RTM_GETTFILTER, 3, 0)
    assert flags == kernel.NLM_F_REQUEST | kernel.NLM_F_DUMP
    fam, ifindex, handle, parent, info = struct.unpack_from("=BxxxiIII", req, 16)
    assert (fam, ifindex, handle, parent, info) == (socket.AF_UNSPEC, 7, 0,
                                                    tc.TC_INGRESS_PARENT, 0)


def test_ours_is_recognised_and_chain_heads_and_others_are_not():
    data = (_filter(5, 2, tc.TC_PRIO, options=False) +               # chain head
            _filter(5, 2, tc.TC_PRIO, name=f"{tc.TC_NAME}:[42]", prog_id=42) +
            _filter(5, 2, 1, name="cilium", prog_id=9) +                # another's filter
            _filter(5, 2, tc.TC_PRIO, kind=b"u32\0") +
            _filter(4, 2, tc.TC_PRIO, name=tc.TC_NAME, prog_id=1))      # an older request's
    got, done, err = kernel.parse_filters(data, 5)
    assert not done and err == 0
    assert [(f["kind"], f["prio"], f["ours"]) for f in got] == \
        [("bpf", tc.TC_PRIO, True), ("bpf", 1, False), ("u32", tc.TC_PRIO, False)]
    assert got[0]["prog_id"] == 42 and got[0]["name"] == f"{tc.TC_NAME}:[42]"
    assert got[0]["ifindex"] == 2


def test_done_and_errors_end_the_dump():
    got, done, err = kernel.parse_filters(_msg(kernel.NLMSG_DONE, 1, struct.pack("=i", 0)), 1)
    assert (got, done, err) == ([], True, 0)
    enodev = _msg(kernel.NLMSG_ERROR, 1, struct.pack("=i", -errno.ENODEV) + b"\0" * 16)
    assert kernel.parse_filters(enodev, 1) == ([], True, errno.ENODEV)
    # a truncated message does not raise
    assert kernel.parse_filters(b"\x10\0\0", 1) == ([], False, 0)
