"""Running processes inside a test-bed pod: fork, join its cgroup and netns (and optionally a
user namespace), drop to a uid/gid, exec; and which interpreter pod processes can run.

Never `ip netns exec`: the child joins the pod itself (setns), so it also lands in the pod's
cgroup leaf, where the cgroup programs under test see it.
"""

import ctypes
import os
import signal
import subprocess
import sys

from .. import system
from ..errors import MeshbpfError, UnsupportedError

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWUSER = 0x10000000


def _enter_pod(netns_path, cgroup, uid, gid, userns=None):
    """The preexec of a pod process: join cgroup, then netns, then (optionally) a user
    namespace, then drop to uid/gid. `userns`: the path of a user namespace to join, or
    "new" for a new one (its maps are written by the parent; the process stays unmapped
    root until then, so it must not change ids)."""
    def preexec():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if netns_path:
            fd = os.open(netns_path, os.O_RDONLY)
            if _libc.setns(fd, system.CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({netns_path}): {os.strerror(e)}")
            os.close(fd)
        # the netns is joined first: inside the new user namespace we hold no capability
        # over the netns (it belongs to the initial one)
        if userns == "new":
            if _libc.unshare(CLONE_NEWUSER) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"unshare(CLONE_NEWUSER): {os.strerror(e)}")
            return
        if userns:
            fd = os.open(userns, os.O_RDONLY)
            if _libc.setns(fd, CLONE_NEWUSER) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({userns}): {os.strerror(e)}")
            os.close(fd)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return preexec


_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def _pod_env(env):
    """The environment of a pod process: given one as is, else ours minus proxy settings
    (traffic in a sandbox goes to pod addresses, never through a proxy of the machine)."""
    if env is not None:
        return dict(env)
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


def _popen_in_pod(pod, cmd, uid, gid, userns=None, **kw):
    try:
        return subprocess.Popen([str(c) for c in cmd], start_new_session=True,
                                preexec_fn=_enter_pod(pod.netns, pod.cgroup, uid, gid, userns),
                                **kw)
    except FileNotFoundError:
        raise UnsupportedError(f"{cmd[0]} is not installed")
    except PermissionError as e:
        raise MeshbpfError(f"cannot run {cmd[0]} as uid {uid} in pod {pod.name}: {e}")
    except subprocess.SubprocessError as e:
        # the preexec failed: the pod's netns or cgroup is gone, or uid/gid are invalid
        state = [what for what, path in (("netns", pod.netns), ("cgroup", pod.cgroup))
                 if not os.path.exists(path)]
        why = f"its {' and '.join(state)} no longer exist" if state else str(e)
        raise MeshbpfError(f"cannot start {cmd[0]} in pod {pod.name}: {why}")


class Proc:
    """A process running in a pod; its stdout+stderr go to a file (see `output()`)."""

    def __init__(self, popen, log_path, pod, cmd):
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.pod = pod
        self.cmd = cmd

    def __repr__(self):
        return f"<Proc {self.pid} {' '.join(map(str, self.cmd))!r} in {self.pod.name}>"

    @property
    def returncode(self):
        return self.popen.poll()

    def alive(self):
        return self.popen.poll() is None

    def output(self):
        """Everything the process wrote to stdout and stderr so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_port(self, port, host="127.0.0.1", timeout=10):
        """Wait until `host`:`port` accepts TCP connections inside the pod; fail early if we die."""
        self.pod.wait_port(port, host=host, timeout=timeout, proc=self)
        return self

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    def stop(self, timeout=5):
        """SIGTERM, then SIGKILL after `timeout` seconds. Returns the exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
        return self.popen.returncode


def pod_python():
    """A Python (stdlib is all pod apps need) that any uid in a pod can run: ours, or the
    interpreter our venv links to when the venv sits in a directory others cannot enter."""
    for cand in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        if os.path.exists(cand) and system.reachable_by_all(cand):
            return cand
    return sys.executable
