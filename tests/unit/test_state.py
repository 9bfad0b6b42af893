"""StateStore: one record per pod id, isolated per pin prefix; the index allocator."""

import pytest

import meshbpf.state as state


def test_records_roundtrip_and_isolation(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", str(tmp_path))
    a = state.StateStore("/sys/fs/bpf/meshbpf-test-a")
    b = state.StateStore("/sys/fs/bpf/meshbpf-test-b")
    a.save("p1", {"name": "p1", "mode": "ebpf", "netns_cookie": 7})
    a.save("p2", {"name": "p2", "mode": "iptables"})
    assert [r["name"] for r in a.all()] == ["p1", "p2"]
    assert b.all() == []
    assert a.load("p1")["mode"] == "ebpf" and a.load("p1")["id"] == "p1"
    assert a.id_of_cookie(7) == "p1" and a.id_of_cookie(8) is None
    a.remove("p1")
    assert a.load("p1") is None and a.id_of_cookie(7) is None
    a.destroy()
    a.remove_instance_dir()
    assert not (tmp_path / "meshbpf-test-a").exists()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 300, "a b"])
def test_pod_ids_are_file_names(bad):
    assert not state.valid_pod_id(bad)


def test_index_allocator_reuses_freed_indexes(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", str(tmp_path))
    store = state.StateStore("/sys/fs/bpf/meshbpf-test-a")
    ix = state.IndexAllocator(store, limit=4)
    assert [ix.allocate(p) for p in ("a", "b", "c")] == [1, 2, 3]
    assert ix.allocate("d") is None                   # full
    ix.release(2)
    assert ix.owner(2) is None and ix.allocate("e") == 2 and ix.owner(2) == "e"


def test_the_lock_survives_a_cleanup_that_unlinks_it(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", str(tmp_path))
    store = state.StateStore("/sys/fs/bpf/meshbpf-test-a")
    with store.locked():
        store.unlink_lock()
    with store.locked():
        assert (tmp_path / "meshbpf-test-a" / "lock").exists()
