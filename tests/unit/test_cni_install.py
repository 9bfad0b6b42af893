"""`meshbpf cni install|uninstall` into a test root (a bin dir and a conf dir in tmp):
chained at the end of the node's first configuration, idempotent (a second run leaves
every byte), a .conf converted to a .conflist, uninstall restoring the original bytes;
bad input refused with nothing changed; the installed plugin runs as the runtime runs it."""

import json
import os
import subprocess
import sys

import pytest

from meshbpf.cni import install

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CALICO = b"""{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"""
BRIDGE_CONF = b'{"cniVersion": "1.0.0", "name": "mynet", "type": "bridge", "bridge": "cni0",\n' \
              b' "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}\n'


def snapshot(*dirs):
    out = {}
    for d in dirs:
        for n in sorted(os.listdir(d)):
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.join(os.path.basename(d), n)] = (f.read(), os.stat(os.path.join(d, n)).st_mode)
    return out


@pytest.fixture
def root(tmp_path):
    b, c = tmp_path / "bin", tmp_path / "net.d"
    b.mkdir()
    c.mkdir()
    (b / "bridge").write_text("#!/bin/sh\n")
    return str(b), str(c)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "meshbpf", "cni", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=60)


def test_install_chains_at_the_end_idempotently_and_uninstall_restores_bytes(root):
    bin_dir, conf_dir = root
    with open(os.path.join(conf_dir, "10-calico.conflist"), "wb") as f:
        f.write(CALICO)
    with open(os.path.join(conf_dir, "99-other.conflist"), "wb") as f:
        f.write(b'{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]}')
    before = snapshot(bin_dir, conf_dir)
    r = cli("install", "--bin-dir", bin_dir, "--conf-dir", conf_dir, "--agent-socket",
            "/run/meshbpf/cni.sock", "--python", sys.executable, "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.load(open(os.path.join(conf_dir, "10-calico.conflist")))
    assert [p["type"] for p in doc["plugins"]] == ["calico", "portmap", "meshbpf-cni"]
    assert doc["plugins"][-1] == {"type": "meshbpf-cni", "agent_socket": "/run/meshbpf/cni.sock"}
    assert doc["name"] == "k8s-pod-network" and doc["cniVersion"] == "0.3.1"
    other = json.load(open(os.path.join(conf_dir, "99-other.conflist")))
    assert [p["type"] for p in other["plugins"]] == ["ptp"]          # only the first is the node's
    plugin = os.path.join(bin_dir, "meshbpf-cni")
    assert os.access(plugin, os.X_OK)
    assert open(plugin).readline() == f"#!{sys.executable} -I\n"
    once = snapshot(bin_dir, conf_dir)
    r2 = cli("install", "--bin-dir", bin_dir, "--conf-dir", conf_dir, "--agent-socket",
             "/run/meshbpf/cni.sock", "--python", sys.executable, "-o", "json")
    assert r2.returncode == 0 and json.loads(r2.stdout)["written"] == []
    assert snapshot(bin_dir, conf_dir) == once                        # same bytes
    r = cli("uninstall", "--bin-dir", bin_dir, "--conf-dir", conf_dir)
    assert r.returncode == 0, r.stderr
    assert snapshot(bin_dir, conf_dir) == before
    assert cli("uninstall", "--bin-dir", bin_dir, "--conf-dir", conf_dir).returncode == 0
    assert snapshot(bin_dir, conf_dir) == before


def test_a_plain_conf_becomes_a_conflist_and_comes_back(root):
    bin_dir, conf_dir = root
    with open(os.path.join(conf_dir, "10-mynet.conf"), "wb") as f:
        f.write(BRIDGE_CONF)
    before = snapshot(bin_dir, conf_dir)
    r = install.install(bin_dir, conf_dir, python=sys.executable, fail_open=True)
    assert r["written"] == ["10-mynet.conf.meshbpf-orig", "10-mynet.conflist"]
    assert r["removed"] == ["10-mynet.conf"]
    assert sorted(os.listdir(conf_dir)) == ["10-mynet.conf.meshbpf-orig", "10-mynet.conflist"]
    doc = json.load(open(os.path.join(conf_dir, "10-mynet.conflist")))
    assert doc == {"cniVersion": "1.0.0", "name": "mynet", "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}},
        {"type": "meshbpf-cni", "fail_open": True}]}
    once = snapshot(bin_dir, conf_dir)
    install.install(bin_dir, conf_dir, python=sys.executable, fail_open=True)
    assert snapshot(bin_dir, conf_dir) == once
    install.uninstall(bin_dir, conf_dir)
    assert snapshot(bin_dir, conf_dir) == before


def test_uninstall_after_the_node_rewrote_its_file_only_removes_the_entry(root):
    bin_dir, conf_dir = root
    path = os.path.join(conf_dir, "10-calico.conflist")
    with open(path, "wb") as f:
        f.write(CALICO)
    install.install(bin_dir, conf_dir, python=sys.executable)
    doc = json.load(open(path))
    doc["plugins"].insert(0, {"type": "bandwidth"})                     # the node's CNI changed it
    with open(path, "w") as f:
        json.dump(doc, f)
    install.uninstall(bin_dir, conf_dir)
    assert [p["type"] for p in json.load(open(path))["plugins"]] == ["bandwidth", "calico", "portmap"]
    assert os.listdir(conf_dir) == ["10-calico.conflist"]


@pytest.mark.parametrize("files,words", [
    ({}, "no CNI network configuration"),
    ({"10-a.conflist": b"{nope"}, "not JSON"),
    ({"10-a.conf": b'{"name": "x"}'}, "not a CNI configuration"),
    ({"10-a.conflist": b'{"name": "x", "plugins": 3}'}, "not a CNI configuration"),
    ({"10-a.conflist": b'{"name": "x", "cniVersion": "1.1.0", "plugins": []}'}, "1.1.0"),
])
def test_bad_configuration_is_refused_and_nothing_changes(root, files, words):
    bin_dir, conf_dir = root
    for n, data in files.items():
        with open(os.path.join(conf_dir, n), "wb") as f:
            f.write(data)
    before = snapshot(bin_dir, conf_dir)
    r = cli("install", "--bin-dir", bin_dir, "--conf-dir", conf_dir, "--python", sys.executable)
    assert r.returncode in (2, 3) and words in r.stderr and "Traceback" not in r.stderr
    assert snapshot(bin_dir, conf_dir) == before


def test_missing_directories_are_clear_errors(tmp_path):
    r = cli("install", "--bin-dir", str(tmp_path / "no"), "--conf-dir", str(tmp_path))
    assert r.returncode == 3 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_the_installed_plugin_runs_as_the_runtime_runs_it(root):
    bin_dir, conf_dir = root
    with open(os.path.join(conf_dir, "10-mynet.conf"), "wb") as f:
        f.write(BRIDGE_CONF)
    install.install(bin_dir, conf_dir, python=sys.executable)
    # no PYTHONPATH, an unrelated cwd: the file is self-contained
    r = subprocess.run([os.path.join(bin_dir, "meshbpf-cni")], input='{"cniVersion": "1.0.0"}',
                       env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, cwd="/",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["supportedVersions"][-1] == "1.0.0"


def test_plan_is_pure_and_puts_the_entry_last_once():
    files = {"05-a.conflist": CALICO}
    writes, removes = install.plan_install(files, install.plugin_entry())
    doc = json.loads(writes["05-a.conflist"])
    again, _ = install.plan_install(dict(files, **writes), install.plugin_entry(log_level="debug"))
    plugins = json.loads(again["05-a.conflist"])["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "portmap", "meshbpf-cni"]
    assert plugins[-1]["log_level"] == "debug" and removes == []
    assert "05-a.conflist.meshbpf-orig" not in again                   # the first backup stays
    assert doc["plugins"][-1] == {"type": "meshbpf-cni"}
