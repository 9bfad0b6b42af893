"""PNG charts of benchmark results (matplotlib, Agg backend: no display needed).

`latency_chart` draws percentiles by mode with ratios to `direct`; `rules_chart` draws
operation cost against N (log-log), enroll cost against pods enrolled, and eBPF's enroll
by phase. Each returns the path it wrote.
"""

import os

from . import report


def _plt():
    try:
        import matplotlib
    except ImportError:
        from ..errors import UnsupportedError
        raise UnsupportedError("charts need matplotlib", hint="pip install matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def latency_chart(result, path):
    """Grouped bars: p50/p90/p99/p99.9 per mode, labelled with the ratio to direct."""
    plt = _plt()
    modes = report._ordered(result["modes"], report.LATENCY_MODES)
    keys = [("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        vals = [result["modes"][m].get(key) or float("nan") for m in modes]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(modes))]
        bars = ax.bar(xs, vals, width, label=label)
        if key == "p50_us":
            for b, m in zip(bars, modes):
                r = (result["modes"][m].get("ratio_to_direct") or {}).get(key)
                if r is not None:
                    ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes)
    ax.set_yscale("log")
    ax.set_ylabel("latency (us, log scale)")
    ax.set_title(f"sockperf ping-pong, {result.get('sizes', ['?'])[0]} B "
                 f"(labels: p50 / direct)")
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    for j, m in enumerate(modes):
        if result["modes"][m].get("p50_us") is None:
            ax.annotate("no data", (j, 1), xycoords=("data", "axes fraction"), ha="center",
                        va="top", fontsize=8, color="red")
    # right: throughput and connection rate as ratios to direct
    metrics = [("throughput_gbps", "throughput"), ("conn_per_s", "conn/s"),
               ("cpu_us_per_req", "CPU/request")]
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        vals = [((result["modes"][m].get("ratio_to_direct") or {}).get(key) or float("nan"))
                for m in modes]
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(modes))]
        ax2.bar(xs, vals, width, label=label)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(range(len(modes)))
    ax2.set_xticklabels(modes, rotation=20)
    ax2.set_ylabel("ratio to direct")
    ax2.set_title("relative to direct (same run)")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rules_chart(result, path):
    """Three panels: seconds per operation against N (log-log, per backend and op); enroll
    time against pods already enrolled (flat is the goal); eBPF enroll split into the
    service's phases per N."""
    plt = _plt()
    res = [r for r in result["results"] if r.get("seconds")]
    backends = report._ordered({r["backend"] for r in res}, report.RULES_BACKENDS)
    ops = report._ordered({r["op"] for r in res}, report.RULES_OPS)
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    styles = {"enroll-pod": "o-", "detach-pod": "v-.", "add-entry": "s-",
              "remove-entry": "^--", "full-sync": "d:"}
    colors = {b: c for b, c in zip(report.RULES_BACKENDS, ("tab:green", "tab:blue", "tab:orange"))}
    for b in backends:
        for op in ops:
            pts = sorted((r["n"], r["seconds"]) for r in res if r["backend"] == b and r["op"] == op)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(op, "o-"),
                        color=colors.get(b), label=f"{b} {op}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N existing entries")
    ax.set_ylabel("seconds per operation")
    ax.set_title(f"through the service, {result.get('pods', '?')} pods enrolled")
    ax.grid(which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6)
    by_pods = [r for r in result.get("by_pods") or [] if r.get("seconds")]
    for b in report._ordered({r["backend"] for r in by_pods}, report.RULES_BACKENDS):
        for op in ("enroll-pod", "detach-pod"):
            pts = sorted((r["pods"], r["seconds"] * 1e3) for r in by_pods
                         if r["backend"] == b and r["op"] == op)
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], styles[op],
                         color=colors.get(b), label=f"{b} {op.split('-')[0]}")
    ax2.axhline(report.ENROLL_TARGET_S * 1e3, color="r", lw=0.8, ls="--",
                label="eBPF enroll target")
    ax2.set_xscale("log")
    ax2.set_xlabel("pods already enrolled")
    ax2.set_ylabel("ms (median)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("enroll / detach against pods enrolled")
    ax2.grid(which="both", alpha=0.3)
    ax2.legend(fontsize=6)
    enr = sorted((r for r in res if r["backend"] == "ebpf" and r["op"] == "enroll-pod"
                  and r.get("phases")), key=lambda r: r["n"])
    keys = report._ordered({k for r in enr for k in r["phases"] if k != "total"},
                           report.ENROLL_PHASES)
    bottoms = [0.0] * len(enr)
    for k in keys:
        vals = [(r["phases"].get(k) or 0) * 1e3 for r in enr]
        ax3.bar(range(len(enr)), vals, bottom=bottoms, label=k)
        bottoms = [a + v for a, v in zip(bottoms, vals)]
    ax3.plot(range(len(enr)), [r["seconds"] * 1e3 for r in enr], "k_", markersize=20,
             label="wall")
    ax3.set_xticks(range(len(enr)))
    ax3.set_xticklabels([f"N={r['n']:,}" for r in enr])
    ax3.set_ylabel("ms (median)")
    ax3.set_title("eBPF enroll-pod by phase")
    ax3.grid(axis="y", alpha=0.3)
    if enr:
        ax3.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
