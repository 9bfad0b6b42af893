"""Shared test plumbing: the `kernel` and `vm` markers and the MESHBPF_REQUIRE_KERNEL rule.

Kernel tests need root, bpffs, cgroup v2 and network namespaces. Where those are missing
they skip with the reason, unless MESHBPF_REQUIRE_KERNEL=1 (set by `make test` and CI),
which turns every such skip into a failure, so a machine that should run them cannot pass
green without running them.
"""

import os
import pytest

REQUIRE = os.environ.get("MESHBPF_REQUIRE_KERNEL") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


_BPFFS_WAS_MOUNTED = None


def pytest_sessionstart(session):
    global _BPFFS_WAS_MOUNTED
    from meshbpf import system
    _BPFFS_WAS_MOUNTED = system.bpffs_mounted()


def pytest_sessionfinish(session, exitstatus):
    # Kernel tests mount bpffs when the machine has none; leave the machine as we found it.
    if _BPFFS_WAS_MOUNTED is False and os.geteuid() == 0:
        from meshbpf import system
        system.release_bpffs()


# MESHBPF_KERNEL_GATE=iptables: the selected kernel tests are iptables ones, which need root
# and network namespaces but not cgroup v2 or bpffs (a VM tier guest on CentOS 7's 3.10).
GATE_ENV = "MESHBPF_KERNEL_GATE"


def kernel_unavailable_reason():
    """Why kernel tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespaces"
    if os.environ.get(GATE_ENV) == "iptables":
        return None
    try:
        from meshbpf import system
        system.cgroup2_mount()
        system.ensure_bpffs()
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        return f"kernel tests cannot run: {e}"
    return None


def pytest_collection_finish(session):
    # The VM tier's guests boot in the background from here on (tests/vm/tier.py).
    items = [item for item in session.items if item.get_closest_marker("vm")]
    if items:
        from tests.vm import tier
        tier.start(tier.selected(items))


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "kernel" not in item.keywords:
            continue
        if not checked:
            reason, checked = kernel_unavailable_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # Under MESHBPF_REQUIRE_KERNEL=1 a kernel test that skips for any reason fails. An
    # expected failure (xfail, reported as skipped) ran: it is not a skip.
    if REQUIRE and ("kernel" in item.keywords or "vm" in item.keywords) and rep.skipped \
            and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.longrepr = f"kernel test skipped under MESHBPF_REQUIRE_KERNEL=1: {reason}"


@pytest.fixture(scope="session")
def shared_dir():
    """../shared next to the repo (the design and conformance suite)."""
    if not os.path.isdir(SHARED):
        pytest.fail(f"{SHARED} is missing: the conformance cases live there")
    return SHARED
