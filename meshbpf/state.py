"""Which pods meshbpf has attached, and how: one JSON record per pod on a tmpfs.

The kernel holds the truth (pinned maps, iptables chains); these records let `status`
and `detach` name pods and their configs after the CLI process that attached them has
exited. They live under /run/meshbpf/<instance>, where <instance> is the basename of
the pin prefix, so tests with their own prefix never see the node's records.
"""

import json
import os
import time

STATE_ROOT = os.environ.get("MESHBPF_STATE_ROOT", "/run/meshbpf")


class StateStore:
    def __init__(self, pin_prefix):
        self.dir = os.path.join(STATE_ROOT, os.path.basename(pin_prefix.rstrip("/")), "pods")

    def _path(self, key):
        return os.path.join(self.dir, f"{key}.json")

    def save(self, key, record):
        os.makedirs(self.dir, exist_ok=True)
        record = dict(record, key=key, updated=time.time())
        tmp = self._path(key) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, sort_keys=True, indent=1)
        os.replace(tmp, self._path(key))
        return record

    def load(self, key):
        try:
            with open(self._path(key)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def remove(self, key):
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def all(self):
        if not os.path.isdir(self.dir):
            return []
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                rec = self.load(name[:-5])
                if rec:
                    out.append(rec)
        return out

    def destroy(self):
        """Remove every record and the instance directory."""
        for rec in self.all():
            self.remove(rec["key"])
        for d in (self.dir, os.path.dirname(self.dir)):
            try:
                os.rmdir(d)
            except OSError:
                pass
