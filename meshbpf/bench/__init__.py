"""The benchmark harness (`meshbpf bench`): what each interception mode costs.

parse.py (tool output -> numbers), stats.py (medians, spreads, ratios), report.py (tables,
Markdown, JSON, targets), charts.py (PNGs), rules.py (control-plane runner), latency.py
(data-path runner), commands.py (the click group `bench`).
"""
