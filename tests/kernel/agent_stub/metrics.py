"""Test-only stand-in for meshbpf/agent/metrics.py while that module is written on another
branch: the same API, recording nothing. The agent tests put it on meshbpf.agent's path
only when the real module is absent."""


class Metrics:
    def __init__(self, pin_prefix, **kw):
        self.pin_prefix = pin_prefix

    def serve(self, addr):
        return None

    def set_ready(self, ready):
        pass

    def op(self, kind, ok, reason=None, seconds=None):
        pass

    def reconcile_done(self, seconds, pods_by_state):
        pass

    def set_mode(self, mode):
        pass

    def set_features(self, probe_report):
        pass
