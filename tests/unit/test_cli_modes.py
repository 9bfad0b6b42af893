"""The CLI's error handling and the mode choice / runtime fallback, without root."""

import pytest
from click.testing import CliRunner

from meshbpf import backends, service
from meshbpf.cli import main
from meshbpf.config import InterceptConfig
from meshbpf.errors import ApplyError, UsageError


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,code,needle", [
    (["attach"], 2, "exactly one of --pid or --netns"),
    (["attach", "--pid", "1", "--netns", "x"], 2, "exactly one of --pid or --netns"),
    (["attach", "--netns", "/run/netns/mbt-no-such-ns"], 3, "does not exist"),
    (["attach", "--pid", "999999999"], 3, "no process with pid"),
    (["attach", "--netns", "x", "-x", "10.0.0.0/33"], 2, "not a valid CIDR"),
    (["detach", "--netns", "/run/netns/mbt-no-such-ns"], 3, "does not exist"),
])
def test_user_mistakes_are_one_line_errors_with_meaningful_exit_codes(args, code, needle):
    r = run(*args)
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_help_has_examples():
    for cmd in ([], ["attach"], ["detach"], ["status"], ["cleanup"], ["probe"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


class FakeInterceptor:
    calls = []

    def __init__(self, mode, fail=False, **kw):
        self.mode, self.fail, self.kw = mode, fail, kw

    def attach(self, pod, config, previous=None, ctx=None):
        FakeInterceptor.calls.append((self.mode, self.kw))
        if self.fail:
            raise ApplyError("cannot load programs")
        return {"config": config.to_dict()}


class FakePod:
    name, id, netns, cgroup, netns_cookie, pod_id = "p", None, "/run/netns/p", None, 42, "p-42"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    import meshbpf.state as state
    monkeypatch.setattr(state, "STATE_ROOT", str(tmp_path))
    FakeInterceptor.calls = []

    def install(ebpf_fails=False, probe_mode="ebpf"):
        real = backends.OPTIONS

        def fake_backend(m, **kw):
            keep = real[m] + ("pin_prefix", "cgroup_root")
            return FakeInterceptor(m, fail=(m == "ebpf" and ebpf_fails),
                                   **{k: v for k, v in kw.items() if k in keep})
        monkeypatch.setattr(backends, "backend", fake_backend)
        monkeypatch.setattr(service, "_PROBES", {})
        import meshbpf.probe as probe
        monkeypatch.setattr(probe, "probe", lambda assume_kernel=None: {
            "mode": probe_mode, "reason": f"probe says {probe_mode}"})
    return install


def test_auto_follows_the_probe(fake):
    fake(probe_mode="iptables")
    rec = service.NodeService(mode="auto", pin_prefix="/x/p").attach(FakePod(), InterceptConfig())
    assert rec["mode"] == "iptables" and rec["reason"] == "probe says iptables"
    assert rec["fallback"] is None


def test_auto_falls_back_to_iptables_when_ebpf_fails_at_run_time(fake):
    fake(ebpf_fails=True)
    rec = service.NodeService(mode="auto", pin_prefix="/x/p", splice=True,
                              iptables_binary=None).attach(FakePod(), InterceptConfig())
    assert [c[0] for c in FakeInterceptor.calls] == ["ebpf", "iptables"]
    assert rec["mode"] == "iptables"
    assert "cannot load programs" in rec["fallback"] and "fell back to iptables" in rec["fallback"]
    # each interceptor gets only the options it understands
    assert "splice" not in FakeInterceptor.calls[1][1]


def test_a_forced_mode_never_falls_back(fake):
    fake(ebpf_fails=True)
    with pytest.raises(ApplyError):
        service.NodeService(mode="ebpf", pin_prefix="/x/p").attach(FakePod(), InterceptConfig())
    assert [c[0] for c in FakeInterceptor.calls] == ["ebpf"]


def test_an_address_another_pod_holds_never_falls_back(fake, monkeypatch):
    from meshbpf.errors import AddressInUseError

    def held(self, pod, config, previous=None, ctx=None):
        FakeInterceptor.calls.append((self.mode, self.kw))
        if self.mode == "ebpf":
            raise AddressInUseError("10.0.0.1 is held by pod a")
        return {}
    monkeypatch.setattr(FakeInterceptor, "attach", held)
    fake()
    with pytest.raises(AddressInUseError) as e:
        service.NodeService(mode="auto", pin_prefix="/x/p").attach(FakePod(), InterceptConfig())
    assert e.value.exit_code == 2
    assert [c[0] for c in FakeInterceptor.calls] == ["ebpf"]


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError):
        service.NodeService(mode="bpf")


def test_the_probe_runs_once_per_node_and_boot(fake, monkeypatch):
    fake(probe_mode="iptables")
    import meshbpf.probe as probe
    runs = []
    monkeypatch.setattr(probe, "probe", lambda assume_kernel=None: runs.append(1) or {
        "mode": "iptables", "reason": "probe says iptables"})
    for _ in range(3):
        service.NodeService(pin_prefix="/x/p").attach(FakePod(), InterceptConfig())
    assert runs == [1]
    monkeypatch.setattr(service, "_PROBES", {})        # a new process: the node's cache
    service.NodeService(pin_prefix="/x/p").attach(FakePod(), InterceptConfig())
    assert runs == [1]


def test_records_are_keyed_by_pod_id_and_saved_once(fake):
    fake(probe_mode="iptables")
    svc = service.NodeService(pin_prefix="/x/p")
    rec = svc.attach(FakePod(), InterceptConfig(), pod_id="uid-1")
    assert rec["id"] == "uid-1" and svc.store.load("uid-1")["mode"] == "iptables"
    assert svc.store.id_of_cookie(42) == "uid-1"
    with pytest.raises(UsageError):         # the same netns under another id
        svc.attach(FakePod(), InterceptConfig(), pod_id="uid-2")
    with pytest.raises(UsageError):
        svc.attach(FakePod(), InterceptConfig(), pod_id="../etc")
