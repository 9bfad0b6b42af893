"""meshbpf/ebpf/trace.py's pure parts: walking ring buffer records, decoding trace events,
rendering them; and the loader's ringbuf gate. No root, no bcc: fake buffers laid out as
the kernel lays out a BPF ring buffer's data area (mapped twice in a row)."""

import ctypes
import json
import socket
import sys

from meshbpf.ebpf import loader, structs, trace
from meshbpf.probe import features

SIZE = 64                     # a tiny data area (power of two)


def record(payload, busy=False, discard=False):
    hdr = len(payload) | (trace.RINGBUF_BUSY_BIT if busy else 0) | \
        (trace.RINGBUF_DISCARD_BIT if discard else 0)
    body = hdr.to_bytes(4, sys.byteorder) + bytes(4) + payload
    return body + bytes(-len(body) % 8)


def ring(start, records, size=SIZE):
    """A data area (mapped twice, as the kernel does) holding `records` from position
    `start`; returns (data, producer position)."""
    area = bytearray(size)
    pos = start
    for r in records:
        for i, b in enumerate(r):
            area[(pos + i) % size] = b
        pos += len(r)
    return bytes(area) * 2, pos


def test_walk_reads_committed_records_and_advances_past_padding():
    data, prod = ring(0, [record(b"abc"), record(b"0123456789")])
    out, cons = trace.walk_records(data, SIZE, 0, prod)
    assert out == [b"abc", b"0123456789"]
    assert cons == prod == 16 + 24


def test_walk_stops_at_a_busy_record_and_skips_discarded_ones():
    data, prod = ring(8, [record(b"x" * 5, discard=True), record(b"yy"),
                          record(b"zzz", busy=True), record(b"later")])
    out, cons = trace.walk_records(data, SIZE, 8, prod)
    assert out == [b"yy"]
    assert cons == 8 + 16 + 16     # at the busy one: the next poll reads it


def test_walk_reads_a_record_that_wraps_around_the_end():
    start = 3 * SIZE + 48          # positions grow forever; the offset is pos & (size-1)
    data, prod = ring(start, [record(b"W" * 20)])
    out, cons = trace.walk_records(data, SIZE, start, prod)
    assert out == [b"W" * 20] and cons == start + 32


def test_walk_with_nothing_new():
    data, _ = ring(0, [])
    assert trace.walk_records(data, SIZE, 40, 40) == ([], 40)


def event(**kw):
    ev = structs.TraceEvent()
    ev.netns = kw.get("netns", 4242)
    ev.time_ns = 7
    ev.pod_index = 3
    ev.uid, ev.gid = kw.get("uid", 1000), 1000
    ip = structs.ip16(kw.get("ip", "10.1.2.3"))
    ctypes.memmove(ev.ip, ip, 16)
    ev.port = socket.htons(kw.get("port", 80))
    ev.family = structs.MB_AF_INET6 if ":" in kw.get("ip", "") else structs.MB_AF_INET
    ev.to_port = socket.htons(kw.get("to_port", 0))
    ev.direction = kw.get("direction", structs.MB_TRACE_OUT)
    ev.verdict = kw.get("verdict", structs.MB_TRACE_REDIRECTED)
    ev.rule = kw.get("rule", 12)
    ev.proto = 6
    return bytes(ev)


def test_decode_a_redirected_ipv4_connect():
    e = trace.decode_event(event(to_port=15001), {4242: ("pod-a-id", "pod-a")})
    assert e["pod"] == "pod-a" and e["pod_id"] == "pod-a-id"
    assert (e["destination"], e["dst_ip"], e["dst_port"]) == ("10.1.2.3:80", "10.1.2.3", 80)
    assert (e["verdict"], e["rule"], e["to_port"]) == ("redirected", "include_all", 15001)
    assert (e["direction"], e["protocol"], e["uid"]) == ("out", "tcp", 1000)
    json.dumps(e)                  # -o json prints it as is


def test_decode_an_excluded_ipv6_connect_of_an_unknown_pod():
    e = trace.decode_event(event(ip="fd00::5", port=8080, verdict=structs.MB_TRACE_BYPASSED,
                                 rule=9))
    assert e["destination"] == "[fd00::5]:8080"
    assert (e["verdict"], e["rule"], e["to_port"], e["pod"]) == \
        ("bypassed", "excluded_cidr", None, None)


def test_decode_refuses_a_short_record():
    import pytest
    with pytest.raises(ValueError):
        trace.decode_event(b"\0" * 10)


def test_format_text_names_pod_destination_verdict_and_rule():
    line = trace.format_text(trace.decode_event(event(to_port=15001), {4242: ("i", "web")}))
    assert line.startswith("web out tcp 10.1.2.3:80 redirected -> :15001 rule=include_all")
    line = trace.format_text(trace.decode_event(
        event(port=9000, verdict=structs.MB_TRACE_BYPASSED, rule=1)))
    assert line.startswith("netns:4242 out tcp 10.1.2.3:9000 bypassed rule=excluded_port")


def test_decode_and_format_inbound_decisions_without_ids():
    """tc decides inbound in softirq: the uid/gid fields mean nothing there, so they are
    not shown; the rule names are the inbound ones of lib/inbound.h."""
    pods = {4242: ("i", "web")}
    e = trace.decode_event(event(direction=structs.MB_TRACE_IN, port=8080, to_port=15006,
                                 rule=19, uid=0), pods)
    assert (e["direction"], e["destination"], e["verdict"], e["rule"], e["to_port"]) == \
        ("in", "10.1.2.3:8080", "redirected", "in_include_all", 15006)
    assert e["uid"] is None and e["gid"] is None
    assert trace.format_text(e) == ("web in tcp 10.1.2.3:8080 redirected -> :15006 "
                                    "rule=in_include_all (inbound_ports_include '*')")
    e = trace.decode_event(event(direction=structs.MB_TRACE_IN, port=22,
                                 verdict=structs.MB_TRACE_BYPASSED, rule=20), pods)
    assert (e["verdict"], e["rule"], e["to_port"]) == ("bypassed", "in_excluded_port", None)
    e = trace.decode_event(event(direction=structs.MB_TRACE_IN, port=9090,
                                 verdict=structs.MB_TRACE_DROPPED, rule=23), pods)
    assert trace.format_text(e).startswith("web in tcp 10.1.2.3:9090 dropped rule=no_listener")
    assert [structs.TRACE_RULES[r][0] for r in (18, 21, 22)] == \
        ["in_included_port", "in_not_included", "not_meshed"]


def test_matches_filters_by_name_or_id():
    e = trace.decode_event(event(), {4242: ("uid-1", "web")})
    assert trace.matches(e) and trace.matches(e, pod="web") and trace.matches(e, pod="uid-1")
    assert trace.matches(e, pod_id="uid-1")
    assert not trace.matches(e, pod="db") and not trace.matches(e, pod_id="web")


def test_ringbuf_is_a_degrading_feature_of_5_8_and_gates_the_c():
    f = features.BY_NAME["ringbuf"]
    assert (f.mainline, f.role) == ((5, 8), features.DEGRADES)
    assert "-DMB_NO_RINGBUF" in loader.cflags({"ringbuf": False})
    assert "-DMB_NO_RINGBUF" not in loader.cflags({"ringbuf": True})
    old = loader.render_source({"ringbuf": False}, splice=False)
    assert "#define MB_NO_RINGBUF 1" in old
