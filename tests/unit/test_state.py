"""StateStore: one record per pod, isolated per pin prefix."""


import meshbpf.state as state


def test_records_roundtrip_and_isolation(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", str(tmp_path))
    a = state.StateStore("/sys/fs/bpf/meshbpf-test-a")
    b = state.StateStore("/sys/fs/bpf/meshbpf-test-b")
    a.save(11, {"name": "p1", "mode": "ebpf"})
    a.save(12, {"name": "p2", "mode": "iptables"})
    assert [r["name"] for r in a.all()] == ["p1", "p2"]
    assert b.all() == []
    assert a.load(11)["mode"] == "ebpf" and a.load(11)["key"] == 11
    a.remove(11)
    assert a.load(11) is None
    a.destroy()
    assert not (tmp_path / "meshbpf-test-a").exists()
