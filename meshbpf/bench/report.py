"""Render benchmark results: the terminal table, the Markdown report, JSON, and the targets.

Pure: result dicts in, strings (and target verdicts) out. The targets are the issue's
benchmark goals; they are reported as met or missed, never asserted.
"""

import json

from . import stats

LATENCY_MODES = ("direct", "explicit", "iptables", "ebpf", "ebpf-nosplice")
RULES_BACKENDS = ("ebpf", "iptables-nft", "iptables-legacy")
RULES_OPS = ("enroll-pod", "add-entry", "remove-entry", "full-sync")


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


def rules_targets(results, n_big=20000):
    """A single update at N=20,000 >=1000x cheaper on eBPF than iptables-nft, and flat in N."""
    out = []
    idx = {(r["backend"], r["op"], r["n"]): r["seconds"] for r in results}
    for op in ("add-entry", "remove-entry"):
        name = f"{op} at N={n_big}: eBPF at least 1000x cheaper than iptables-nft"
        e, i = idx.get(("ebpf", op, n_big)), idx.get(("iptables-nft", op, n_big))
        r = stats.ratio(i, e)
        if r is None:
            out.append(_target(name, None, f"needs eBPF and iptables-nft at N={n_big}"))
        else:
            out.append(_target(name, r >= 1000,
                               f"iptables-nft {_fmt_s(i)} vs eBPF {_fmt_s(e)} ({r:,.0f}x)"))
    for op in ("add-entry", "remove-entry"):
        pts = sorted((n, s) for (b, o, n), s in idx.items() if b == "ebpf" and o == op and s)
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


# ---- formatting helpers ---------------------------------------------------------------

def _fmt_s(sec):
    """Seconds in a readable unit."""
    if sec is None:
        return "-"
    if sec < 1e-3:
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
    """Rows (op, n) x backend columns: time (ratio to eBPF)."""
    idx = {(r["backend"], r["op"], r["n"]): r for r in result["results"]}
    backends = _ordered({r["backend"] for r in result["results"]}, RULES_BACKENDS)
    ops = _ordered({r["op"] for r in result["results"]}, RULES_OPS)
    rows = []
    for op in ops:
        for n in sorted({r["n"] for r in result["results"] if r["op"] == op}):
            row = [op, f"{n:,}"]
            for b in backends:
                r = idx.get((b, op, n))
                if not r or r["seconds"] is None:
                    row.append("-")
                    continue
                cell = _fmt_s(r["seconds"])
                if b != "ebpf" and r.get("ratio_to_ebpf") is not None:
                    cell += f" ({_fmt_ratio(r['ratio_to_ebpf'])})"
                row.append(cell)
            rows.append(row)
    return ["op", "N"] + backends, rows


def _dataplane_rows(result):
    rows = []
    for r in sorted(result.get("dataplane", []), key=lambda r: (r["n"], r["backend"])):
        name = r["backend"] + (f" ({r['impl']})" if r.get("impl") else "")
        rows.append([name, f"{r['n']:,}", _fmt(r.get("conn_per_s"), ".0f"),
                     _fmt_ratio(r.get("ratio_to_ebpf")), r.get("error") or ""])
    return ["backend", "N entries", "conn/s", "vs eBPF", "error"], rows


def rules_text(result):
    headers, rows = _rules_grid(result)
    lines = ["Control-plane cost (median wall time per operation; ratio to eBPF maps)",
             _table(headers, rows, ["<", ">"] + [">"] * (len(headers) - 2))]
    if result.get("dataplane"):
        h, r = _dataplane_rows(result)
        lines += ["", "Data-plane cost of N entries (new connections per second, "
                      "destination matched by the last entry)", _table(h, r)]
    lines.append("")
    lines += [f"target: {t['name']}: {_verdict(t)} ({t['detail']})" for t in result.get("targets", [])]
    lines += [f"error: {e}" for e in result.get("errors", [])]
    lines += [f"note: {e}" for e in result.get("notes", [])]
    return "\n".join(lines)


def rules_markdown(result, charts=()):
    headers, rows = _rules_grid(result)
    out = ["# meshbpf benchmark: control plane", "",
           "Median wall time of one operation with N entries already installed: `enroll-pod` "
           "(one pod's interception), `add-entry` / `remove-entry` (one excluded CIDR), "
           "`full-sync` (writing all N entries). iptables timings include the `iptables` "
           "process; eBPF timings are bpf(2) map updates. The ratio is to eBPF in the same run.",
           "",
           "- iptables: the N entries are Istio's `-A ISTIO_OUTPUT -d <cidr> -j RETURN` "
           "exclusions in one pod's nat table; add = `iptables -w -t nat -I ISTIO_OUTPUT <pos>` "
           "before the final jump to ISTIO_REDIRECT, remove = `-D` by rule spec; full sync = "
           "one `iptables-restore` of the whole payload; enroll-pod = Istio's default payload "
           "restored (`--noflush`) into a fresh pod netns (independent of N: every pod has "
           "its own tables).",
           "- eBPF: the N entries are in an LPM trie keyed like the data path's `cidr_rules`; "
           "add/remove = one update/delete; full sync = N updates from one process; "
           "enroll-pod = the pod record, its CIDR and port rules and its local address "
           "(map writes only; the inbound tc hook the real attach also installs is not "
           "included).",
           "", _md_table(headers, rows), ""]
    if result.get("dataplane"):
        h, r = _dataplane_rows(result)
        out += ["## Data-plane cost of N entries", "",
                "New connections per second (connect, one request, close) from a client pod "
                "to a server pod whose address is matched by the last of N excluded CIDRs: "
                "Istio's rules (linear in N) against the eBPF path's LPM trie "
                "(`ebpf-interceptor`: the real EbpfInterceptor with those exclusions; "
                "`lpm-lookup`: a connect4 program doing only that lookup). `none`: no rules.",
                "", _md_table(h, r), ""]
    out += ["## Targets", ""]
    out += [f"- {t['name']}: **{_verdict(t)}** ({t['detail']})" for t in result.get("targets", [])]
    if result.get("errors"):
        out += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {e}" for e in result["notes"]]
    for c in charts:
        out += ["", f"![{c}]({c})"]
    return "\n".join(out) + "\n"


def to_json(result):
    return json.dumps(result, indent=2, sort_keys=True, default=str)
