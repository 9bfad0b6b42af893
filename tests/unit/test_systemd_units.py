"""deploy/systemd/: the agent's and the sidecar's units pass `systemd-analyze verify` (in a
temp copy whose ExecStart points at binaries that exist here), say what the agent must
(restart always, SIGTERM to the agent only, the capabilities it needs, after the network,
/run/meshbpf kept), and the example pods file parses as the agent reads it."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from meshbpf.agent import source

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(REPO, "deploy", "systemd")


def _read(name):
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


def unit_settings(text):
    """{(section, key): [values]} of a unit file (pure; comments and blanks skipped)."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def _executable(path, body):
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def verified_copies(tmp_path):
    """The units with /usr/local/bin/{meshbpf,envoy} replaced by stand-ins that exist."""
    meshbpf = _executable(str(tmp_path / "meshbpf"),
                          f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m meshbpf \"$@\"\n")
    envoy = _executable(str(tmp_path / "envoy"), "#!/bin/sh\nexit 0\n")
    out = {}
    for name in ("meshbpf-agent.service", "envoy-sidecar.service"):
        text = _read(name).replace("/usr/local/bin/meshbpf", meshbpf) \
            .replace("/usr/local/bin/envoy", envoy)
        path = tmp_path / name
        path.write_text(text)
        out[name] = str(path)
    return out


def test_units_pass_systemd_analyze_verify(verified_copies):
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is part of systemd (make setup installs it)"
    r = subprocess.run([exe, "verify", "--man=no", *verified_copies.values()],
                       capture_output=True, text=True, timeout=120, check=False)
    # Only complaints about the units themselves count (not about the machine's other units).
    ours = [l for l in (r.stdout + r.stderr).splitlines()
            if any(os.path.basename(p) in l for p in verified_copies.values())]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr


def test_verify_catches_a_missing_binary(tmp_path):
    """The check above has teeth: an ExecStart binary that does not exist fails it."""
    missing = str(tmp_path / "no-such-meshbpf")
    path = tmp_path / "meshbpf-agent.service"
    path.write_text(_read("meshbpf-agent.service").replace("/usr/local/bin/meshbpf", missing))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0 and missing in r.stdout + r.stderr


def test_the_agent_unit_keeps_interception_across_restarts():
    s = unit_settings(_read("meshbpf-agent.service"))
    start = s[("Service", "ExecStart")][0].split()
    assert start[1:4] == ["daemon", "--pods-file", "/etc/meshbpf/pods.yaml"]
    assert "--cleanup-on-exit" not in start                 # SIGTERM leaves interception
    assert s[("Service", "Restart")] == ["always"]
    assert s[("Service", "KillMode")] == ["mixed"] and s[("Service", "KillSignal")] == ["SIGTERM"]
    assert "network-online.target" in s[("Unit", "After")][0]
    assert s[("Service", "RuntimeDirectory")] == ["meshbpf"]
    assert s[("Service", "RuntimeDirectoryPreserve")] == ["yes"]
    caps = set(s[("Service", "CapabilityBoundingSet")][0].split())
    assert {"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON"} <= caps
    text = _read("meshbpf-agent.service")
    for cap in caps:                                       # each one says why
        assert f"#   {cap} " in text, cap


def test_the_sidecar_unit_runs_envoy_as_the_proxy_uid():
    s = unit_settings(_read("envoy-sidecar.service"))
    assert s[("Service", "User")] == ["1337"] and s[("Service", "Group")] == ["1337"]
    assert s[("Service", "Restart")] == ["always"]


def test_the_example_pods_file_parses_as_a_host_workload():
    pods, errors = source.parse(_read("pods.yaml"))
    assert errors == []
    (vm,) = pods.values()
    assert vm.host is True and vm.netns == "/proc/1/ns/net"
    assert vm.cgroup == "/sys/fs/cgroup/app.slice" and vm.inbound_interfaces == ("eth0",)
    assert vm.config.inbound_ports_include == "8080"
