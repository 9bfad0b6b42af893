"""Render benchmark results: the terminal table, the Markdown report, JSON, and the targets.

Pure: result dicts in, strings (and target verdicts) out. The targets are the issue's
benchmark goals; they are reported as met or missed, never asserted.
"""

import json

from . import stats

LATENCY_MODES = ("direct", "explicit", "iptables", "ebpf", "ebpf-nosplice")
RULES_BACKENDS = ("ebpf", "iptables-nft", "iptables-legacy")
RULES_OPS = ("enroll-pod", "detach-pod", "add-entry", "remove-entry", "full-sync")


# ---- targets --------------------------------------------------------------------------

def _target(name, met, detail):
    return {"name": name, "met": met, "detail": detail}


def latency_targets(modes):
    """eBPF's full-mesh p50 and p99 at most 0.7x iptables', and cheaper than `explicit`."""
    out = []
    eb, ipt, exp = modes.get("ebpf"), modes.get("iptables"), modes.get("explicit")
    for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
        name = f"ebpf {label} at most 0.7x iptables"
        imp = stats.improvement(eb and eb.get(key), ipt and ipt.get(key))
        if imp is None:
            out.append(_target(name, None, "needs both modes"))
        else:
            out.append(_target(name, imp >= 0.3 - 1e-9,
                               f"ebpf {eb[key]:.1f} us vs iptables {ipt[key]:.1f} us "
                               f"({1 - imp:.2f}x)"))
    name = "ebpf cheaper than explicit proxy (p50 latency and CPU per request)"
    if not eb or not exp or eb.get("p50_us") is None or exp.get("p50_us") is None:
        out.append(_target(name, None, "needs both modes"))
    else:
        lat_ok = eb["p50_us"] < exp["p50_us"]
        detail = f"p50 {eb['p50_us']:.1f} vs {exp['p50_us']:.1f} us"
        cpu_ok = True
        if eb.get("cpu_us_per_req") is not None and exp.get("cpu_us_per_req") is not None:
            cpu_ok = eb["cpu_us_per_req"] < exp["cpu_us_per_req"]
            detail += f"; CPU {eb['cpu_us_per_req']:.1f} vs {exp['cpu_us_per_req']:.1f} us/request"
        out.append(_target(name, lat_ok and cpu_ok, detail))
    return out


def _ratio_target(name, num, den, limit, above, what):
    if num is None or not den:
        return _target(name, None, f"needs {what} of both modes")
    r = num / den
    return _target(name, r >= limit if above else r <= limit, f"{r:.2f}x")


def throughput_targets(result):
    """Every transfer completes; eBPF peak TCP memory <= 2x iptables'; Gbit/s >= 2.5x."""
    modes = result["modes"]
    eb, ipt = modes.get("ebpf", {}), modes.get("iptables", {})
    done = all(m["completed"] == m["runs"] for m in modes.values())
    out = [_target("every transfer completes", done,
                   ", ".join(f"{k} {m['completed']}/{m['runs']}" for k, m in modes.items()))]
    out.append(_ratio_target("ebpf peak TCP memory at most 2x iptables",
                             eb.get("peak_tcp_pages"), ipt.get("peak_tcp_pages"), 2, False,
                             "peak TCP memory"))
    out.append(_ratio_target("ebpf throughput at least 2.5x iptables",
                             eb.get("gbps"), ipt.get("gbps"), 2.5, True, "throughput"))
    return out


def soak_targets(result):
    """No errors in any mode; eBPF peak TCP memory <= 2x iptables' for the same flows."""
    modes = result["modes"]
    errs = [f"{k}: {e}" for k, m in modes.items() for e in m["errors"]]
    out = [_target("every flow completes without error", not errs, "; ".join(errs) or "none")]
    out.append(_ratio_target("ebpf peak TCP memory at most 2x iptables",
                             modes.get("ebpf", {}).get("peak_tcp_pages"),
                             modes.get("iptables", {}).get("peak_tcp_pages"), 2, False,
                             "peak TCP memory"))
    return out


def _mib(pages):
    return None if pages is None else pages * 4096 / (1 << 20)


def throughput_text(result):
    """Terminal table for `bench throughput` and `bench soak`."""
    rows = []
    base = result["modes"].get("iptables", {})
    for mode, m in result["modes"].items():
        if result["kind"] == "throughput":
            g = m.get("gbps")
            rng = (f" ({_fmt(m['gbps_min'], '.2f')}-{_fmt(m['gbps_max'], '.2f')})"
                   if g is not None else "")
            ratio = (f" ({g / base['gbps']:.2f}x)" if g and base.get("gbps") and mode != "iptables"
                     else "")
            rows.append([mode, f"{m['completed']}/{m['runs']}", _fmt(g, ".2f") + rng + ratio,
                         _fmt(_mib(m.get("peak_tcp_pages")), ".1f"),
                         "; ".join(m["errors"])[:120]])
        else:
            rows.append([mode, str(m["flows"]), _fmt(m.get("gbps"), ".2f"),
                         _fmt(m.get("rr_p99_us"), ".1f"), _fmt(_mib(m.get("peak_tcp_pages")), ".1f"),
                         "; ".join(m["errors"])[:120]])
    if result["kind"] == "throughput":
        head = (f"Bulk throughput, one iperf3 stream app -> Envoy -> Envoy -> app, "
                f"{result['runs']} run(s) of {result['seconds']} s per mode")
        headers = ["mode", "completed", "Gbit/s median (min-max)", "peak TCP MiB", "errors"]
    else:
        head = (f"Soak: {result['flows']} bulk streams + request/response, "
                f"{result['seconds']} s per mode")
        headers = ["mode", "streams", "Gbit/s", "rr p99 us", "peak TCP MiB", "errors"]
    lines = [head, _table(headers, rows), ""]
    lines += [f"target: {t['name']}: {_verdict(t)} ({t['detail']})" for t in result["targets"]]
    return "\n".join(lines)


def throughput_markdown(result, charts=()):
    return "```\n" + throughput_text(result) + "\n```\n"


ENROLL_TARGET_S = 5e-3          # eBPF enroll, median per pod, through the service
FLAT_LIMIT = 1.5                # "flat": median at the most pods within 1.5x of at 1 pod
ENROLL_PHASES = ("node", "addresses", "maps", "tc", "sk_lookup", "inbound", "iptables", "records")


def _slowest_phase(r):
    ph = {k: v for k, v in (r.get("phases") or {}).items() if k != "total" and v is not None}
    if not ph:
        return ""
    k = max(ph, key=ph.get)
    return f", slowest phase {k} {_fmt_s(ph[k])}"


def rules_targets(results, by_pods=()):
    """The issue's goals for the real path, each met / missed / not measured:
    - eBPF enroll-pod at most 5 ms (median) at every N measured;
    - eBPF enroll flat in the number of pods enrolled: median at the most pods within
      1.5x of the median with 1 pod enrolled, and as many bpf(2) calls;
    - eBPF add-entry / remove-entry flat in N (log-log slope under 0.15)."""
    out = []
    name = f"eBPF enroll-pod at most {ENROLL_TARGET_S * 1e3:g} ms per pod (median, real path)"
    enr = sorted((r for r in results if r["backend"] == "ebpf" and r["op"] == "enroll-pod"
                  and r.get("seconds") is not None), key=lambda r: r["n"])
    if not enr:
        out.append(_target(name, None, "needs eBPF enroll-pod"))
    else:
        worst = max(enr, key=lambda r: r["seconds"])
        out.append(_target(name, worst["seconds"] <= ENROLL_TARGET_S,
                           ", ".join(f"N={r['n']:,}: {_fmt_s(r['seconds'])}" for r in enr)
                           + f" (worst N={worst['n']:,}{_slowest_phase(worst)})"))
    pts = sorted((r for r in by_pods if r["backend"] == "ebpf" and r["op"] == "enroll-pod"
                  and r.get("seconds") is not None), key=lambda r: r["pods"])
    if len(pts) < 2:
        out.append(_target(f"eBPF enroll flat in pods enrolled (median at the most pods "
                           f"within {FLAT_LIMIT:g}x of at 1 pod)", None,
                           "needs eBPF enroll at two pod counts"))
    else:
        lo, hi = pts[0], pts[-1]
        name = (f"eBPF enroll flat from {lo['pods']} to {hi['pods']} pods enrolled (median at "
                f"{hi['pods']} within {FLAT_LIMIT:g}x of at {lo['pods']})")
        r = hi["seconds"] / lo["seconds"]
        detail = (", ".join(f"{p['pods']}: {_fmt_s(p['seconds'])}" for p in pts)
                  + f"; {r:.2f}x")
        if lo.get("bpf_syscalls") is not None and hi.get("bpf_syscalls") is not None:
            detail += (f"; bpf syscalls per enroll {lo['bpf_syscalls']:.0f} at {lo['pods']}, "
                       f"{hi['bpf_syscalls']:.0f} at {hi['pods']}")
        out.append(_target(name, r <= FLAT_LIMIT, detail))
    out.append(_syscall_target(pts))
    for op in ("add-entry", "remove-entry"):
        pts = sorted((r["n"], r["seconds"]) for r in results
                     if r["backend"] == "ebpf" and r["op"] == op and r.get("seconds"))
        name = f"eBPF {op} flat in N"
        slope = stats.loglog_slope(pts)
        if slope is None:
            out.append(_target(name, None, "needs at least two N"))
        else:
            lo, hi = min(s for _, s in pts), max(s for _, s in pts)
            out.append(_target(name, abs(slope) < 0.15,
                               f"log-log slope {slope:+.3f} over N={pts[0][0]}..{pts[-1][0]} "
                               f"({_fmt_s(lo)}..{_fmt_s(hi)})"))
    return out


def _syscall_target(pts):
    """O(1) in the syscalls it issues: enrolling the same pod costs as many bpf(2) calls
    with the most pods enrolled as with the fewest."""
    pts = [p for p in pts if p.get("bpf_syscalls") is not None]
    if len(pts) < 2:
        return _target("eBPF enroll issues as many bpf syscalls with the most pods enrolled "
                       "as with the fewest", None, "needs bpf syscall counts at two pod counts")
    lo, hi = pts[0], pts[-1]
    return _target(f"eBPF enroll issues as many bpf syscalls with {hi['pods']} pods enrolled "
                   f"as with {lo['pods']}", hi["bpf_syscalls"] <= lo["bpf_syscalls"],
                   ", ".join(f"{p['pods']}: {p['bpf_syscalls']:.0f}" for p in pts))


def rules_ratios(results):
    """eBPF's time over each iptables backend's, per op and N: [{"op", "n", "backend",
    "ebpf_over"}] (below 1: eBPF is cheaper)."""
    idx = {(r["backend"], r["op"], r["n"]): r.get("seconds") for r in results}
    out = []
    for (b, op, n), sec in sorted(idx.items(), key=lambda kv: (
            _rank(kv[0][1], RULES_OPS), kv[0][2], _rank(kv[0][0], RULES_BACKENDS))):
        if b == "ebpf":
            continue
        out.append({"op": op, "n": n, "backend": b,
                    "ebpf_over": stats.ratio(idx.get(("ebpf", op, n)), sec)})
    return out


def _rank(x, order):
    return order.index(x) if x in order else len(order)


# ---- formatting helpers ---------------------------------------------------------------

def _fmt_s(sec):
    """Seconds in a readable unit."""
    if sec is None:
        return "-"
    if round(sec * 1e6, 1) < 1000:
        return f"{sec * 1e6:.1f}us"
    if sec < 1:
        return f"{sec * 1e3:.2f}ms"
    return f"{sec:.2f}s"


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _fmt_ratio(r):
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    return f"{r:.2f}x"


def _table(headers, rows, aligns=None):
    """A plain fixed-width text table."""
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    line = lambda cells: "  ".join(format(str(c), f"{a}{w}") for c, a, w in zip(cells, aligns, widths))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(l.rstrip() for l in out)


def _md_table(headers, rows):
    left = lambda i, h: i == 0 or h in ("errors", "error", "backend")
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if left(i, h) else "---:" for i, h in enumerate(headers)) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ordered(keys, preferred):
    return [k for k in preferred if k in keys] + sorted(k for k in keys if k not in preferred)


def _verdict(t):
    return {True: "met", False: "MISSED", None: "not measured"}[t["met"]]


# ---- latency --------------------------------------------------------------------------

_LAT_COLS = (("p50_us", "p50 us"), ("p90_us", "p90 us"), ("p99_us", "p99 us"),
             ("p999_us", "p99.9 us"), ("conn_per_s", "conn/s"),
             ("throughput_gbps", "Gbit/s"), ("cpu_us_per_req", "CPU us/req"))


def _latency_rows(result, with_ratio=True):
    rows = []
    for mode in _ordered(result["modes"], LATENCY_MODES):
        m = result["modes"][mode]
        row = [mode]
        for key, _ in _LAT_COLS:
            v = m.get(key)
            spec = ".0f" if key == "conn_per_s" else (".2f" if key == "throughput_gbps" else ".1f")
            cell = _fmt(v, spec)
            r = (m.get("ratio_to_direct") or {}).get(key)
            if with_ratio and v is not None and r is not None and mode != "direct":
                cell += f" ({r:.2f}x)"
            row.append(cell)
        row.append("; ".join(m.get("errors") or []) or "")
        rows.append(row)
    return rows


def latency_text(result):
    """Terminal table: one row per mode, each figure with its ratio to `direct`."""
    size = result.get("sizes", ["?"])[0]
    kind = "round-trip" if result.get("rtt", True) else "one-way"
    head = (f"Request/response latency ({kind}, {size}-byte messages, median of "
            f"{result.get('rounds')} round(s)); ratios to direct in parentheses")
    headers = ["mode"] + [h for _, h in _LAT_COLS] + ["errors"]
    lines = [head, _table(headers, _latency_rows(result))]
    if len(result.get("sizes", [])) > 1:
        lines.append("")
        lines.append("p50 / p99 by message size (us)")
        sizes = [str(s) for s in result["sizes"]]
        rows = []
        for mode in _ordered(result["modes"], LATENCY_MODES):
            bs = result["modes"][mode].get("by_size", {})
            rows.append([mode] + [f"{_fmt(bs.get(s, {}).get('p50_us'))} / {_fmt(bs.get(s, {}).get('p99_us'))}"
                                  for s in sizes])
        lines.append(_table(["mode"] + [f"{s} B" for s in sizes], rows))
    lines.append("")
    lines += [f"target: {t['name']}: {_verdict(t)} ({t['detail']})" for t in result.get("targets", [])]
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def latency_markdown(result, charts=()):
    size = result.get("sizes", ["?"])[0]
    kind = "round-trip" if result.get("rtt", True) else "one-way"
    out = ["# meshbpf benchmark: data path", "",
           f"sockperf TCP ping-pong ({kind} latency, {size}-byte messages), iperf3 throughput, "
           f"new connections per second (connect, one request, close) and CPU time per request "
           f"of every process on the path. Median of {result.get('rounds')} interleaved "
           f"round(s); the figure in parentheses is the ratio to `direct` in the same run.", ""]
    headers = ["mode"] + [h for _, h in _LAT_COLS] + ["errors"]
    out.append(_md_table(headers, _latency_rows(result)))
    out.append("")
    if len(result.get("sizes", [])) > 1:
        sizes = [str(s) for s in result["sizes"]]
        rows = []
        for mode in _ordered(result["modes"], LATENCY_MODES):
            bs = result["modes"][mode].get("by_size", {})
            rows.append([mode] + [f"{_fmt(bs.get(s, {}).get('p50_us'))} / {_fmt(bs.get(s, {}).get('p99_us'))}"
                                  for s in sizes])
        out += ["p50 / p99 (us) by message size:", "",
                _md_table(["mode"] + [f"{s} B" for s in sizes], rows), ""]
    out.append("Spread (interquartile range of the per-round p50, us):")
    out.append("")
    for mode in _ordered(result["modes"], LATENCY_MODES):
        sp = result["modes"][mode].get("spread", {}).get("p50_us", {})
        out.append(f"- {mode}: IQR {_fmt(sp.get('iqr'), '.2f')}, min {_fmt(sp.get('min'))}, "
                   f"max {_fmt(sp.get('max'))}, n={sp.get('n', 0)}")
    out += ["", "## Targets", ""]
    out += [f"- {t['name']}: **{_verdict(t)}** ({t['detail']})" for t in result.get("targets", [])]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    for c in charts:
        out += ["", f"![{c}]({c})"]
    return "\n".join(out) + "\n"


# ---- rules ----------------------------------------------------------------------------

def _rules_grid(result):
    """Rows (op, n) x backend columns (median time), then eBPF / each iptables backend."""
    idx = {(r["backend"], r["op"], r["n"]): r for r in result["results"]}
    backends = _ordered({r["backend"] for r in result["results"]}, RULES_BACKENDS)
    ipt = [b for b in backends if b != "ebpf"]
    ops = _ordered({r["op"] for r in result["results"]}, RULES_OPS)
    rows = []
    for op in ops:
        for n in sorted({r["n"] for r in result["results"] if r["op"] == op}):
            row = [op, f"{n:,}"]
            for b in backends:
                r = idx.get((b, op, n))
                row.append(_fmt_s(r["seconds"]) if r and r["seconds"] is not None else "-")
            e = idx.get(("ebpf", op, n))
            for b in ipt if "ebpf" in backends else []:
                r = idx.get((b, op, n))
                row.append(_fmt_ratio(stats.ratio(e and e["seconds"], r and r["seconds"])))
            rows.append(row)
    ratio_heads = [f"eBPF/{b.split('-', 1)[1]}" for b in ipt] if "ebpf" in backends else []
    return ["op", "N"] + backends + ratio_heads, rows


def _phase_rows(result):
    """enroll-pod split into the service's phases, per backend and N (median ms)."""
    res = [r for r in result["results"] if r["op"] == "enroll-pod" and r.get("phases")]
    keys = _ordered({k for r in res for k in r["phases"] if k != "total"}, ENROLL_PHASES)
    rows = []
    for r in sorted(res, key=lambda r: (_rank(r["backend"], RULES_BACKENDS), r["n"])):
        ph = r["phases"]
        rows.append([r["backend"], f"{r['n']:,}", _fmt_s(r["seconds"]),
                     _fmt_s(ph.get("total"))] + [_fmt_s(ph.get(k)) for k in keys]
                    + [_fmt_s(_unphased(ph)), _fmt(r.get("bpf_syscalls"), ".0f")])
    return (["backend", "N", "wall", "service total"] + keys + ["other", "bpf syscalls"],
            rows)


def _unphased(ph):
    """The service's total less its named phases (medians, so an estimate; never < 0):
    the backend work no phase names, e.g. iptables-restore."""
    if ph.get("total") is None:
        return None
    return max(0.0, ph["total"] - sum(v or 0 for k, v in ph.items() if k != "total"))


def _by_pods_rows(result):
    """Enroll (and detach) median against the number of pods already enrolled."""
    rows_in = result.get("by_pods") or []
    backends = _ordered({r["backend"] for r in rows_in}, RULES_BACKENDS)
    idx = {(r["backend"], r["op"], r["pods"]): r for r in rows_in}
    rows = []
    for pods in sorted({r["pods"] for r in rows_in}):
        row = [str(pods)]
        for b in backends:
            for op in ("enroll-pod", "detach-pod"):
                r = idx.get((b, op, pods))
                cell = _fmt_s(r["seconds"]) if r else "-"
                if r and op == "enroll-pod" and r.get("ratio_to_first") is not None:
                    cell += f" ({r['ratio_to_first']:.2f}x)"
                row.append(cell)
        e = idx.get(("ebpf", "enroll-pod", pods))
        row.append(_fmt(e and e.get("bpf_syscalls"), ".0f"))
        rows.append(row)
    heads = [f"{b} {op.split('-')[0]}" for b in backends for op in ("enroll-pod", "detach-pod")]
    return ["pods enrolled"] + heads + ["eBPF enroll bpf syscalls"], rows


def _dataplane_rows(result):
    rows = []
    for r in sorted(result.get("dataplane", []), key=lambda r: (r["n"], r["backend"])):
        rows.append([r["backend"], f"{r['n']:,}", _fmt(r.get("conn_per_s"), ".0f"),
                     _fmt_ratio(r.get("ratio_to_ebpf")), r.get("error") or ""])
    return ["backend", "N entries", "conn/s", "conn/s vs eBPF", "error"], rows


def _service_lines(result):
    out = []
    for b, ev in (result.get("service") or {}).items():
        out.append(f"{b}: {ev.get('attached')} attach, {ev.get('updated')} update, "
                   f"{ev.get('detached')} detach calls; records with the bench pods "
                   f"enrolled {ev.get('records_enrolled')}, after {ev.get('records_after')}")
    return out


def _rules_head(result):
    return (f"through {result.get('path', 'the service layer')}, {result.get('pods', '?')} pods "
            f"enrolled holding the N excluded CIDRs between them")


def rules_text(result):
    headers, rows = _rules_grid(result)
    lines = [f"Control-plane cost ({_rules_head(result)}; median wall time per operation)",
             _table(headers, rows, ["<", ">"] + [">"] * (len(headers) - 2))]
    h, r = _phase_rows(result)
    if r:
        lines += ["", "enroll-pod split into the service's phases (median)", _table(h, r)]
    h, r = _by_pods_rows(result)
    if r:
        lines += ["", ("enroll / detach against pods already enrolled (median; ratio to the "
                       "fewest pods)"), _table(h, r)]
    if result.get("dataplane"):
        h, r = _dataplane_rows(result)
        lines += ["", ("Data-plane cost of N entries (new connections per second, client "
                       "enrolled through the service, destination matched by the last entry)"),
                  _table(h, r)]
    lines.append("")
    lines += [f"target: {t['name']}: {_verdict(t)} ({t['detail']})" for t in result.get("targets", [])]
    lines += [f"service: {l}" for l in _service_lines(result)]
    lines += [f"error: {e}" for e in result.get("errors", [])]
    lines += [f"note: {e}" for e in result.get("notes", [])]
    return "\n".join(lines)


def rules_markdown(result, charts=()):
    headers, rows = _rules_grid(result)
    out = ["# meshbpf benchmark: control plane", "",
           (f"Median wall time of one operation of the product's service layer "
            f"(`{result.get('path', 'meshbpf.service.NodeService')}`, the functions the CLI and "
            f"the agent call) on test-bed pods, with {result.get('pods', '?')} pods enrolled "
            "holding N excluded CIDRs between them (each about N/pods in its config's `-x`):"),
           "",
           ("- `enroll-pod`: `attach` of one more pod (config: Istio's defaults, its share of "
            "the N exclusions); `detach-pod`: its `detach`;"),
           ("- `add-entry` / `remove-entry`: `update` of a live pod with one excluded CIDR "
            "more / less;"),
           "- `full-sync`: `update` of every enrolled pod with its config.",
           "",
           "eBPF/iptables columns: eBPF's time over that backend's (below 1: eBPF is cheaper).",
           "", _md_table(headers, rows), ""]
    h, r = _phase_rows(result)
    if r:
        out += ["## Where an enroll's time goes", "",
                ("The service's own phase timings of `attach` (median): node programs, "
                 "address checks, map writes, inbound hook (tc / sk_lookup), records; "
                 "`other`: the service's total less its named phases (in iptables mode the "
                 "`iptables-restore` runs); `wall` is the whole call as the caller sees it."),
                "", _md_table(h, r), ""]
    h, r = _by_pods_rows(result)
    if r:
        out += ["## Enroll cost against pods already enrolled", "",
                ("Median `attach` / `detach` of one more pod with this many pods enrolled; in "
                 "parentheses the ratio to the fewest pods (flat: close to 1)."),
                "", _md_table(h, r), ""]
    if result.get("dataplane"):
        h, r = _dataplane_rows(result)
        out += ["## Data-plane cost of N entries", "",
                ("New connections per second (connect, one request, close) from a client pod "
                 "enrolled through the service with N excluded CIDRs, the last one the server "
                 "pod's address: meshbpf's own connect4 program and the pod's LPM trie (eBPF) "
                 "against Istio's exclusion rules walked in order (iptables). `none`: the "
                 "client not enrolled."),
                "", _md_table(h, r), ""]
    out += ["## Targets", ""]
    out += [f"- {t['name']}: **{_verdict(t)}** ({t['detail']})" for t in result.get("targets", [])]
    if result.get("service"):
        out += ["", "## Service calls", ""] + [f"- {l}" for l in _service_lines(result)]
    if result.get("errors"):
        out += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {e}" for e in result["notes"]]
    for c in charts:
        out += ["", f"![{c}]({c})"]
    return "\n".join(out) + "\n"


def to_json(result):
    return json.dumps(result, indent=2, sort_keys=True, default=str)
