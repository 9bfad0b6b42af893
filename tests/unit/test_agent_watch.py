"""The agent's file watch (inotify on the directory, stat polling fallback) and its JSON logs."""

import json
import logging
import os
import select


from meshbpf.agent.command import JsonFormatter
from meshbpf.agent.daemon import InotifyWatch, StatWatch


def _ready(w, timeout=0.1):
    return bool(select.select([w.fileno()], [], [], timeout)[0])


def test_inotify_sees_atomic_rename_and_in_place_writes_of_the_file_only(tmp_path):
    path = tmp_path / "pods.yaml"
    path.write_text("pods: []\n")
    w = InotifyWatch(str(path))
    try:
        assert not _ready(w, 0.05) and not w.changed()
        (tmp_path / "other").write_text("x")               # another file in the directory
        assert _ready(w) and not w.changed()
        tmp = tmp_path / "pods.yaml.tmp"
        tmp.write_text("pods: [{name: a, pid: 1}]\n")
        assert _ready(w) and not w.changed()               # the temp file is not ours
        os.replace(tmp, path)
        assert _ready(w) and w.changed()
        with open(path, "w") as f:
            f.write("pods: []\n")
        assert _ready(w) and w.changed()
        path.unlink()
        assert _ready(w) and w.changed()
    finally:
        w.close()


def test_stat_polling_notices_a_rename_and_a_rewrite(tmp_path):
    path = tmp_path / "pods.json"
    path.write_text('{"pods": []}')
    w = StatWatch(str(path))
    assert w.fileno() is None and not w.changed()
    tmp = tmp_path / "t"
    tmp.write_text('{"pods": [{"name": "a", "pid": 2}]}')
    os.replace(tmp, path)
    assert w.changed() and not w.changed()
    path.unlink()
    assert w.changed()


def test_json_log_lines_carry_the_pod_and_the_decision():
    rec = logging.LogRecord("meshbpf.agent", logging.INFO, __file__, 1, "%s: attach (%s)",
                            ("web", "new pod"), None)
    rec.pod, rec.action, rec.reason = "web", "attach", "new pod"
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["msg"] == "web: attach (new pod)" and doc["pod"] == "web"
    assert doc["action"] == "attach" and doc["level"] == "info" and doc["ts"].endswith("Z")
