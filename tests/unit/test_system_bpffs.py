"""bpffs is unmounted after a run only if that run mounted it and nothing is left pinned."""

import pytest

from meshbpf import system


@pytest.fixture
def fake_fs(monkeypatch):
    state = {"mounted": False, "entries": set(), "umounts": 0}

    def ensure(path=system.BPFFS):
        if state["mounted"]:
            return False
        state["mounted"] = True
        state["entries"] = {"maps.debug", "progs.debug"}   # what the kernel pins on mount
        return True

    def run(cmd, **kw):
        assert cmd[0] == "umount"
        state["mounted"], state["umounts"] = False, state["umounts"] + 1

    monkeypatch.setattr(system, "ensure_bpffs", ensure)
    monkeypatch.setattr(system, "bpffs_mounted", lambda path=system.BPFFS: state["mounted"])
    monkeypatch.setattr(system.os, "listdir", lambda path: sorted(state["entries"]))
    monkeypatch.setattr(system, "run", run)
    return state


def test_a_run_that_mounted_bpffs_unmounts_it(fake_fs):
    with system.bpffs_for_run():
        assert fake_fs["mounted"]
    assert not fake_fs["mounted"] and fake_fs["umounts"] == 1


def test_a_mount_that_was_already_there_is_kept(fake_fs):
    fake_fs["mounted"] = True
    with system.bpffs_for_run():
        pass
    assert fake_fs["mounted"] and fake_fs["umounts"] == 0


def test_pins_left_behind_keep_the_mount(fake_fs):
    with system.bpffs_for_run():
        fake_fs["entries"].add("meshbpf")
    assert fake_fs["mounted"] and fake_fs["umounts"] == 0


def test_the_mount_is_released_also_when_the_body_fails(fake_fs):
    with pytest.raises(RuntimeError):
        with system.bpffs_for_run():
            raise RuntimeError("boom")
    assert not fake_fs["mounted"]
