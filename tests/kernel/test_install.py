"""`pip install .` (not editable) gives a working `meshbpf`: the wheel carries the C sources
as package data, and the installed command probes and attaches/detaches a sandbox pod."""

import json
import os
import subprocess
import sys

import pytest

from meshbpf.ebpf import loader
from meshbpf.testbed import Sandbox

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd, **kw):
    # Without our PYTHONPATH: with the checkout on it, pip takes the checkout's egg-info for
    # an installed meshbpf (and installs nothing), and the command would run its code.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp / "dist"), REPO])
    wheel = next((tmp / "dist").glob("meshbpf-*.whl"))
    # bcc comes from Debian's python3-bpfcc: the venv sees the system site packages
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(tmp / "venv")])
    run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         str(wheel)])
    return tmp / "venv" / "bin" / "meshbpf", wheel


def test_the_wheel_ships_the_c_sources(installed):
    import zipfile
    names = zipfile.ZipFile(installed[1]).namelist()
    assert "meshbpf/bpf/lib/types.h" in names and "meshbpf/bpf/connect4.c" in names
    headers = {"meshbpf/bpf/lib/" + h for h in os.listdir(os.path.join(loader.BPF_DIR, "lib"))}
    assert headers <= set(names)


def test_installed_meshbpf_probes_and_attaches(installed, tmp_path):
    exe = str(installed[0])
    # outside the checkout, so nothing can be found from the repository
    probe = json.loads(run([exe, "probe", "-o", "json"], cwd=tmp_path).stdout)
    assert probe["mode"] == "ebpf", probe
    with Sandbox(name="install") as sb:
        a = sb.add_pod("a")
        node = ["--pin-prefix", sb.pin_prefix, "--cgroup-root", sb.cgroup_root]
        pod = ["--netns", a.netns, "--cgroup", a.cgroup]
        try:
            run([exe, "attach", *pod, *node, "--mode", "ebpf"], cwd=tmp_path)
            st = json.loads(run([exe, "status", "-o", "json", *node], cwd=tmp_path).stdout)
            assert st["ebpf"]["loaded"] is True, st
            assert [p["netns"] for p in st["pods"]] == [a.netns], st
            run([exe, "detach", *pod, *node], cwd=tmp_path)
        finally:
            run([exe, "cleanup", *node], cwd=tmp_path)
        assert not os.path.exists(sb.pin_prefix)
