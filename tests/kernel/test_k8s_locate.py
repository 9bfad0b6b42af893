"""find_pod() on the real kernel: a kubelet-shaped cgroup tree built under the sandbox's
test cgroup, real processes of sandbox pods (their own netns) moved into its container
scopes, read back through the real /proc."""

import os
import subprocess
import time

import pytest

from meshbpf.errors import PodNotFoundError, PodNotRunningError
from meshbpf.k8s.locate import find_pod
from meshbpf.testbed import Sandbox

pytestmark = pytest.mark.kernel

UID_SYSTEMD = "0d5e7a1c-3b2f-4e6d-9c8a-7f1e2d3c4b5a"
UID_CGROUPFS = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
CID = "c" * 64
CID2 = "d" * 64


def _mkcg(path):
    os.makedirs(path, exist_ok=True)
    return path


def _move(pid, cgroup):
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _same_netns(a, b):
    sa, sb_ = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb_.st_dev, sb_.st_ino)


def test_find_pod_systemd_and_cgroupfs_layouts():
    with Sandbox(name="k8sloc") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        root = sb.cgroup_root
        u = UID_SYSTEMD.replace("-", "_")
        sys_pod = _mkcg(os.path.join(root, "kubepods.slice", "kubepods-burstable.slice",
                                     f"kubepods-burstable-pod{u}.slice"))
        fs_pod = _mkcg(os.path.join(root, "kubepods", "besteffort", f"pod{UID_CGROUPFS}"))

        # Created, no process yet: the caller is told to wait, not that the pod is absent.
        _mkcg(os.path.join(sys_pod, f"cri-containerd-{CID}.scope"))
        with pytest.raises(PodNotRunningError):
            find_pod(UID_SYSTEMD, cgroup_root=root)

        pause = a.spawn(["sleep", "300"], label="pause")
        time.sleep(0.05)                        # a later start time for the app
        app = a.spawn(["sleep", "300"], label="app")
        _move(pause.pid, os.path.join(sys_pod, f"cri-containerd-{CID}.scope"))
        _move(app.pid, _mkcg(os.path.join(sys_pod, f"cri-containerd-{CID2}.scope")))
        other = b.spawn(["sleep", "300"], label="other")
        _move(other.pid, _mkcg(os.path.join(fs_pod, CID)))

        netns, cgroup = find_pod(UID_SYSTEMD, cgroup_root=root)
        assert cgroup == sys_pod
        assert _same_netns(netns, a.netns) and not _same_netns(netns, b.netns)
        assert netns == f"/proc/{pause.pid}/ns/net"

        netns, cgroup = find_pod(UID_CGROUPFS, cgroup_root=root)
        assert cgroup == fs_pod and _same_netns(netns, b.netns)

        with pytest.raises(PodNotFoundError):
            find_pod("11111111-2222-4333-8444-555555555555", cgroup_root=root)


def test_conmon_in_node_netns_never_chosen():
    with Sandbox(name="k8sconmon") as sb:
        a = sb.add_pod("a")
        u = UID_SYSTEMD.replace("-", "_")
        pod = _mkcg(os.path.join(sb.cgroup_root, "kubepods.slice",
                                 f"kubepods-pod{u}.slice"))
        # CRI-O's conmon: started first, in this (the test's) netns, inside the pod cgroup.
        conmon = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _move(conmon.pid, _mkcg(os.path.join(pod, f"crio-conmon-{CID}.scope")))
            with pytest.raises(PodNotRunningError):
                find_pod(UID_SYSTEMD, cgroup_root=sb.cgroup_root)
            time.sleep(0.05)
            ctr = a.spawn(["sleep", "300"], label="ctr")
            _move(ctr.pid, _mkcg(os.path.join(pod, f"crio-{CID}.scope")))
            netns, cgroup = find_pod(UID_SYSTEMD, cgroup_root=sb.cgroup_root)
            assert cgroup == pod and _same_netns(netns, a.netns)
            assert not _same_netns(netns, "/proc/self/ns/net")
        finally:
            conmon.kill()
            conmon.wait()
