"""RLIMIT_MEMLOCK for processes that load BPF programs or create maps.

Before Linux 5.11 the kernel charges BPF maps and programs to RLIMIT_MEMLOCK (64 KiB by
default, Debian 11 and Amazon Linux 2 included): past it every bpf(2) load fails with EPERM,
which reads like a missing feature. 5.11+ charges the memory cgroup instead and ignores the
limit. `raise_memlock()` lifts the limit to infinity (or the hard limit) once per process;
children inherit it. Called by the probe, the loader and bpfsys's load/create calls.
"""

import os
import re
import resource

from .errors import UnsupportedError

MEMCG_ACCOUNTING = (5, 11)   # first kernel that no longer charges BPF memory to the rlimit
_done = False


def charges_memlock(release=None):
    """Does kernel `release` charge BPF memory to RLIMIT_MEMLOCK (before 5.11)?"""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) < MEMCG_ACCOUNTING


def _fmt(limit):
    return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit // 1024} KiB"


def raise_memlock(release=None, getrlimit=resource.getrlimit, setrlimit=resource.setrlimit):
    """Lift RLIMIT_MEMLOCK for BPF; returns the soft limit now in force.

    Tries infinity, then the hard limit. Where it stays finite and the kernel charges BPF
    memory to it (< 5.11), raises UnsupportedError saying so; on newer kernels the limit
    does not matter and a failure to raise it is ignored.
    """
    global _done
    inf = resource.RLIM_INFINITY
    soft, hard = getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == inf:
        _done = True
        return soft
    for want in ((inf, inf), (hard, hard)):
        try:
            setrlimit(resource.RLIMIT_MEMLOCK, want)
            soft = want[0]
            break
        except (ValueError, OSError):
            continue
    if soft != inf and charges_memlock(release):
        raise UnsupportedError(
            f"RLIMIT_MEMLOCK is {_fmt(soft)} and cannot be raised: this kernel (before 5.11) "
            "charges BPF programs and maps to it, so loading them would fail with EPERM",
            hint="run meshbpf as root (CAP_SYS_RESOURCE), or raise the limit "
                 "(ulimit -l unlimited; systemd: LimitMEMLOCK=infinity)")
    _done = True
    return soft


def ensure():
    """raise_memlock() once per process (cheap to call before every load)."""
    if not _done:
        raise_memlock()
