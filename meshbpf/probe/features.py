"""The kernel features meshbpf uses and the mode they select. Pure: testable without root.

`FEATURES` says, for each feature, its first mainline kernel, what it enables, and whether
its absence drops the node to iptables (REQUIRED) or only takes away a named capability
(DEGRADES). `apply_assumption` applies `--assume-kernel`; `decide`, `degraded`,
`inbound_reuseport` and `build_report` turn check results ({name: {"ok", "detail"}}) into
the mode and the report `meshbpf probe` prints. The checks themselves are in prober.py.
"""

import re
from dataclasses import dataclass

from ..errors import UsageError

ASSUME_ENV = "MESHBPF_ASSUME_KERNEL"
# Comma list of feature names to treat as absent although the kernel has them, so this
# machine can load and test the variant an older kernel gets (e.g. 5.10's data path:
# netns_cookie_sock_ops,netns_cookie_sockopt). Applied by the probe and by the loader.
DISABLE_ENV = "MESHBPF_DISABLE_FEATURES"

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
    # meshbpf keys capture listeners by the pod's netns cookie: before SO_NETNS_COOKIE
    # (5.14) user space reads it through BPF (meshbpf/netnscookie.py), so 5.9 is enough.
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
    Feature("cgroup_getpeername4", "cgroup/getpeername4", (5, 8), DEGRADES,
            "show apps the IPv4 peer they dialled", "apps see the sidecar as peer"),
    Feature("cgroup_getpeername6", "cgroup/getpeername6", (5, 8), DEGRADES,
            "show apps the IPv6 peer they dialled", "apps see the sidecar as peer"),
    Feature("ringbuf", "BPF ring buffers", (5, 8), DEGRADES,
            "follow interception decisions as they happen (meshbpf trace)",
            "no `meshbpf trace`: decisions show only in the counters"),
    Feature("sk_lookup", "sk_lookup programs", (5, 9), DEGRADES,
            "hand a new connection that reuses a TIME_WAIT 4-tuple to the sidecar",
            "no sk_lookup: inbound connections reusing a TIME_WAIT 4-tuple stall until it "
            "expires"),
    # Without it user space asks bpf_get_netns_cookie in a throwaway cgroup/connect4
    # program (meshbpf/netnscookie.py), which netns_cookie_sock_addr already requires.
    Feature("so_netns_cookie", "SO_NETNS_COOKIE", (5, 14), INFO,
            "learn a pod's netns cookie from user space directly (without it: through a "
            "throwaway cgroup/connect4 program)"),
    # Without it sock_ops and sk_msg find the netns through the socket's BTF (tcp_sock ->
    # struct net -> ns.inum, mapped to the cookie by netns_ino), which splice_backpressure's
    # check proves: bpf_skc_to_tcp_sock + BTF loads in those programs (5.10 has both).
    Feature("netns_cookie_sock_ops", "bpf_get_netns_cookie in sock_ops and sk_msg", (5, 15),
            REQUIRED, "key per-connection state by network namespace",
            covered_by=("splice_backpressure",)),
    # 5.15, not 5.8: Debian 11's 5.10 rejects helper 122 in sockopt programs, 6.1 accepts
    # it (tests/vm boots both). Without it getsockopt cannot tell pods' equal loopback
    # 4-tuples apart: sock_ops puts the original destination on the sidecar's accepted
    # socket (socket storage) instead.
    Feature("netns_cookie_sockopt", "bpf_get_netns_cookie in cgroup/getsockopt", (5, 15),
            DEGRADES, "answer SO_ORIGINAL_DST for loopback connections nobody redirected",
            "SO_ORIGINAL_DST is not answered for a loopback connection the sidecar did not "
            "capture (conntrack answers its own address there)"),
    Feature("cgroup2", "cgroup v2", (4, 5), REQUIRED,
            "attach programs that see the pods' sockets",
            fix="mount it: mount -t cgroup2 none /sys/fs/cgroup/unified"),
    Feature("bpffs", "bpffs", (4, 4), REQUIRED,
            "pin programs and maps so interception outlives the agent",
            fix="mount it: mount -t bpf bpf /sys/fs/bpf"),
    Feature("bcc", "bcc >= 0.18", None, REQUIRED,
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


def disabled_features(environ=None):
    """The feature names MESHBPF_DISABLE_FEATURES names (a set; UsageError for an unknown
    name, so a typo never silently tests the wrong variant)."""
    import os
    raw = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    unknown = sorted(names - set(BY_NAME))
    if unknown:
        raise UsageError(f"{DISABLE_ENV}: unknown feature {', '.join(unknown)}",
                         hint="names as in `meshbpf probe -o json` (features)")
    return names


def apply_assumption(results, assume_kernel, environ=None):
    """A copy of `results` with every feature newer than `assume_kernel`, and every feature
    MESHBPF_DISABLE_FEATURES names, marked not ok."""
    out = {k: dict(v) for k, v in results.items()}
    for name in disabled_features(environ):
        out[name] = {"ok": False, "detail": f"disabled by {DISABLE_ENV}"}
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
    if detail.startswith("not tried"):
        # e.g. the inbound probe without a usable bcc: no verdict on the kernel.
        return f"{f.title} could not be checked ({detail}), needed to {f.enables}"
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
    missing = [f for f in FEATURES if f.role == REQUIRED and not _ok(results, f.name)
               and not (f.covered_by and all(_ok(results, n) for n in f.covered_by))]
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
