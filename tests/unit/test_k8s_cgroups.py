"""meshbpf.k8s.cgroups: finding the kubepods cgroup for both cgroup drivers (pure, on
relative paths) and on fake cgroup trees (directories with a cgroup.procs file), and what
the daemon's --cgroup-root keywords resolve to. No root, no real cgroup."""

import os

import pytest

from meshbpf.errors import NotFoundError, UsageError
from meshbpf.k8s import cgroups

CGROUPFS = ["init.scope", "system.slice", "system.slice/containerd.service", "kubepods",
            "kubepods/burstable", "kubepods/burstable/pod1234", "kubepods/besteffort",
            "kubepods/pod99"]
SYSTEMD = ["init.scope", "system.slice", "system.slice/kubelet.service", "user.slice",
           "kubepods.slice", "kubepods.slice/kubepods-burstable.slice",
           "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice"]


def test_cgroupfs_and_systemd_drivers():
    assert cgroups.find_kubepods(CGROUPFS) == "kubepods"
    assert cgroups.find_kubepods(SYSTEMD) == "kubepods.slice"
    assert cgroups.driver_of("kubepods") == "cgroupfs"
    assert cgroups.driver_of("kubepods.slice") == "systemd"


def test_a_kubelet_cgroup_root_moves_it_down():
    # kind and kubelets with --cgroup-root: systemd names the nested slice <parent>-kubepods
    assert cgroups.find_kubepods(["kubelet.slice", "kubelet.slice/kubelet-kubepods.slice",
                                  "kubelet.slice/kubelet-kubepods.slice/"
                                  "kubelet-kubepods-besteffort.slice"]) == \
        "kubelet.slice/kubelet-kubepods.slice"
    assert cgroups.find_kubepods(["/kubelet/", "/kubelet/kubepods/"]) == "kubelet/kubepods"


def test_shallowest_wins_and_nothing_below_kubepods_counts():
    dirs = ["kubepods", "kubepods/burstable/kubepods", "a/b/kubepods.slice"]
    assert cgroups.find_kubepods(dirs) == "kubepods"
    # a cgroup named like it, below a kubepods one, is not a second candidate
    assert cgroups.find_kubepods(["x/kubepods", "x/kubepods/kubepods.slice"]) == "x/kubepods"


def test_none_too_deep_or_ambiguous_are_clear_errors():
    with pytest.raises(NotFoundError, match="no kubepods cgroup"):
        cgroups.find_kubepods(["init.scope", "system.slice", "kubepods-burstable.slice",
                               "kubepodsx"])
    with pytest.raises(NotFoundError):
        cgroups.find_kubepods(["a/b/c/kubepods"])           # deeper than MAX_DEPTH
    with pytest.raises(UsageError, match="kubepods, kubepods.slice"):
        cgroups.find_kubepods(["kubepods.slice", "kubepods"])  # a node that changed driver


def tree(root, dirs, cgroup=True):
    """A fake cgroup tree: each dir with a cgroup.procs file (unless `cgroup` is False)."""
    for d in [""] + list(dirs):
        path = os.path.join(root, d)
        os.makedirs(path, exist_ok=True)
        if cgroup:
            open(os.path.join(path, "cgroup.procs"), "w").close()
    return str(root)


@pytest.mark.parametrize("dirs,want", [(CGROUPFS, "kubepods"), (SYSTEMD, "kubepods.slice")])
def test_kubepods_cgroup_on_fake_trees(tmp_path, dirs, want):
    root = tree(tmp_path / "cg", dirs)
    assert cgroups.kubepods_cgroup(root) == os.path.join(root, want)


def test_kubepods_cgroup_ignores_plain_directories_and_files(tmp_path):
    root = tree(tmp_path / "cg", ["system.slice"])
    os.makedirs(os.path.join(root, "kubepods"))                 # no cgroup.procs
    open(os.path.join(root, "kubepods.slice"), "w").close()      # a file
    with pytest.raises(NotFoundError):
        cgroups.kubepods_cgroup(root)
    with pytest.raises(UsageError, match="not a cgroup v2 directory"):
        cgroups.kubepods_cgroup(str(tmp_path))


def test_kubepods_cgroup_does_not_walk_below_kubepods(tmp_path, monkeypatch):
    root = tree(tmp_path / "cg", ["kubepods", "kubepods/burstable", "kubepods/burstable/p1"])
    seen = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: seen.append(p) or real(p))
    assert cgroups.kubepods_cgroup(root) == os.path.join(root, "kubepods")
    assert [os.path.relpath(p, root) for p in seen] == ["."], seen


def test_resolve_keeps_paths_and_none_and_resolves_keywords(tmp_path):
    k8s = tree(tmp_path / "k8s", SYSTEMD)
    plain = tree(tmp_path / "plain", ["system.slice"])
    assert cgroups.resolve_cgroup_root(None, base=k8s) is None     # old default kept
    assert cgroups.resolve_cgroup_root("/sys/fs/cgroup/x", base=k8s) == "/sys/fs/cgroup/x"
    assert cgroups.resolve_cgroup_root("kubepods", base=k8s) == os.path.join(k8s, "kubepods.slice")
    assert cgroups.resolve_cgroup_root("auto", base=k8s) == os.path.join(k8s, "kubepods.slice")
    assert cgroups.resolve_cgroup_root("auto", base=plain) is None
    with pytest.raises(NotFoundError):
        cgroups.resolve_cgroup_root("kubepods", base=plain)


def _daemon(args, monkeypatch, mount, tmp_path):
    """`meshbpf daemon` up to the service it would start: (exit code, output, the
    cgroup_root the service got or None)."""
    from click.testing import CliRunner

    import meshbpf.service
    from meshbpf import system
    from meshbpf.cli import main
    from meshbpf.errors import MeshbpfError
    got = {}

    class Stop(MeshbpfError):
        pass

    def service(**kw):
        got.update(kw)
        raise Stop("stopped before starting anything")
    monkeypatch.setattr(system, "cgroup2_mount", lambda: mount)
    monkeypatch.setattr(meshbpf.service, "NodeService", service)
    pods = tmp_path / "pods.yaml"
    pods.write_text("pods: []\n")
    r = CliRunner().invoke(main, ["daemon", "--pods-file", str(pods), *args])
    return r.exit_code, r.output, got.get("cgroup_root", "not started")


def test_daemon_cgroup_root_keywords(tmp_path, monkeypatch):
    k8s = tree(tmp_path / "k8s", CGROUPFS)
    code, out, root = _daemon(["--cgroup-root", "kubepods"], monkeypatch, k8s, tmp_path)
    assert root == os.path.join(k8s, "kubepods"), out
    code, out, root = _daemon(["--cgroup-root", "auto"], monkeypatch, k8s, tmp_path)
    assert root == os.path.join(k8s, "kubepods"), out
    code, out, root = _daemon([], monkeypatch, k8s, tmp_path)
    assert root is None, out                            # no option: as before
    code, out, root = _daemon(["--cgroup-root", "/sys/fs/cgroup/mine"], monkeypatch, k8s,
                              tmp_path)
    assert root == "/sys/fs/cgroup/mine", out           # a path: as given


def test_daemon_kubepods_on_a_node_without_one_is_a_clear_error(tmp_path, monkeypatch):
    plain = tree(tmp_path / "plain", ["system.slice", "user.slice"])
    code, out, root = _daemon(["--cgroup-root", "kubepods"], monkeypatch, plain, tmp_path)
    assert (code, root) == (3, "not started"), out
    assert "no kubepods cgroup" in out and "Traceback" not in out
    code, out, root = _daemon(["--cgroup-root", "auto"], monkeypatch, plain, tmp_path)
    assert root is None, out                            # auto: the root, as without it
