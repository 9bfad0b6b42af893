"""meshbpf.pod.guard_netns and host workloads (reads /proc only, changes nothing)."""

import os
import threading

import pytest

from meshbpf import pod as podmod
from meshbpf.errors import UsageError


def test_own_netns_is_refused_except_for_a_host_workload():
    with pytest.raises(UsageError, match="machine's own network namespace"):
        podmod.guard_netns("/proc/self/ns/net")
    with podmod.host_netns_allowed():
        podmod.guard_netns("/proc/self/ns/net")          # a host workload's: allowed
        podmod.guard_netns(f"/proc/{os.getpid()}/ns/net")
    with podmod.host_netns_allowed(False), pytest.raises(UsageError):
        podmod.guard_netns("/proc/self/ns/net")
    with pytest.raises(UsageError):                       # the allowance ended with the block
        podmod.guard_netns("/proc/self/ns/net")


def test_the_allowance_is_not_shared_with_another_thread():
    seen = []

    def other():
        try:
            podmod.guard_netns("/proc/self/ns/net")
            seen.append("allowed")
        except UsageError:
            seen.append("refused")

    with podmod.host_netns_allowed():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == ["refused"]


def test_is_own_netns():
    assert podmod.is_own_netns("/proc/self/ns/net")
    assert not podmod.is_own_netns("/nonexistent")
