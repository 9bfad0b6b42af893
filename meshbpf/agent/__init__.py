"""The node agent (`meshbpf daemon`): keeps every pod a source names intercepted.

    source.py     the pods file -> desired pods, per-entry errors (pure)
    reconcile.py  desired vs records and the kernel -> actions (plan is pure), drift checks,
                  per-pod backoff, carrying the actions out through NodeService
    daemon.py     the loop: file watch (inotify, polling fallback), resync timer, signals,
                  agent.json
    command.py    the `meshbpf daemon` command and its logging
    metrics.py    Prometheus metrics, /healthz, /readyz
"""
