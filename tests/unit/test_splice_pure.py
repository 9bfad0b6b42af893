"""Pure parts of the splice's backpressure: BTF member offsets, the TCP memory reading, and
the throughput/soak targets and report."""

import struct

import pytest

from meshbpf.bench import report, tcpmem
from meshbpf.ebpf import btf, loader


def _btf_blob(structs_):
    """A minimal BTF blob: an INT type and STRUCTs [(name, [(member, bit_offset), ...])]."""
    strings = b"\0"
    offs = {}

    def s(name):
        nonlocal strings
        if name not in offs:
            offs[name] = len(strings)
            strings += name.encode() + b"\0"
        return offs[name]

    types = struct.pack("<IIII", s("int"), 1 << 24, 4, 32)            # INT, 4 bytes
    for name, members in structs_:
        types += struct.pack("<III", s(name), (4 << 24) | len(members), 64)
        for m, bits in members:
            types += struct.pack("<III", s(m), 1, bits)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_struct_members_finds_byte_offsets_of_the_named_struct():
    blob = _btf_blob([("sock", [("x", 0)]),
                      ("tcp_sock", [("inet_conn", 0), ("copied_seq", 11712), ("write_seq", 12608)])])
    assert btf.struct_members(blob, "tcp_sock") == {"inet_conn": 0, "copied_seq": 1464,
                                                   "write_seq": 1576}
    assert btf.struct_members(blob, "sock") == {"x": 0}


def test_struct_members_rejects_what_is_not_btf_or_lacks_the_struct():
    with pytest.raises(btf.BtfError):
        btf.struct_members(b"\0" * 64, "tcp_sock")
    with pytest.raises(btf.BtfError):
        btf.struct_members(_btf_blob([("sock", [("x", 0)])]), "tcp_sock")


def test_tcp_sock_offsets_name_the_missing_field(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(_btf_blob([("tcp_sock", [("copied_seq", 64)])]))
    with pytest.raises(btf.BtfError, match="write_seq"):
        btf.tcp_sock_offsets(str(p))
    with pytest.raises(btf.BtfError, match="cannot read"):
        btf.tcp_sock_offsets(str(tmp_path / "absent"))


def test_splice_defines_come_from_btf_and_a_kernel_without_it_is_a_clear_error(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(_btf_blob([("tcp_sock", [("copied_seq", 64), ("write_seq", 96)])]))
    assert loader.splice_defines(str(p)) == ["-DMB_TCP_COPIED_SEQ_OFF=8",
                                             "-DMB_TCP_WRITE_SEQ_OFF=12"]
    from meshbpf.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="--no-splice|BTF"):
        loader.splice_defines(str(tmp_path / "absent"))


def test_sk_msg_is_compiled_only_with_splicing():
    assert "int mb_sk_msg(" not in loader.render_source(splice=False)


def test_parse_tcp_mem():
    text = ("sockets: used 120\nTCP: inuse 7 orphan 0 tw 2 alloc 9 mem 381675\n"
            "UDP: inuse 1 mem 2\n")
    assert tcpmem.parse_tcp_mem(text) == 381675
    with pytest.raises(ValueError):
        tcpmem.parse_tcp_mem("UDP: inuse 1 mem 2\n")


def test_peak_sampler_keeps_the_highest_reading_above_the_baseline():
    values = iter([100, 150, 400, 120] + [120] * 1000)
    with tcpmem.PeakSampler(interval=0.001, read=lambda: next(values)) as s:
        while s.samples < 4:
            pass
    assert s.baseline == 100 and s.peak == 400 and s.rise == 300


def _tput(ipt, ebpf):
    return {"kind": "throughput", "seconds": 10, "runs": 3, "modes": {"iptables": ipt, "ebpf": ebpf}}


def _mode(completed, gbps, pages, runs=3):
    return {"runs": runs, "completed": completed, "gbps": gbps, "gbps_min": gbps,
            "gbps_max": gbps, "peak_tcp_pages": pages, "errors": []}


def test_throughput_targets_report_met_and_missed():
    t = {x["name"]: x for x in report.throughput_targets(
        _tput(_mode(3, 8.0, 8000), _mode(3, 21.0, 15000)))}
    assert t["every transfer completes"]["met"] is True
    assert t["ebpf peak TCP memory at most 2x iptables"]["met"] is True
    assert t["ebpf throughput at least 2.5x iptables"]["met"] is True
    t = {x["name"]: x for x in report.throughput_targets(
        _tput(_mode(3, 8.0, 8000), _mode(0, None, 380000)))}
    assert t["every transfer completes"]["met"] is False
    assert t["ebpf peak TCP memory at most 2x iptables"]["met"] is False
    assert t["ebpf throughput at least 2.5x iptables"]["met"] is None


def test_throughput_and_soak_text_show_every_mode_and_target():
    r = _tput(_mode(3, 8.0, 8000), _mode(3, 9.6, 11000))
    r["targets"] = report.throughput_targets(r)
    text = report.throughput_text(r)
    assert "iptables" in text and "ebpf" in text and "1.20x" in text
    assert "target: ebpf throughput at least 2.5x iptables: MISSED" in text
    soak = {"kind": "soak", "seconds": 60, "flows": 4, "modes": {
        "iptables": {"flows": 4, "gbps": 8, "rr_p99_us": 90, "peak_tcp_pages": 9000, "errors": []},
        "ebpf": {"flows": 4, "gbps": 9, "rr_p99_us": 80, "peak_tcp_pages": 30000,
                 "errors": ["bulk: iperf3 failed: unable to write"]}}}
    soak["targets"] = report.soak_targets(soak)
    text = report.throughput_text(soak)
    assert "target: every flow completes without error: MISSED" in text
    assert "target: ebpf peak TCP memory at most 2x iptables: MISSED" in text
