"""find_pod() on fake /proc and cgroup trees: both kubelet cgroup drivers, containerd and
CRI-O naming, the sandbox chosen when processes disagree, conmon and the node's netns
never chosen, and clear errors when the pod is missing or has no process."""

import logging
import os

import pytest

from meshbpf.errors import (
    MeshbpfError,
    NotFoundError,
    PodNotFoundError,
    PodNotRunningError,
    UsageError,
)
from meshbpf.k8s import locate
from meshbpf.k8s.locate import (
    ContainerDir,
    Proc,
    candidate_paths,
    choose_netns,
    find_pod,
    netns_ident,
    parse_container_dir,
    pod_dir_names,
    start_time,
    uid_of_pod_dir,
)

UID = "5f0c1b2a-7e3d-4c9b-8a61-0d2e4f6a8b1c"
U_ = UID.replace("-", "_")
CID = "a" * 64
CID2 = "b" * 64
HOST_NS = 4026531840


# ---- pure parsing ---------------------------------------------------------------------------

def test_pod_dir_names_and_candidates_cover_both_drivers():
    assert pod_dir_names(UID) == (f"pod{UID}", f"kubepods-pod{U_}.slice",
                                  f"kubepods-burstable-pod{U_}.slice",
                                  f"kubepods-besteffort-pod{U_}.slice")
    assert candidate_paths(UID) == [
        f"kubepods/pod{UID}", f"kubepods/burstable/pod{UID}", f"kubepods/besteffort/pod{UID}",
        f"kubepods.slice/kubepods-pod{U_}.slice",
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice",
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"]
    assert pod_dir_names(U_) == pod_dir_names(UID)      # an escaped uid is the same pod


@pytest.mark.parametrize("name,uid", [
    (f"pod{UID}", UID),
    (f"kubepods-pod{U_}.slice", UID),
    (f"kubepods-burstable-pod{U_}.slice", UID),
    (f"kubepods-besteffort-pod{U_}.slice", UID),
    ("podd41d8cd98f00b204e9800998ecf8427e", "d41d8cd98f00b204e9800998ecf8427e"),  # static pod
    ("kubepods-burstable.slice", None), ("kubepods.slice", None), ("burstable", None),
    (f"kubelet-kubepods-burstable-pod{U_}.slice", UID),     # kind: --cgroup-root=/kubelet
    (f"pod{U_}", None), (f"kubepods-pod{UID}.slice", None), (f"pod{UID}.slice", None),
    ("pods", None), (f"cri-containerd-{CID}.scope", None),
])
def test_uid_of_pod_dir(name, uid):
    assert uid_of_pod_dir(name) == uid


@pytest.mark.parametrize("name,want", [
    (f"cri-containerd-{CID}.scope", ContainerDir("containerd", CID)),
    (CID, ContainerDir("containerd", CID)),
    (f"crio-{CID}.scope", ContainerDir("cri-o", CID)),
    (f"crio-{CID}", ContainerDir("cri-o", CID)),
    (f"crio-conmon-{CID}.scope", ContainerDir("cri-o", CID, monitor=True)),
    (f"docker-{CID}.scope", ContainerDir("docker", CID)),
    ("cgroup.procs", None), ("init.scope", None), ("crio-", None),
])
def test_parse_container_dir(name, want):
    assert parse_container_dir(name) == want


@pytest.mark.parametrize("bad", ["", "../../etc", "a/b", "pod uid", None, 12, "x" * 200])
def test_bad_uid_is_a_usage_error(bad, tmp_path):
    with pytest.raises(UsageError):
        find_pod(bad, proc_root=str(tmp_path), cgroup_root=str(tmp_path))


def test_proc_text_parsing():
    assert netns_ident("net:[4026532281]") == 4026532281
    assert netns_ident("mnt:[1]") is None and netns_ident("") is None
    stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 10 1"
    assert start_time(stat) == 987654
    assert start_time("garbage") is None


def test_choose_netns_oldest_wins_and_host_never():
    sandbox, app, odd = Proc(10, 100, 7), Proc(11, 200, 7), Proc(12, 300, 8)
    conmon = Proc(9, 50, HOST_NS)
    assert choose_netns([odd, app, conmon, sandbox], {HOST_NS}) == (sandbox, [odd])
    assert choose_netns([odd, app, conmon, sandbox], {HOST_NS, 7}) == (odd, [])
    assert choose_netns([conmon], {HOST_NS}) == (None, [])
    assert choose_netns([], {HOST_NS}) == (None, [])


# ---- fake trees -----------------------------------------------------------------------------

class Node:
    """A fake host: <tmp>/proc/<pid>/{ns/net,stat} and <tmp>/cgroup/..."""

    def __init__(self, tmp):
        self.proc = tmp / "proc"
        self.cg = tmp / "cgroup"
        self.cg.mkdir()
        self.process(1, HOST_NS, started=1)

    def process(self, pid, ns, started):
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        os.symlink(f"net:[{ns}]", d / "ns" / "net")       # what readlink shows on /proc
        (d / "stat").write_text(f"{pid} (proc) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 "
                                f"{started} 1000 10\n")

    def cgroup(self, rel, pids=()):
        d = self.cg / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        return str(d)


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


LAYOUTS = {
    # kubelet cgroupfs driver, containerd: bare container ids
    "cgroupfs-containerd-burstable": (f"kubepods/burstable/pod{UID}", [CID, CID2]),
    "cgroupfs-containerd-guaranteed": (f"kubepods/pod{UID}", [CID, CID2]),
    # kubelet cgroupfs driver, CRI-O: crio-<id>
    "cgroupfs-crio-besteffort": (f"kubepods/besteffort/pod{UID}", [f"crio-{CID}", f"crio-{CID2}"]),
    # kubelet systemd driver, containerd
    "systemd-containerd-burstable": (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice",
        [f"cri-containerd-{CID}.scope", f"cri-containerd-{CID2}.scope"]),
    "systemd-containerd-guaranteed": (f"kubepods.slice/kubepods-pod{U_}.slice",
                                      [f"cri-containerd-{CID}.scope", f"cri-containerd-{CID2}.scope"]),
    # kubelet systemd driver, CRI-O
    "systemd-crio-besteffort": (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice",
        [f"crio-{CID}.scope", f"crio-{CID2}.scope"]),
    # kind: kubelet's cgroups under the node container's own cgroup
    "nested-kind-systemd": (
        (f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
         f"kubelet-kubepods-burstable-pod{U_}.slice"), [f"cri-containerd-{CID}.scope"]),
    "nested-cgroupfs": (f"system.slice/containerd.service/kubepods/pod{UID}", [CID]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_find_pod_every_layout(node, layout):
    rel, containers = LAYOUTS[layout]
    pod = node.cgroup(rel)
    node.process(100, 4026532001, started=500)      # the sandbox (pause)
    node.process(101, 4026532001, started=900)      # the app
    node.cgroup(f"{rel}/{containers[0]}", [100])
    if len(containers) > 1:
        node.cgroup(f"{rel}/{containers[1]}", [101])
    # another pod and other units on the node
    node.cgroup(f"kubepods/burstable/pod{'0' * 8}-0000-4000-8000-{'0' * 12}/{CID2}", [200])
    node.process(200, 4026532999, started=10)
    node.cgroup("system.slice/kubelet.service", [1])
    assert find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg)) == \
        (os.path.join(str(node.proc), "100", "ns", "net"), pod)
    assert find_pod(U_, proc_root=str(node.proc), cgroup_root=str(node.cg))[1] == pod


def test_crio_conmon_in_pod_cgroup_never_chosen(node):
    rel = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice"
    node.cgroup(rel)
    node.process(50, HOST_NS, started=100)          # conmon: older than the pause, host netns
    node.cgroup(f"{rel}/crio-conmon-{CID}.scope", [50])
    with pytest.raises(PodNotRunningError):
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))
    node.process(60, 4026532001, started=200)
    node.cgroup(f"{rel}/crio-{CID}.scope", [60])
    assert find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))[0].endswith("/60/ns/net")


def test_host_netns_process_in_container_scope_never_chosen(node):
    rel = f"kubepods/pod{UID}"
    node.cgroup(f"{rel}/{CID}", [1])                # e.g. a hostNetwork pod: the node's netns
    with pytest.raises(PodNotRunningError):
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))


def test_disagreeing_processes_sandbox_wins_with_warning(node, caplog):
    rel = f"kubepods/burstable/pod{UID}"
    node.process(100, 4026532001, started=500)      # the sandbox
    node.process(101, 4026532555, started=900)      # an app that unshared its own netns
    node.cgroup(f"{rel}/{CID2}", [101])
    node.cgroup(f"{rel}/{CID}", [100])
    with caplog.at_level(logging.WARNING, logger="meshbpf.k8s.locate"):
        netns, _ = find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))
    assert netns.endswith("/100/ns/net")
    assert "101" in caplog.text and "other network namespaces" in caplog.text


def test_exited_process_skipped(node):
    rel = f"kubepods/pod{UID}"
    node.process(100, 4026532001, started=500)
    node.cgroup(f"{rel}/{CID}", [99, 100])          # 99 exited: no /proc/99
    assert find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))[0].endswith("/100/ns/net")


def test_not_found_and_not_running(node):
    with pytest.raises(PodNotFoundError) as e:
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))
    assert UID in str(e.value) and isinstance(e.value, NotFoundError) and e.value.exit_code == 3
    node.cgroup(f"kubepods/pod{UID}")               # created, sandbox not started yet
    with pytest.raises(PodNotRunningError) as e:
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))
    assert UID in str(e.value)


def test_pod_in_two_places_is_an_error(node):
    node.cgroup(f"a/kubepods/pod{UID}")
    node.cgroup(f"b/kubepods/pod{UID}")
    with pytest.raises(MeshbpfError, match="several cgroups"):
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))


def test_walk_does_not_descend_into_other_pods(node, monkeypatch):
    seen = []
    real = os.scandir

    def spy(path):
        seen.append(str(path))
        return real(path)
    monkeypatch.setattr(locate.os, "scandir", spy)
    other = node.cgroup(f"x/kubepods/pod{'1' * 8}-1111-4111-8111-{'1' * 12}/{CID}")
    node.cgroup(f"x/kubepods/pod{UID}")
    locate.find_pod_cgroup(UID, str(node.cg))
    assert os.path.dirname(other) not in seen


def test_agent_own_netns_is_the_node_too(node):
    # pid 1 unreadable (here: absent); the agent's own netns (hostNetwork) is the node's.
    import shutil
    shutil.rmtree(node.proc / "1")
    node.process(77, HOST_NS, started=5)
    os.symlink("77", node.proc / "self")
    rel = f"kubepods/pod{UID}"
    node.process(100, 4026532001, started=500)
    node.cgroup(f"{rel}/{CID}", [77])
    with pytest.raises(PodNotRunningError):
        find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))
    node.cgroup(f"{rel}/{CID2}", [100])
    assert find_pod(UID, proc_root=str(node.proc), cgroup_root=str(node.cg))[0].endswith("/100/ns/net")


def test_no_host_proc_is_clear(node):
    node.cgroup(f"kubepods/pod{UID}")
    with pytest.raises(MeshbpfError, match="hostPID"):
        find_pod(UID, proc_root=str(node.proc / "missing"), cgroup_root=str(node.cg))
