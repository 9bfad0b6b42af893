"""Small, side-effecting helpers the rest of meshbpf shares: commands, mounts, namespaces.

Everything here touches the machine; pure logic lives elsewhere. Nothing here ever
changes the machine's own network namespace or cgroups: entering a namespace is always
scoped (a context manager or a child process).
"""

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import subprocess
import threading

from .errors import MeshbpfError, NotFoundError, UnsupportedError

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
NS_GET_NSTYPE = 0xB703                 # _IO(0xb7, 3)
NS_GET_ID = 0x8008B70D                 # _IOR(0xb7, 13, __u64), Linux 6.18
BPFFS = "/sys/fs/bpf"

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def run(cmd, *, input=None, check=True, netns=None, timeout=120, env=None):
    """Run `cmd` (a list), optionally inside the network namespace at path `netns`.

    Uses `nsenter --net=` rather than `ip netns exec`, which would remount /sys and hide
    the cgroup mounts. Returns CompletedProcess with text output; on failure with
    check=True raises MeshbpfError carrying the command's stderr.
    """
    if netns:
        cmd = ["nsenter", f"--net={netns}", "--"] + list(cmd)
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except FileNotFoundError:
        raise UnsupportedError(f"{cmd[0]} is not installed", hint="run `make setup`")
    except subprocess.TimeoutExpired:
        raise MeshbpfError(f"`{' '.join(cmd)}` did not finish within {timeout}s")
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise MeshbpfError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {err}")
    return proc


def have(binary):
    """True if `binary` is on PATH."""
    return shutil.which(binary) is not None


def cgroup2_mount():
    """Where cgroup v2 is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified` on hybrid hosts)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1]
    raise UnsupportedError("cgroup v2 is not mounted",
                           hint="mount it: mount -t cgroup2 none /sys/fs/cgroup/unified")


def cgroup_of_pid(pid):
    """Absolute cgroup v2 directory of process `pid`."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hier, _, path = line.rstrip("\n").split(":", 2)
                if hier == "0":
                    return os.path.join(cgroup2_mount(), path.lstrip("/"))
    except FileNotFoundError:
        raise NotFoundError(f"no process with pid {pid}")
    raise UnsupportedError(f"process {pid} has no cgroup v2 membership")


def bpffs_mounted(path=BPFFS):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f)


def ensure_bpffs(path=BPFFS):
    """Mount bpffs at `path` if it is not mounted; returns True if this call mounted it."""
    if bpffs_mounted(path):
        return False
    os.makedirs(path, exist_ok=True)
    run(["mount", "-t", "bpf", "bpf", path])
    return True


# Iterator pins the kernel's bpf_preload puts in every bpffs it mounts: not ours.
KERNEL_BPFFS_ENTRIES = {"maps.debug", "progs.debug"}


def release_bpffs(path=BPFFS):
    """Unmount bpffs at `path` if nothing but the kernel's own entries is pinned there."""
    if bpffs_mounted(path) and set(os.listdir(path)) <= KERNEL_BPFFS_ENTRIES:
        run(["umount", path], check=False)


@contextlib.contextmanager
def bpffs_for_run(path=BPFFS):
    """bpffs mounted for the body. If this mounted it, it is unmounted afterwards unless
    something was left pinned (runs that only test or measure leave the machine as they
    found it; `attach` mounts and keeps it, since its pins must outlive the process)."""
    mounted = ensure_bpffs(path)
    try:
        yield
    finally:
        if mounted:
            release_bpffs(path)


def netns_path_of_pid(pid):
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        raise NotFoundError(f"no process with pid {pid}")
    return path


@contextlib.contextmanager
def in_netns(path):
    """Run the body with this thread inside the network namespace at `path`."""
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NotFoundError(f"network namespace {path} cannot be opened: {e.strerror}")
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    with _setns_lock:
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NotFoundError(f"{path} is not a network namespace: {os.strerror(err)}")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "cannot return to own network namespace")
        finally:
            os.close(target)
            os.close(own)


def netns_cookie(path=None, fallback=True):
    """The kernel's cookie for a network namespace (what bpf_get_netns_cookie() returns).
    Without SO_NETNS_COOKIE (before 5.14, or named in MESHBPF_DISABLE_FEATURES) and with
    `fallback`, read through bpf_get_netns_cookie itself (meshbpf.netnscookie).

    Where the kernel's namespace id (NS_GET_ID) is the netns cookie (Linux 6.18 unified
    them), it is read from the netns file without entering the namespace: the agent asks
    for every pod's cookie on each drift check. That it is the cookie is checked once per
    process against SO_NETNS_COOKIE (on our own netns and the first other one asked)."""
    from .probe.features import disabled_features
    if fallback and "so_netns_cookie" in disabled_features():
        return _netns_cookie_bpf(path)
    global _ns_id_is_cookie
    if path and _ns_id_is_cookie is not False:
        fast = _ns_id(path)
        if fast is not None:
            if _ns_id_is_cookie:
                return fast
            slow = _cookie_inside(path, fallback)
            _ns_id_is_cookie = slow == fast and _ns_id("/proc/thread-self/ns/net") == \
                _cookie_inside(None, fallback)
            return slow
    return _cookie_inside(path, fallback)


_ns_id_is_cookie = None          # None: not known yet


def _ns_id(path):
    """The namespace id of the netns file at `path` (None: no such ioctl, or not a netns)."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None                    # the slow path says what is wrong
    try:
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            return None
        buf = bytearray(8)
        fcntl.ioctl(fd, NS_GET_ID, buf)
        return int.from_bytes(buf, "little")
    except OSError:
        return None
    finally:
        os.close(fd)


def _cookie_inside(path, fallback=True):
    ctx = in_netns(path) if path else contextlib.nullcontext()
    with ctx:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            if fallback and e.errno == errno.ENOPROTOOPT:
                raw = None
            else:
                raise UnsupportedError("kernel cannot report netns cookies (SO_NETNS_COOKIE): "
                                       f"{e.strerror}")
        finally:
            s.close()
    if raw is None:
        return _netns_cookie_bpf(path)
    return int.from_bytes(raw, "little")


def _netns_cookie_bpf(path):
    from . import netnscookie
    return netnscookie.netns_cookie(path or "/proc/thread-self/ns/net", cgroup2_mount())


def netns_inode(path):
    """Inode number identifying a network namespace (stable while it lives)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise NotFoundError(f"network namespace {path} does not exist")


def reachable_by_all(path):
    """True if any uid can execute `path`: o+x on every directory on the way to it (as
    written, and after resolving links) and on the file itself. A checkout under a 0700
    home is not reachable by the proxy uid."""
    import stat

    def dirs_ok(p):
        d = os.path.dirname(os.path.abspath(p))
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)

    real = os.path.realpath(path)
    return (dirs_ok(path) and dirs_ok(real)
            and bool(os.stat(real).st_mode & stat.S_IXOTH))
