"""Pure parts of meshbpf.testbed.node: run ids, netns-name parsing, stale-owner logic; no root."""

import os
import subprocess

from meshbpf.testbed import node


def test_run_ids_are_unique_and_carry_our_pid():
    ids = {node._new_id() for _ in range(50)}
    assert len(ids) == 50
    for rid in ids:
        m = node._ID_RE.match(rid)
        assert m and int(m.group(1)) == os.getpid()


def test_run_id_of_netns_names():
    assert node._run_id_of("mbt-123-4-node") == "mbt-123-4"
    assert node._run_id_of("mbt-123-4-a-1") == "mbt-123-4"
    assert node._run_id_of("mbt-123-node") is None
    assert node._run_id_of("cni-1234") is None
    assert node._run_id_of("mbt-x-4-a") is None


def test_owner_alive(tmp_path, monkeypatch):
    leftover = tmp_path / "x"
    leftover.mkdir()
    # we started before the leftover was made: alive
    assert node._owner_alive(os.getpid(), [str(leftover)])
    # a dead pid
    p = subprocess.Popen(["true"])
    p.wait()
    assert not node._owner_alive(p.pid, [str(leftover)])
    # a live process that started long after the leftover was made: its pid was reused
    made = os.lstat(leftover).st_ctime
    monkeypatch.setattr(node, "_process_start_time", lambda pid: made + 3600)
    assert not node._owner_alive(os.getpid(), [str(leftover)])
    monkeypatch.setattr(node, "_process_start_time", lambda pid: made - 5)
    assert node._owner_alive(os.getpid(), [str(leftover)])


def test_process_start_time_is_plausible():
    import time
    started = node._process_start_time(os.getpid())
    assert started is not None and started <= time.time() + 1
    assert node._process_start_time(2 ** 22 + 12345) is None
