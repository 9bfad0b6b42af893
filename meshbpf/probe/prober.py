"""The real checks behind `meshbpf probe`: side effects, cleaned up before returning.

`probe()` runs every check of features.FEATURES: loads a minimal program of each type
through raw bpf(2) (`meshbpf.bpfsys`, no bcc needed), creates each map type, attaches the
cgroup programs to a throwaway cgroup `<cgroup2>/meshbpf-probe-<pid>-<tid>` with
BPF_F_ALLOW_MULTI and detaches them (never the cgroup root), and runs tc/iptables only
inside throwaway network namespaces (`unshare --net`); inbound steering is tried for real
by inbound.py. Every fd is closed and the cgroup removed before it returns: probing leaves
nothing behind (except mounting bpffs at /sys/fs/bpf if it was not mounted, which meshbpf
needs anyway).
"""

import os
import re
import subprocess
import sys
import threading

from .. import bpfsys as B
from .. import memlock, system
from ..errors import MeshbpfError, UnsupportedError
from . import inbound
from .features import (ASSUME_ENV, BY_NAME, FEATURES, assumed_absent, build_report,
                       parse_kernel_version)

PROBE_CGROUP_PREFIX = "meshbpf-probe-"
# The oldest bcc a guest run has proven (Debian 11's 0.18, tests/vm): below 0.25 meshbpf
# loads what bcc compiled itself (expected attach types, sk_msg's map fd: ebpf/loader.py).
MIN_BCC = (0, 18)


class _Prober:
    """Runs the real checks; owns every fd and the throwaway cgroup until `close()`."""

    def __init__(self):
        self.fds = []
        self.cgroup_dir = None
        self.cgroup_fd = None

    # -- resources -------------------------------------------------------------------
    def own(self, fd):
        self.fds.append(fd)
        return fd

    def release(self, fd):
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def close(self):
        errors = []
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError as e:  # pragma: no cover - an fd we own is always open
                errors.append(e)
        if self.cgroup_fd is not None:
            os.close(self.cgroup_fd)
            self.cgroup_fd = None
        if self.cgroup_dir is not None:
            try:
                os.rmdir(self.cgroup_dir)
            except FileNotFoundError:
                pass
            self.cgroup_dir = None

    def make_cgroup(self, mount):
        """Create the throwaway cgroup `<mount>/meshbpf-probe-<pid>-<tid>` and open it."""
        _remove_stale_probe_cgroups(mount)
        # pid and thread id: two threads of one agent may probe at once.
        path = os.path.join(mount, f"{PROBE_CGROUP_PREFIX}{os.getpid()}-{threading.get_native_id()}")
        if os.path.isdir(path):   # left by an earlier probe of this very thread
            os.rmdir(path)
        os.mkdir(path)
        self.cgroup_dir = path
        self.cgroup_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    # -- building blocks --------------------------------------------------------------
    def load(self, prog_type, insns, attach_type=0):
        return self.own(B.prog_load(prog_type, insns, expected_attach_type=attach_type))

    def map(self, map_type, key_size, value_size, max_entries=1):
        return self.own(B.map_create(map_type, key_size, value_size, max_entries))

    def attach_cycle(self, prog_fd, attach_type):
        """Attach to the throwaway cgroup with ALLOW_MULTI, check it is listed, detach."""
        if self.cgroup_fd is None:
            return "loaded; attaching not tried (no cgroup v2)"
        B.prog_attach(self.cgroup_fd, prog_fd, attach_type, B.BPF_F_ALLOW_MULTI)
        try:
            _, ids = B.prog_query(self.cgroup_fd, attach_type)
            pid = B.prog_get_info(prog_fd)["id"]
            if pid not in ids:
                raise MeshbpfError(f"attached program {pid} not listed on the cgroup ({ids})")
        finally:
            B.prog_detach(self.cgroup_fd, prog_fd, attach_type)
        return "loaded, attached to a throwaway cgroup with BPF_F_ALLOW_MULTI, detached"

    def cgroup_prog(self, prog_type, attach_type, insns=None):
        fd = self.load(prog_type, insns or B.return_imm(1), attach_type)
        try:
            return True, self.attach_cycle(fd, attach_type)
        finally:
            self.release(fd)

    def load_only(self, prog_type, insns, attach_type=0, what="loaded"):
        fd = self.load(prog_type, insns, attach_type)
        self.release(fd)
        return True, what

    # -- the checks -------------------------------------------------------------------
    def check_sock_ops(self):
        return self.cgroup_prog(B.BPF_PROG_TYPE_SOCK_OPS, B.BPF_CGROUP_SOCK_OPS)

    def check_sockmap(self):
        self.release(self.map(B.BPF_MAP_TYPE_SOCKMAP, 4, 4))
        return True, "SOCKMAP created"

    def check_sockhash(self):
        self.release(self.map(B.BPF_MAP_TYPE_SOCKHASH, 4, 4))
        return True, "SOCKHASH created"

    def check_sk_msg(self):
        fd = self.load(B.BPF_PROG_TYPE_SK_MSG, B.return_imm(B.SK_PASS))
        try:
            for mtype, label in ((B.BPF_MAP_TYPE_SOCKHASH, "SOCKHASH"),
                                 (B.BPF_MAP_TYPE_SOCKMAP, "SOCKMAP")):
                try:
                    mfd = self.map(mtype, 4, 4)
                except OSError:
                    continue
                try:
                    B.prog_attach(mfd, fd, B.BPF_SK_MSG_VERDICT)
                    B.prog_detach(mfd, fd, B.BPF_SK_MSG_VERDICT)
                finally:
                    self.release(mfd)
                return True, f"loaded, attached to a throwaway {label}, detached"
            return True, "loaded; attaching not tried (no sockmap type)"
        finally:
            self.release(fd)

    # offsetof(struct sk_msg_md, sk): two 8-byte pointers, 13 u32 fields, aligned to 8
    _SK_MSG_MD_SK = 72

    def check_splice_backpressure(self):
        from ..ebpf import btf
        try:
            off = btf.tcp_sock_offsets()
        except btf.BtfError as e:
            return False, str(e)
        insns = [B.ldx(8, 1, 1, self._SK_MSG_MD_SK), B.jeq_imm(1, 0, 3),
                 B.call(B.BPF_FUNC_skc_to_tcp_sock), B.jeq_imm(0, 0, 1),
                 B.ldx(4, 0, 0, off["write_seq"]), B.mov64_imm(0, B.SK_PASS), B.exit()]
        return self.load_only(B.BPF_PROG_TYPE_SK_MSG, insns, 0,
                              f"an sk_msg program reading tcp_sock.write_seq (BTF offset "
                              f"{off['write_seq']}) through bpf_skc_to_tcp_sock loaded")

    def sock_addr(self, attach_type):
        return self.cgroup_prog(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type)

    def check_cgroup_connect4(self):
        return self.sock_addr(B.BPF_CGROUP_INET4_CONNECT)

    def check_cgroup_connect6(self):
        return self.sock_addr(B.BPF_CGROUP_INET6_CONNECT)

    def check_cgroup_sendmsg4(self):
        return self.sock_addr(B.BPF_CGROUP_UDP4_SENDMSG)

    def check_cgroup_recvmsg4(self):
        return self.sock_addr(B.BPF_CGROUP_UDP4_RECVMSG)

    def check_cgroup_getpeername4(self):
        return self.sock_addr(B.BPF_CGROUP_INET4_GETPEERNAME)

    def check_cgroup_getpeername6(self):
        return self.sock_addr(B.BPF_CGROUP_INET6_GETPEERNAME)

    def check_cgroup_getsockopt(self):
        return self.cgroup_prog(B.BPF_PROG_TYPE_CGROUP_SOCKOPT, B.BPF_CGROUP_GETSOCKOPT)

    _COOKIE = [B.call(B.BPF_FUNC_get_netns_cookie), B.mov64_imm(0, 1), B.exit()]
    _COOKIE_DETAIL = "a program calling bpf_get_netns_cookie (helper 122) loaded"

    def check_netns_cookie_sock_addr(self):
        return self.load_only(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, self._COOKIE,
                              B.BPF_CGROUP_INET4_CONNECT, self._COOKIE_DETAIL)

    def check_netns_cookie_sockopt(self):
        return self.load_only(B.BPF_PROG_TYPE_CGROUP_SOCKOPT, self._COOKIE,
                              B.BPF_CGROUP_GETSOCKOPT, self._COOKIE_DETAIL)

    def check_netns_cookie_sock_ops(self):
        return self.load_only(B.BPF_PROG_TYPE_SOCK_OPS, self._COOKIE, 0, self._COOKIE_DETAIL)

    def check_sk_lookup(self):
        return self.load_only(B.BPF_PROG_TYPE_SK_LOOKUP, B.return_imm(B.SK_PASS), B.BPF_SK_LOOKUP)

    def check_ringbuf(self):
        self.release(self.map(B.BPF_MAP_TYPE_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE")))
        return True, "BPF_MAP_TYPE_RINGBUF created"

    def check_xdp(self):
        return self.load_only(B.BPF_PROG_TYPE_XDP, B.return_imm(B.XDP_PASS))

    def check_tc_clsact(self):
        self.load_only(B.BPF_PROG_TYPE_SCHED_CLS, B.return_imm(B.TC_ACT_OK))
        # The qdisc goes on `lo` of a network namespace that dies with the command.
        proc = _run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "clsact"])
        if proc.returncode != 0:
            return False, ("sched_cls program loaded, but adding a clsact qdisc failed: "
                           + _last_line(proc))
        return True, "sched_cls program loaded; clsact qdisc added in a throwaway netns"

    def check_bpf_link(self):
        if self.cgroup_fd is None:
            return False, "not tried: no cgroup v2"
        fd = self.load(B.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, B.return_imm(1),
                       B.BPF_CGROUP_INET4_CONNECT)
        try:
            link = self.own(B.link_create(fd, self.cgroup_fd, B.BPF_CGROUP_INET4_CONNECT))
            self.release(link)   # closing the only link fd detaches the program
            return True, "cgroup/connect4 linked to a throwaway cgroup and unlinked"
        finally:
            self.release(fd)

    def check_so_netns_cookie(self):
        return True, f"this netns has cookie {system.netns_cookie(fallback=False)}"

    def check_cgroup2(self):
        return True, f"mounted at {system.cgroup2_mount()}"

    def check_bpffs(self):
        if system.ensure_bpffs():
            return True, f"was not mounted; mounted it at {system.BPFFS}"
        return True, f"mounted at {system.BPFFS}"

    def check_bcc(self):
        return check_bcc()

    _inbound = None

    def _inbound_probe(self):
        """Real inbound steering in a throwaway netns (needs bcc); run once for both checks."""
        if self._inbound is None:
            ok, detail = check_bcc()
            if not ok:
                self._inbound = {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                                 "detail": f"not tried: {detail}"}
            else:
                self._inbound = inbound.run()
        return self._inbound

    def check_tc_sk_assign(self):
        res = self._inbound_probe()
        return res["ok"], res["detail"]

    def check_tc_sk_assign_reuseport(self):
        res = self._inbound_probe()
        return res["reuseport"], res["detail"]

    def check_sk_lookup_reuseport(self):
        res = self._inbound_probe()
        return bool(res.get("sk_lookup_reuseport")), res["detail"]

    def check_kernel_headers(self):
        return check_kernel_headers()

    def check_iptables_nft(self):
        return check_iptables(_iptables_binary("nft"))

    def check_iptables_legacy(self):
        return check_iptables(_iptables_binary("legacy"))


def _iptables_binary(variant):
    """iptables-<variant>, or plain iptables where that is the variant (iptables < 1.8,
    e.g. CentOS 7's 1.4.21, has no suffixed names)."""
    from ..iptables import backend
    found = backend.binaries(variant, 4)
    return found[1][: -len("-restore")] if found else f"iptables-{variant}"


def _run(cmd, timeout=60):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]} is not installed")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} did not finish in {timeout}s")


def _last_line(proc):
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit {proc.returncode}"


def _remove_stale_probe_cgroups(mount):
    """Remove `meshbpf-probe-<pid>[-<tid>]` cgroups whose process is gone (killed mid-probe)."""
    for name in os.listdir(mount):
        m = re.fullmatch(re.escape(PROBE_CGROUP_PREFIX) + r"(\d+)(?:-\d+)?(?:-cookie)?", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            try:
                os.rmdir(os.path.join(mount, name))
            except OSError:
                pass


def parse_bcc_version(text):
    """'0.26.0' / 'v0.24.0-1' -> (0, 26, 0) or None."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def check_bcc(python=None):
    """Is bcc importable by meshbpf's Python, and new enough (MIN_BCC)? Checked in a child
    process so a broken bcc cannot take the probe down and iptables mode never imports it."""
    proc = _run([python or sys.executable, "-c", "import bcc; print(bcc.__version__)"])
    if proc.returncode != 0:
        return False, f"bcc is not importable: {_last_line(proc)}"
    text = proc.stdout.strip()
    version = parse_bcc_version(text)
    if version is None:
        return False, f"bcc is importable but reports no usable version ({text!r})"
    if version[:2] < MIN_BCC:
        return False, (f"bcc {text} is older than {'.'.join(map(str, MIN_BCC))}, the oldest "
                       "meshbpf is tested with (Debian 11's)")
    return True, f"bcc {text}"


def check_kernel_headers(release=None, modules="/lib/modules", kheaders="/sys/kernel/kheaders.tar.xz"):
    """Where bcc gets kernel headers: the running kernel's build tree, the in-kernel
    kheaders archive, or nowhere (then `make setup` installs and links Debian's)."""
    release = release or os.uname().release
    build = os.path.join(modules, release, "build")
    if os.path.isdir(os.path.join(build, "include")):
        real = os.path.realpath(build)
        detail = f"{build}"
        if real != build:
            detail += f" -> {real}"
            base = os.path.basename(real)
            if base.startswith("linux-headers-") and release not in base:
                detail += (f" (headers of {base[len('linux-headers-'):]}, not of {release}; "
                           "presented by `make setup`)")
        return True, detail
    if os.path.exists(kheaders):
        return True, f"{kheaders} (headers built into the kernel)"
    return False, (f"no headers at {build} and no {kheaders}; "
                   "run `make setup` to install and link them")


def check_iptables(binary):
    """Can `binary` list the nat table? Run inside a throwaway netns, never the host's."""
    proc = _run(["unshare", "--net", binary, "-t", "nat", "-S"])
    if proc.returncode != 0:
        return False, f"`{binary} -t nat -S` in a throwaway netns failed: {_last_line(proc)}"
    ver = _run([binary, "--version"])
    version = ver.stdout.strip() if ver.returncode == 0 else binary
    return True, f"{version}: nat table usable (checked in a throwaway netns)"


def probe(assume_kernel=None):
    """Probe this machine for real; returns the report dict (see build_report).

    `assume_kernel` (or env MESHBPF_ASSUME_KERNEL) makes every kernel feature newer than
    that version count as absent without trying it; bcc, headers and iptables stay real.
    Needs root (UnsupportedError otherwise).
    """
    if assume_kernel is None:
        assume_kernel = os.environ.get(ASSUME_ENV) or None
    if assume_kernel is not None:
        parse_kernel_version(assume_kernel)   # bad input fails before anything runs
    if os.geteuid() != 0:
        raise UnsupportedError("meshbpf probe needs root: it loads BPF programs and creates "
                               "a throwaway cgroup", hint="run it with sudo")
    # Before 5.11 every load past 64 KiB of BPF memory fails with EPERM, which would read as
    # missing features; the inbound probe's child inherits the raised limit.
    memlock.raise_memlock()
    results = {}
    prober = _Prober()
    try:
        try:
            if not assumed_absent(BY_NAME["cgroup2"], assume_kernel):
                prober.make_cgroup(system.cgroup2_mount())
        except MeshbpfError:
            pass            # reported by the cgroup2 check itself
        for f in FEATURES:
            why = assumed_absent(f, assume_kernel)
            if why:
                results[f.name] = {"ok": False, "detail": why}
                continue
            try:
                ok, detail = getattr(prober, f"check_{f.name}")()
            except B.BpfError as e:
                ok, detail = False, str(e).splitlines()[0]
            except MeshbpfError as e:
                ok, detail = False, str(e)
            except OSError as e:
                ok, detail = False, f"{e.strerror or e}"
            results[f.name] = {"ok": bool(ok), "detail": detail}
    finally:
        prober.close()
    return build_report(os.uname().release, results, assume_kernel)
