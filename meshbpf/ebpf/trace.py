"""`meshbpf trace`: follow the data path's interception decisions as they happen.

The connect hooks write one event per decision (bpf/lib/trace.h) into the pinned BPF ring
buffer `trace_events`, and the inbound tc program one per inbound connection (its first
SYN), but only while the pinned gate `trace_on[0]` is 1: this command sets it while it runs
and clears it when it exits (also on Ctrl-C and SIGTERM), so nobody following costs one
array lookup per decision.

One follower at a time per pin prefix: the ring buffer has one consumer position and the
gate one value, so a second reader would take half the events and the first to exit would
turn tracing off for the other. A follower holds an exclusive flock on the pinned maps
directory (released by the kernel however it exits, SIGKILL included); a second one is
refused with FollowerBusyError.

The ring buffer is read without bcc, from its pin (RingReader): the kernel maps a ring
buffer map as one consumer page (read-write, offset 0: consumer_pos) and, from offset
pagesize, one producer page (producer_pos) followed by the data area mapped twice in a
row, so a record that wraps around the end reads as one piece. Each record has an 8-byte
header (u32 length with the BUSY and DISCARD bits, u32 page offset) and is padded to 8
bytes. The walk over records (walk_records), the decoding (decode_event) and the rendering
(format_text) are pure and unit-tested on fake buffers.
"""

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import mmap
import os
import select
import signal
import struct
import sys
import time

import click

from .. import bpfsys
from ..errors import MeshbpfError, NotFoundError, UnsupportedError, UsageError
from ..interceptor import DEFAULT_PIN_PREFIX
from . import structs

EVENTS_MAP = "trace_events"
GATE_MAP = "trace_on"

RINGBUF_BUSY_BIT = 1 << 31       # the producer has reserved the record, not committed it
RINGBUF_DISCARD_BIT = 1 << 30    # committed as discarded: skip it
RINGBUF_HDR_SZ = 8


class FollowerBusyError(MeshbpfError):
    """Another `meshbpf trace` already follows this pin prefix."""


# ---- pure ------------------------------------------------------------------------------

def walk_records(data, size, consumer_pos, producer_pos):
    """The committed records between `consumer_pos` and `producer_pos`: (payloads, the new
    consumer position). `data`: the data area as mapped (twice in a row, so 2 * `size`
    bytes; a record may run past `size`), `size` a power of two. Stops at the first record
    still BUSY (the producer is writing it; the next call reads it), skips DISCARDed ones."""
    out = []
    mask = size - 1
    pos = consumer_pos
    while pos < producer_pos:
        off = pos & mask
        hdr = int.from_bytes(bytes(data[off:off + 4]), sys.byteorder)
        if hdr & RINGBUF_BUSY_BIT:
            break
        length = hdr & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)
        if not hdr & RINGBUF_DISCARD_BIT:
            start = off + RINGBUF_HDR_SZ
            out.append(bytes(data[start:start + length]))
        pos += (length + RINGBUF_HDR_SZ + 7) & ~7
    return out, pos


def decode_event(raw, pods=None):
    """A trace record -> dict. `pods`: {netns cookie: (pod id, name)} (missing: unknown)."""
    if len(raw) < ctypes.sizeof(structs.TraceEvent):
        raise ValueError(f"trace record of {len(raw)} bytes, expected "
                         f"{ctypes.sizeof(structs.TraceEvent)}")
    ev = structs.TraceEvent.from_buffer_copy(raw[:ctypes.sizeof(structs.TraceEvent)])
    ip = structs.ip_from16(bytes(ev.ip))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = structs.ntohs(ev.port)
    pod_id, name = (pods or {}).get(ev.netns, (None, None))
    rule_name, rule_text = structs.TRACE_RULES.get(ev.rule, (f"rule_{ev.rule}", "unknown rule"))
    # an inbound decision is made in softirq (tc), on no task of the pod: no uid/gid
    inbound = ev.direction == structs.MB_TRACE_IN
    return {
        "time_ns": ev.time_ns,
        "netns_cookie": ev.netns,
        "pod_index": ev.pod_index,
        "pod_id": pod_id,
        "pod": name or pod_id,
        "direction": structs.TRACE_DIRECTIONS.get(ev.direction, str(ev.direction)),
        "protocol": {6: "tcp", 17: "udp"}.get(ev.proto, str(ev.proto)),
        "destination": f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}",
        "dst_ip": str(ip),
        "dst_port": port,
        "verdict": structs.TRACE_VERDICTS.get(ev.verdict, str(ev.verdict)),
        "rule": rule_name,
        "rule_detail": rule_text,
        "to_port": structs.ntohs(ev.to_port) or None,
        "uid": None if inbound else ev.uid,
        "gid": None if inbound else ev.gid,
    }


def format_text(e):
    """One line for a decoded event."""
    pod = e["pod"] or f"netns:{e['netns_cookie']}"
    what = f"-> :{e['to_port']}" if e["verdict"] == "redirected" else ""
    ids = f" uid={e['uid']} gid={e['gid']}" if e["uid"] is not None else ""
    return (f"{pod} {e['direction']} {e['protocol']} {e['destination']} {e['verdict']}"
            f"{' ' + what if what else ''} rule={e['rule']} ({e['rule_detail']}){ids}")


def matches(e, pod=None, pod_id=None):
    """Does event `e` belong to the pod asked for (no filter: every event)?"""
    if pod is not None and e["pod"] != pod and e["pod_id"] != pod:
        return False
    if pod_id is not None and e["pod_id"] != pod_id:
        return False
    return True


# ---- side effects: the pinned ring buffer and gate -----------------------------------------

class RingReader:
    """The pinned ring buffer, mapped read-only but for consumer_pos; epoll for wakeups."""

    def __init__(self, path):
        try:
            self.fd = bpfsys.obj_get(path)
        except OSError as e:
            raise NotFoundError(f"pinned map {path} cannot be opened: {os.strerror(e.errno)}")
        self.cons = self.prod = self.epoll = None
        try:
            info = bpfsys.map_get_info(self.fd)
            if info["type"] != bpfsys.BPF_MAP_TYPE_RINGBUF:
                raise UnsupportedError(f"{path} is not a ring buffer (map type {info['type']})")
            self.size = info["max_entries"]
            page = mmap.PAGESIZE
            self.cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self.prod = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ, offset=page)
            self.data = memoryview(self.prod)[page:]
            self.epoll = select.epoll()
            self.epoll.register(self.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def positions(self):
        """(consumer_pos, producer_pos)."""
        return (struct.unpack_from("=Q", self.cons, 0)[0],
                struct.unpack_from("=Q", self.prod, 0)[0])

    def skip_to_end(self):
        """Drop what is queued (written before this follower started)."""
        struct.pack_into("=Q", self.cons, 0, self.positions()[1])

    def poll(self, timeout):
        """Payloads committed so far, waiting up to `timeout` seconds for the first."""
        cons, prod = self.positions()
        if cons >= prod:
            self.epoll.poll(max(timeout, 0))
            cons, prod = self.positions()
        records, new = walk_records(self.data, self.size, cons, prod)
        if new != cons:
            struct.pack_into("=Q", self.cons, 0, new)
        return records

    def close(self):
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None
        if self.prod is not None:
            with contextlib.suppress(BufferError):
                self.data.release()
            self.prod.close()
            self.prod = None
        if self.cons is not None:
            self.cons.close()
            self.cons = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def claim_follower(pin_prefix):
    """An fd holding the exclusive follower lock of `pin_prefix` (close it to release);
    FollowerBusyError if another follower holds it."""
    maps = os.path.join(pin_prefix, "maps")
    fd = os.open(maps, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FollowerBusyError(f"another `meshbpf trace` already follows {pin_prefix}: one "
                                "follower at a time (the ring buffer has one reader)",
                                hint="stop it, or read its output")
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_gate(pin_prefix, on):
    """Set trace_on[0] (1 while somebody follows, 0 otherwise)."""
    fd = bpfsys.obj_get(os.path.join(pin_prefix, "maps", GATE_MAP))
    try:
        bpfsys.map_update_elem(fd, structs.u32_bytes(0), structs.u32_bytes(1 if on else 0))
    finally:
        os.close(fd)


def read_gate(pin_prefix):
    fd = bpfsys.obj_get(os.path.join(pin_prefix, "maps", GATE_MAP))
    try:
        return int.from_bytes(bpfsys.map_lookup_elem(fd, structs.u32_bytes(0), 4), sys.byteorder)
    finally:
        os.close(fd)


def check_traceable(pin_prefix):
    """UnsupportedError unless the node runs eBPF mode with the trace maps pinned."""
    from . import loader
    if not loader.is_loaded(pin_prefix):
        raise UnsupportedError(f"meshbpf's eBPF programs are not loaded under {pin_prefix}: "
                               "`meshbpf trace` follows the eBPF data path only",
                               hint="attach a pod in eBPF mode first; iptables mode has no "
                                    "decision events (use its rule counters)")
    maps = os.path.join(pin_prefix, "maps")
    if not all(os.path.exists(os.path.join(maps, m)) for m in (EVENTS_MAP, GATE_MAP)):
        raise UnsupportedError("the pinned eBPF programs have no trace ring buffer: the "
                               "kernel lacks BPF ring buffers (Linux 5.8), or they were "
                               "loaded by a meshbpf without `trace`",
                               hint="see `meshbpf probe` (ringbuf); on a 5.8+ kernel, "
                                    "re-attach with the upgrade option or `meshbpf cleanup`")


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stop()


def follow(pin_prefix, emit, pod=None, pod_id=None, count=None, timeout=None, names=None):
    """Set the gate, call `emit(event dict)` for each matching decision until `count`
    events or `timeout` seconds, clear the gate (whatever ends it). Returns events emitted.
    `names(cookie)` -> (pod id, name) or (None, None)."""
    check_traceable(pin_prefix)
    lock = claim_follower(pin_prefix)
    try:
        reader = RingReader(os.path.join(pin_prefix, "maps", EVENTS_MAP))
    except BaseException:
        os.close(lock)
        raise
    cache = {}

    def pods_of(cookie):
        if cookie not in cache:
            cache[cookie] = names(cookie) if names else (None, None)
        return {cookie: cache[cookie]}

    n = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        reader.skip_to_end()
        set_gate(pin_prefix, True)
        while count is None or n < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            for raw in reader.poll(wait):
                ev = structs.TraceEvent.from_buffer_copy(
                    raw[:ctypes.sizeof(structs.TraceEvent)])
                e = decode_event(raw, pods_of(ev.netns))
                if not matches(e, pod, pod_id):
                    continue
                emit(e)
                n += 1
                if count is not None and n >= count:
                    break
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        with contextlib.suppress(OSError):
            set_gate(pin_prefix, False)
        signal.signal(signal.SIGTERM, old_term)
        reader.close()
        os.close(lock)
    return n


@click.command("trace")
@click.option("--pod", "pod", default=None, help="Only this pod (its name or id).")
@click.option("--id", "pod_id", default=None, help="Only the pod with this id.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text, or one JSON object per line.")
@click.option("--count", type=int, default=None, help="Stop after N decisions.")
@click.option("--timeout", type=float, default=None, help="Stop after S seconds.")
@click.option("--pin-prefix", default=DEFAULT_PIN_PREFIX, show_default=True,
              envvar="MESHBPF_PIN_PREFIX",
              help="bpffs directory of meshbpf's pinned programs and maps.")
def trace_command(pod, pod_id, output, count, timeout, pin_prefix):
    """Follow interception decisions as they happen: one line per connection (pod,
    direction, original destination, verdict and the rule that decided), outbound
    (connect) and inbound (the connection's first SYN, at the pod's interface).

    Costs nothing while nobody follows: the data path writes events only while this runs.
    One follower at a time per pin prefix: a second `meshbpf trace` is refused.

    \b
    Examples:
      meshbpf trace --pod web
      meshbpf trace -o json --count 10
    """
    if count is not None and count < 1:
        raise UsageError("--count must be at least 1")
    if timeout is not None and timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    # the command, not the data path, knows the pods: their records name the cookies
    from ..service import NodeService
    store = NodeService(pin_prefix=pin_prefix).store

    def names(cookie):
        pid = store.id_of_cookie(cookie)
        rec = store.load(pid) if pid else None
        return pid, (rec or {}).get("name")

    def emit(e):
        click.echo(json.dumps(e, sort_keys=True) if output == "json" else format_text(e))
        sys.stdout.flush()

    follow(pin_prefix, emit, pod=pod, pod_id=pod_id, count=count, timeout=timeout,
           names=names)
