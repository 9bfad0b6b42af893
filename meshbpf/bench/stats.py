"""Statistics for noisy benchmark rounds: medians, spread (IQR, min/max) and ratios.

Pure: lists of numbers in, numbers and dicts out. None values (a failed sample) are
ignored; an empty sample gives None rather than raising, so one failed mode does not
sink a whole run.
"""

import math


def _clean(xs):
    return sorted(float(x) for x in xs if x is not None and not math.isnan(float(x)))


def quantile(xs, q):
    """Linear-interpolated quantile (q in [0, 1]) of `xs`, None if empty."""
    s = _clean(xs)
    if not s:
        return None
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs):
    return quantile(xs, 0.5)


def spread(xs):
    """{"median", "q1", "q3", "iqr", "min", "max", "n", "rel_iqr"} of a sample."""
    s = _clean(xs)
    if not s:
        return {"median": None, "q1": None, "q3": None, "iqr": None,
                "min": None, "max": None, "n": 0, "rel_iqr": None}
    med, q1, q3 = quantile(s, 0.5), quantile(s, 0.25), quantile(s, 0.75)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": s[0], "max": s[-1],
            "n": len(s), "rel_iqr": (q3 - q1) / med if med else None}


def ratio(value, base):
    """value / base, None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def improvement(value, base):
    """How much lower `value` is than `base`, as a fraction of base (0.2 = 20% lower)."""
    if value is None or base is None or base == 0:
        return None
    return (base - value) / base


def summarize(samples, keys):
    """Per key: the median of the samples' values and its spread.

    samples: list of dicts (one per round). Returns ({key: median}, {key: spread}).
    """
    med, spr = {}, {}
    for k in keys:
        vals = [s.get(k) for s in samples]
        sp = spread(vals)
        med[k] = sp["median"]
        spr[k] = sp
    return med, spr


def ratios_to(values, base, keys):
    """{key: values[key] / base[key]} for keys present in both."""
    return {k: ratio(values.get(k), base.get(k)) for k in keys}


# ---- aggregation of whole runs --------------------------------------------------------

LATENCY_KEYS = ("p50_us", "p90_us", "p99_us", "p999_us")
MODE_KEYS = LATENCY_KEYS + ("conn_per_s", "throughput_gbps", "cpu_us_per_req")


def aggregate_latency(samples, sizes, base_mode="direct"):
    """Per-round samples -> the "modes" dict of the latency report.

    samples: dicts {"mode", "round", "sizes": {size: {p50_us, ...}}, "conn_per_s",
    "throughput_gbps", "retransmits", "cpu_us_per_req", "errors": [str]}.
    The headline p50/p90/p99/p99.9 of a mode are those at the first size; "by_size"
    holds every size. Each mode gets "spread" (per key) and "ratio_to_direct".
    """
    modes = {}
    order = []
    for s in samples:
        if s["mode"] not in order:
            order.append(s["mode"])
    for mode in order:
        rows = [s for s in samples if s["mode"] == mode]
        by_size = {}
        for size in sizes:
            per = [r.get("sizes", {}).get(str(size)) or r.get("sizes", {}).get(size) or {}
                   for r in rows]
            med, spr = summarize(per, LATENCY_KEYS)
            by_size[str(size)] = dict(med, spread=spr)
        flat = []
        for r in rows:
            first = r.get("sizes", {}).get(str(sizes[0])) or r.get("sizes", {}).get(sizes[0]) or {}
            flat.append({**{k: first.get(k) for k in LATENCY_KEYS},
                         "conn_per_s": r.get("conn_per_s"),
                         "throughput_gbps": r.get("throughput_gbps"),
                         "cpu_us_per_req": r.get("cpu_us_per_req")})
        med, spr = summarize(flat, MODE_KEYS)
        errors = [e for r in rows for e in r.get("errors", [])]
        retr = [r.get("retransmits") for r in rows if r.get("retransmits") is not None]
        modes[mode] = dict(med, by_size=by_size, spread=spr, rounds=len(rows),
                           retransmits=sum(retr) if retr else None, errors=errors)
    base = modes.get(base_mode)
    for mode, m in modes.items():
        m["ratio_to_direct"] = ratios_to(m, base, MODE_KEYS) if base else {}
    return modes


def phases(timings):
    """Per phase, the median over repetitions of the service's `timings` dicts (seconds;
    a phase absent from a repetition is not counted for it), in first-seen order."""
    keys = []
    for t in timings or []:
        for k in t or {}:
            if k not in keys:
                keys.append(k)
    return {k: median([(t or {}).get(k) for t in timings]) for k in keys}


def _timed_row(s):
    """The common part of an aggregated timed sample: median, spread, phases, syscalls."""
    sp = spread(s["seconds"])
    row = {"backend": s["backend"], "op": s["op"], "seconds": sp["median"], "spread": sp,
           "reps": sp["n"], "phases": phases(s.get("timings")),
           "bpf_syscalls": median(s.get("syscalls") or [])}
    if s.get("pods") is not None:
        row["pods"] = int(s["pods"])
    return row


def aggregate_rules(samples, base_backend="ebpf"):
    """Timed control-plane samples -> the "results" list of the rules report.

    samples: dicts {"backend", "op", "n", "seconds": [float, ...]} (repetitions of one op),
    optionally "pods" (pods enrolled), "timings" (the service's phase dicts, one per
    repetition) and "syscalls" (bpf(2) calls per repetition).
    Each result: {"backend", "op", "n", "seconds" (median), "spread", "reps", "phases"
    (median per phase), "bpf_syscalls" (median), "ratio_to_ebpf" (this backend's time /
    eBPF's for the same op and n)}.
    """
    results = []
    for s in samples:
        results.append(dict(_timed_row(s), n=int(s["n"])))
    base = {(r["op"], r["n"]): r["seconds"] for r in results if r["backend"] == base_backend}
    for r in results:
        r["ratio_to_ebpf"] = ratio(r["seconds"], base.get((r["op"], r["n"])))
    return results


def aggregate_by_pods(samples):
    """Enroll / detach samples at a number of enrolled pods {"backend", "op", "pods",
    "seconds", "timings", "syscalls"} -> rows sorted by backend, op and pods, each with
    "ratio_to_first" (its median / the median at the fewest pods of its backend and op)."""
    rows = sorted((_timed_row(s) for s in samples),
                  key=lambda r: (r["backend"], r["op"], r["pods"]))
    first = {}
    for r in rows:
        first.setdefault((r["backend"], r["op"]), r["seconds"])
    for r in rows:
        r["ratio_to_first"] = ratio(r["seconds"], first[(r["backend"], r["op"])])
    return rows


def aggregate_dataplane(samples, base_backend="ebpf"):
    """Connection-rate samples {"backend", "n", "conn_per_s": [float]} -> rows with ratios."""
    rows = []
    for s in samples:
        sp = spread(s["conn_per_s"])
        rows.append({"backend": s["backend"], "n": int(s["n"]), "conn_per_s": sp["median"],
                     "spread": sp, "error": s.get("error"), "impl": s.get("impl")})
    base = {r["n"]: r["conn_per_s"] for r in rows if r["backend"] == base_backend}
    for r in rows:
        r["ratio_to_ebpf"] = ratio(r["conn_per_s"], base.get(r["n"]))
    return rows


def loglog_slope(points):
    """Least-squares slope of log(y) against log(x): ~0 flat, ~1 linear in N."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    if den == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den
