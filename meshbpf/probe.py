"""Kernel feature probes and the data-path mode they select (`meshbpf probe`).

Its one job: find out, by trying, what this machine can do for meshbpf, and say which mode
(`ebpf` or `iptables`) that gives and why, in words.

Two halves:
- pure: the feature table (`FEATURES`: mainline version, what each feature enables, and
  whether its absence drops the node to iptables or only degrades a named capability),
  `--assume-kernel` overrides (`apply_assumption`), the decision (`decide`, `degraded`)
  and the text rendering. Testable without root.
- side effects: `probe()` runs every real check: loads a minimal program of each type
  through raw bpf(2) (`meshbpf.bpfsys`, no bcc needed), creates each map type, attaches
  the cgroup programs to a throwaway cgroup `<cgroup2>/meshbpf-probe-<pid>-<tid>` with
  BPF_F_ALLOW_MULTI and detaches them (never the cgroup root), and runs tc/iptables only
  inside throwaway network namespaces (`unshare --net`). Every fd is closed and the cgroup
  removed before it returns: probing leaves nothing behind (except mounting bpffs at
  /sys/fs/bpf if it was not mounted, which meshbpf needs anyway).
"""

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

import click

from . import bpfsys as B
from . import system
from .errors import MeshbpfError, UnsupportedError, UsageError

ASSUME_ENV = "MESHBPF_ASSUME_KERNEL"
PROBE_CGROUP_PREFIX = "meshbpf-probe-"
MIN_BCC = (0, 25)

REQUIRED = "required"    # absent: the node uses iptables
DEGRADES = "degrades"    # absent: eBPF mode loses `capability`
IPTABLES = "iptables"    # an iptables backend: iptables mode needs at least one
INFO = "info"            # reported only


@dataclass(frozen=True)
class Feature:
    name: str                  # key in the JSON report
    title: str                 # how a person calls it
    mainline: tuple = None     # first mainline kernel with it, or None (not a kernel feature)
    role: str = REQUIRED
    enables: str = ""          # "needed to <enables>"
    capability: str = None     # what DEGRADES features take away when absent
    fix: str = None            # how an operator gets it (non-kernel items)
    covered_by: tuple = ()     # DEGRADES: features that do its job when it is absent


FEATURES = (
    Feature("tc_clsact", "tc clsact with sched_cls programs", (4, 5), REQUIRED,
            "steer inbound traffic to the sidecar's inbound port"),
    Feature("xdp", "XDP programs", (4, 8), INFO,
            "run at the driver (not used for inbound: XDP cannot hand a packet to a socket, "
            "see docs/inbound.md)"),
    Feature("tc_sk_assign", "bpf_sk_assign from tc", (5, 7), REQUIRED,
            "hand inbound connections to the sidecar's capture listener"),
    # Without it tc_inbound hands such SYNs to sk_lookup (5.9), which is reuseport-aware:
    # only a kernel with neither loses the capability.
    Feature("tc_sk_assign_reuseport", "bpf_sk_assign to SO_REUSEPORT listeners", (6, 5),
            DEGRADES, "steer inbound connections to a SO_REUSEPORT listener (Envoy's default) "
            "from tc; without it they go through sk_lookup",
            "the sidecar's inbound listener must not use SO_REUSEPORT",
            covered_by=("sk_lookup_reuseport",)),
    Feature("sk_lookup_reuseport", "sk_lookup to SO_REUSEPORT listeners", (5, 9), INFO,
            "hand inbound connections to a SO_REUSEPORT listener where bpf_sk_assign cannot "
            "(tried for real: tc_inbound leaving the SYN to mb_sk_lookup)"),
    Feature("sock_ops", "sock_ops programs", (4, 13), REQUIRED,
            "see connections become established (splicing and original-destination bookkeeping)"),
    Feature("sockmap", "SOCKMAP maps", (4, 14), INFO,
            "hold sockets for redirection (meshbpf itself uses SOCKHASH)"),
    Feature("sk_msg", "sk_msg programs", (4, 17), REQUIRED,
            "splice same-node bytes from socket to socket"),
    Feature("splice_backpressure", "sk_msg reading tcp_sock through the kernel's BTF", (5, 9),
            DEGRADES, "splice same-node bytes while keeping TCP's backpressure (docs/splice.md)",
            "no splicing: same-node bytes take TCP/IP"),
    Feature("cgroup_connect4", "cgroup/connect4", (4, 17), REQUIRED,
            "redirect IPv4 connects to the sidecar"),
    Feature("cgroup_connect6", "cgroup/connect6", (4, 17), REQUIRED,
            "redirect IPv6 connects to the sidecar"),
    Feature("sockhash", "SOCKHASH maps", (4, 18), REQUIRED,
            "find the peer socket of a same-node connection"),
    Feature("cgroup_sendmsg4", "cgroup/sendmsg4", (4, 18), DEGRADES,
            "redirect DNS queries to the sidecar", "DNS capture unavailable"),
    Feature("cgroup_recvmsg4", "cgroup/recvmsg4", (5, 2), DEGRADES,
            "give DNS replies their original source", "DNS capture unavailable"),
    Feature("cgroup_getsockopt", "cgroup/getsockopt", (5, 3), REQUIRED,
            "answer SO_ORIGINAL_DST"),
    Feature("netns_cookie_sock_addr", "bpf_get_netns_cookie in cgroup/connect hooks", (5, 7),
            REQUIRED, "tell pods apart in the connect hooks"),
    Feature("bpf_link", "bpf_link for cgroup hooks", (5, 7), DEGRADES,
            "attach through bpf_link",
            "bpf_link attachment unavailable (BPF_F_ALLOW_MULTI is used)"),
    Feature("netns_cookie_sockopt", "bpf_get_netns_cookie in cgroup/getsockopt", (5, 8),
            REQUIRED, "keep loopback connections of different pods apart"),
    Feature("cgroup_getpeername4", "cgroup/getpeername4", (5, 8), DEGRADES,
            "show apps the IPv4 peer they dialled", "apps see the sidecar as peer"),
    Feature("cgroup_getpeername6", "cgroup/getpeername6", (5, 8), DEGRADES,
            "show apps the IPv6 peer they dialled", "apps see the sidecar as peer"),
    Feature("sk_lookup", "sk_lookup programs", (5, 9), DEGRADES,
            "hand a new connection that reuses a TIME_WAIT 4-tuple to the sidecar",
            "no sk_lookup: inbound connections reusing a TIME_WAIT 4-tuple stall until it "
            "expires"),
    Feature("so_netns_cookie", "SO_NETNS_COOKIE", (5, 14), REQUIRED,
            "learn a pod's netns cookie from user space"),
    Feature("netns_cookie_sock_ops", "bpf_get_netns_cookie in sock_ops", (5, 15), REQUIRED,
            "key per-connection state by network namespace"),
    Feature("cgroup2", "cgroup v2", (4, 5), REQUIRED,
            "attach programs that see the pods' sockets",
            fix="mount it: mount -t cgroup2 none /sys/fs/cgroup/unified"),
    Feature("bpffs", "bpffs", (4, 4), REQUIRED,
            "pin programs and maps so interception outlives the agent",
            fix="mount it: mount -t bpf bpf /sys/fs/bpf"),
    Feature("bcc", "bcc >= 0.25", None, REQUIRED,
            "compile the eBPF programs and load them with their expected attach types",
            fix="run `make setup` (Debian python3-bpfcc)"),
    Feature("kernel_headers", "kernel headers", None, REQUIRED,
            "let bcc compile against this kernel", fix="run `make setup`"),
    Feature("iptables_nft", "iptables-nft", None, IPTABLES,
            "install iptables rules with the nft backend",
            fix="run `make setup` (Debian iptables)"),
    Feature("iptables_legacy", "iptables-legacy", None, IPTABLES,
            "install iptables rules with the legacy backend",
            fix="run `make setup` (Debian iptables)"),
)
BY_NAME = {f.name: f for f in FEATURES}
# In a reason, these are named first (the rest follow in table order).
REASON_ORDER = ("cgroup_connect4", "cgroup_getsockopt", "bcc", "kernel_headers", "cgroup2",
                "bpffs")


# ---------------------------------------------------------------------------------------
# pure part
# ---------------------------------------------------------------------------------------
def parse_kernel_version(text):
    """'3.10', '4.18.0-305.el8.x86_64', '6.18.44-fc' -> (major, minor); UsageError otherwise."""
    m = re.match(r"^\s*(\d+)\.(\d+)", str(text))
    if not m:
        raise UsageError(f"cannot read a kernel version from {text!r}",
                         hint="give MAJOR.MINOR, e.g. --assume-kernel 4.19")
    return int(m.group(1)), int(m.group(2))


def fmt_version(v):
    return f"{v[0]}.{v[1]}"


def assumed_absent(feature, assume_kernel):
    """The detail saying `feature` is assumed absent on `assume_kernel`, or None if it may exist."""
    if assume_kernel is None or feature.mainline is None:
        return None
    have = parse_kernel_version(assume_kernel)
    if have >= feature.mainline:
        return None
    return f"assumed absent: kernel {fmt_version(have)} < mainline {fmt_version(feature.mainline)}"


def apply_assumption(results, assume_kernel):
    """A copy of `results` with every feature newer than `assume_kernel` marked not ok."""
    out = {k: dict(v) for k, v in results.items()}
    if assume_kernel is None:
        return out
    for f in FEATURES:
        why = assumed_absent(f, assume_kernel)
        if why:
            out[f.name] = {"ok": False, "detail": why}
    return out


def _ok(results, name):
    return bool(results.get(name, {}).get("ok"))


def _missing_phrase(f, results):
    """Why eBPF mode cannot have `f`, in words."""
    detail = results.get(f.name, {}).get("detail") or "not probed"
    assumed = detail.startswith("assumed absent")
    if f.mainline is not None and (f.fix is None or assumed):
        why = f"mainline {fmt_version(f.mainline)}"
        if not assumed:
            why += f"; here: {detail.splitlines()[0]}"
        return f"kernel lacks {f.title} ({why}), needed to {f.enables}"
    phrase = f"{f.title} unavailable ({detail}), needed to {f.enables}"
    return phrase + (f"; fix: {f.fix}" if f.fix else "")


def degraded(results, assume_kernel=None):
    """Capabilities eBPF mode loses on this machine (unique, in table order)."""
    results = apply_assumption(results, assume_kernel)
    caps = []
    for f in FEATURES:
        if f.covered_by and all(_ok(results, n) for n in f.covered_by):
            continue
        if f.role == DEGRADES and not _ok(results, f.name) and f.capability not in caps:
            caps.append(f.capability)
    return caps


def inbound_reuseport(results, assume_kernel=None):
    """How inbound connections reach a SO_REUSEPORT capture listener (pure): "sk_assign"
    (tc assigns them, Linux 6.5+), "sk_lookup" (tc leaves them to the pod's sk_lookup
    program, 5.9+), or None (they cannot: the listener must not use SO_REUSEPORT)."""
    results = apply_assumption(results, assume_kernel)
    if _ok(results, "tc_sk_assign_reuseport"):
        return "sk_assign"
    if _ok(results, "sk_lookup_reuseport"):
        return "sk_lookup"
    return None


def decide(results, assume_kernel=None):
    """(mode, reason) from probe `results` ({name: {"ok", "detail"}}); pure.

    eBPF needs every REQUIRED feature; DEGRADES features only take away a named capability.
    Otherwise iptables, with the missing features named; if no iptables backend works either,
    the mode is still "iptables" (the schema has no "none") but the reason says it will fail.
    """
    results = apply_assumption(results, assume_kernel)
    prefix = f"assuming kernel {fmt_version(parse_kernel_version(assume_kernel))}: " \
        if assume_kernel is not None else ""
    missing = [f for f in FEATURES if f.role == REQUIRED and not _ok(results, f.name)]
    # The reason names the features people recognise first.
    missing.sort(key=lambda f: REASON_ORDER.index(f.name) if f.name in REASON_ORDER
                 else len(REASON_ORDER))
    if not missing:
        caps = degraded(results)
        reason = "every feature eBPF interception needs is present; using ebpf"
        if caps:
            reason += " (degraded: " + "; ".join(caps) + ")"
        return "ebpf", prefix + reason
    # Name the first few in full, then the rest by name, so the reason stays readable.
    head = [_missing_phrase(f, results) for f in missing[:2]]
    rest = [f.title for f in missing[2:]]
    reason = "; ".join(head)
    if rest:
        reason += "; also missing: " + ", ".join(rest)
    backends = [f for f in FEATURES if f.role == IPTABLES]
    working = [f.title for f in backends if _ok(results, f.name)]
    if working:
        verb = "works" if len(working) == 1 else "work"
        reason += f"; using iptables ({' and '.join(working)} {verb})"
    else:
        why = ", ".join(f"{f.title}: {results.get(f.name, {}).get('detail') or 'not probed'}"
                        for f in backends)
        reason += ("; using iptables, but no iptables backend works either "
                   f"({why}), so interception will fail until one does (run `make setup`)")
    return "iptables", prefix + reason


def build_report(kernel, results, assume_kernel=None):
    """The `meshbpf probe -o json` document from raw check results (pure)."""
    results = apply_assumption(results, assume_kernel)
    mode, reason = decide(results, assume_kernel)
    return {
        "kernel": kernel,
        "assumed_kernel": fmt_version(parse_kernel_version(assume_kernel))
        if assume_kernel is not None else None,
        "features": {f.name: {"ok": bool(results.get(f.name, {}).get("ok")),
                              "detail": str(results.get(f.name, {}).get("detail") or "not probed")}
                     for f in FEATURES},
        "mode": mode,
        "reason": reason,
        "degraded": degraded(results) if mode == "ebpf" else [],
        "inbound_reuseport": inbound_reuseport(results),
    }


def _role_words(f):
    if f.role == DEGRADES:
        return "optional"
    return {REQUIRED: "required", IPTABLES: "iptables", INFO: "info"}[f.role]


def render_text(report):
    """The human table `meshbpf probe` prints."""
    kernel = report["kernel"]
    if report.get("assumed_kernel"):
        kernel += f" (assuming {report['assumed_kernel']})"
    lines = [f"kernel: {kernel}", ""]
    rows = [("FEATURE", "MAINLINE", "ROLE", "STATUS", "DETAIL")]
    for f in FEATURES:
        r = report["features"].get(f.name, {"ok": False, "detail": "not probed"})
        rows.append((f.name, fmt_version(f.mainline) if f.mainline else "-", _role_words(f),
                     "ok" if r["ok"] else "missing", r["detail"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    lines.append("")
    lines.append(f"mode: {report['mode']} — {report['reason']}")
    if report.get("degraded"):
        lines.append("degraded: " + "; ".join(report["degraded"]))
    if report["mode"] == "ebpf" and "inbound_reuseport" in report:
        lines.append("inbound to SO_REUSEPORT listeners: " + {
            "sk_assign": "assigned by tc (bpf_sk_assign)",
            "sk_lookup": "through sk_lookup (bpf_sk_assign refuses them before Linux 6.5)"}.get(
                report["inbound_reuseport"], "not possible: the sidecar's inbound listener "
                "must not use SO_REUSEPORT"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# side-effect part
# ---------------------------------------------------------------------------------------
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
        from .ebpf import btf
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
        return True, f"this netns has cookie {system.netns_cookie()}"

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
                from .ebpf import inbound
                self._inbound = inbound.probe()
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
        return check_iptables("iptables-nft")

    def check_iptables_legacy(self):
        return check_iptables("iptables-legacy")


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
        m = re.fullmatch(re.escape(PROBE_CGROUP_PREFIX) + r"(\d+)(?:-\d+)?", name)
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
    """Is bcc importable by meshbpf's Python, and new enough (>= 0.25)? Checked in a child
    process so a broken bcc cannot take the probe down and iptables mode never imports it."""
    proc = _run([python or sys.executable, "-c", "import bcc; print(bcc.__version__)"])
    if proc.returncode != 0:
        return False, f"bcc is not importable: {_last_line(proc)}"
    text = proc.stdout.strip()
    version = parse_bcc_version(text)
    if version is None:
        return False, f"bcc is importable but reports no usable version ({text!r})"
    if version[:2] < MIN_BCC:
        return False, (f"bcc {text} is older than 0.25: it cannot set expected_attach_type, "
                       "so it cannot load cgroup/connect4 or cgroup/getsockopt")
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


# ---------------------------------------------------------------------------------------
# CLI (registered on the root group by meshbpf.cli)
# ---------------------------------------------------------------------------------------
@click.command("probe")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
@click.option("--assume-kernel", metavar="X.Y", envvar=ASSUME_ENV, default=None,
              help=f"Treat kernel features newer than X.Y as absent (also ${ASSUME_ENV}).")
def probe_command(output, assume_kernel):
    """Try each kernel feature meshbpf uses and print the mode it would choose, and why.

    \b
    Examples:
      meshbpf probe
      meshbpf probe -o json
      meshbpf probe --assume-kernel 3.10    # what an old kernel would get
    """
    try:
        report = probe(assume_kernel=assume_kernel)
    except MeshbpfError as e:
        click.echo(f"meshbpf: error: {e}", err=True)
        sys.exit(e.exit_code)
    if output == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(render_text(report))
