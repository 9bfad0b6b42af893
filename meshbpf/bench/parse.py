"""Turn the load tools' raw output into numbers: sockperf ping-pong text and iperf3 -J JSON.

Pure: text in, dicts out. A tool that failed (connection refused, no observations, an
iperf3 "error" field) raises BenchParseError with the tool's own words, because both
tools can exit 0 after failing.
"""

import json
import re

from ..errors import MeshbpfError, UsageError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PCT = re.compile(r"--->\s*percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")
_MAX = re.compile(r"--->\s*<MAX> observation\s*=\s*([0-9.]+)")
_MIN = re.compile(r"--->\s*<MIN> observation\s*=\s*([0-9.]+)")
_AVG = re.compile(r"====>\s*avg-(rtt|latency)=([0-9.]+)\s*\(std-dev=([0-9.]+)\)")
_OBS = re.compile(r"Total\s+(\d+)\s+observations")
_TOTAL = re.compile(r"\[Total Run\]\s*RunTime=([0-9.]+) sec;.*?SentMessages=(\d+);\s*ReceivedMessages=(\d+)")
_VALID = re.compile(r"\[Valid Duration\]\s*RunTime=([0-9.]+) sec;\s*SentMessages=(\d+);\s*ReceivedMessages=(\d+)")
_DROPS = re.compile(r"# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)")
_ERROR = re.compile(r"sockperf:\s*ERROR:\s*(.*)")

# Percentile keys the harness reports, and sockperf's spelling of them.
PERCENTILES = {"p25_us": 25.0, "p50_us": 50.0, "p75_us": 75.0, "p90_us": 90.0,
               "p99_us": 99.0, "p999_us": 99.9, "p9999_us": 99.99}


class BenchParseError(MeshbpfError):
    """A load tool failed or printed something the harness cannot read."""


def strip_ansi(text):
    return _ANSI.sub("", text)


def parse_sockperf(text):
    """sockperf ping-pong output -> percentiles in microseconds and message counts.

    Returns {"p25_us" .. "p9999_us", "min_us", "max_us", "avg_us", "stddev_us",
    "observations", "rtt" (True with --full-rtt, else one-way = RTT/2), "run_s",
    "sent", "received", "valid_s", "valid_sent", "dropped", "duplicated", "out_of_order"}.
    """
    text = strip_ansi(text)
    errors = _ERROR.findall(text)
    if errors:
        raise BenchParseError(f"sockperf failed: {errors[0].strip()}")
    pcts = {float(p): float(v) for p, v in _PCT.findall(text)}
    if not pcts:
        raise BenchParseError("sockperf printed no latency percentiles "
                              "(did the client reach the server?)")
    out = {}
    for key, p in PERCENTILES.items():
        if p not in pcts:
            raise BenchParseError(f"sockperf output lacks percentile {p}")
        out[key] = pcts[p]
    m = _MAX.search(text)
    out["max_us"] = float(m.group(1)) if m else None
    m = _MIN.search(text)
    out["min_us"] = float(m.group(1)) if m else None
    m = _AVG.search(text)
    out["rtt"] = bool(m and m.group(1) == "rtt")
    out["avg_us"] = float(m.group(2)) if m else None
    out["stddev_us"] = float(m.group(3)) if m else None
    m = _OBS.search(text)
    out["observations"] = int(m.group(1)) if m else None
    m = _TOTAL.search(text)
    out["run_s"], out["sent"], out["received"] = ((float(m.group(1)), int(m.group(2)), int(m.group(3)))
                                                 if m else (None, None, None))
    m = _VALID.search(text)
    out["valid_s"], out["valid_sent"] = ((float(m.group(1)), int(m.group(2))) if m else (None, None))
    m = _DROPS.search(text)
    out["dropped"], out["duplicated"], out["out_of_order"] = (
        tuple(int(g) for g in m.groups()) if m else (0, 0, 0))
    if out["observations"] == 0:
        raise BenchParseError("sockperf recorded 0 observations")
    return out


def parse_iperf3(data):
    """iperf3 -J output (text or already-decoded dict) -> throughput and errors.

    Returns {"gbps" (receiver side), "gbps_sent", "bytes_sent", "bytes_received",
    "seconds", "retransmits", "cpu_host_pct", "cpu_remote_pct"}.
    """
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise BenchParseError(f"iperf3 output is not JSON: {e}")
    if not isinstance(data, dict):
        raise BenchParseError("iperf3 JSON is not an object")
    if data.get("error"):
        raise BenchParseError(f"iperf3 failed: {data['error']}")
    end = data.get("end") or {}
    sent, recv = end.get("sum_sent"), end.get("sum_received")
    if not sent or not recv:
        raise BenchParseError("iperf3 JSON has no end.sum_sent/sum_received summary")
    cpu = end.get("cpu_utilization_percent") or {}
    out = {
        "gbps": recv["bits_per_second"] / 1e9,
        "gbps_sent": sent["bits_per_second"] / 1e9,
        "bytes_sent": int(sent["bytes"]),
        "bytes_received": int(recv["bytes"]),
        "seconds": float(recv.get("seconds") or recv["end"]),
        "retransmits": int(sent.get("retransmits", 0) or 0),
        "cpu_host_pct": cpu.get("host_total"),
        "cpu_remote_pct": cpu.get("remote_total"),
    }
    if out["bytes_received"] <= 0:
        raise BenchParseError("iperf3 moved no bytes")
    return out


def parse_count_line(text, key):
    """The integer after `key=` on the last line that has it (our own small clients' output)."""
    found = re.findall(rf"\b{re.escape(key)}=([0-9.]+)", text)
    if not found:
        raise BenchParseError(f"no {key}= in output: {text.strip()[-200:]!r}")
    return float(found[-1])


def int_list(text, what, lo, hi, thousands=False):
    """An option's comma list of integers in lo..hi, in the order given ('20k' is 20000
    where `thousands`); UsageError naming the option for anything else."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = 1000 if thousands and item.endswith("k") else 1
        try:
            v = int(item[:-1] if mult > 1 else item) * mult
        except ValueError:
            raise UsageError(f"{what}: {item!r} is not an integer")
        if not lo <= v <= hi:
            raise UsageError(f"{what}: {v} is out of range ({lo}..{hi})")
        out.append(v)
    if not out:
        raise UsageError(f"{what}: give at least one value")
    return out
