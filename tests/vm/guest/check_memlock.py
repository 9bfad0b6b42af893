"""Inside a VM tier guest: RLIMIT_MEMLOCK on the real kernel. Started with Debian 11's 64 KiB
limit, a process that creates ~1 MiB of BPF maps gets EPERM on kernels before 5.11 unless
meshbpf.memlock lifts the limit; with the helper it works on every kernel."""

import subprocess
import sys

import pytest

from meshbpf import memlock

pytestmark = pytest.mark.kernel

MAPS = r"""
import os, sys
from meshbpf import bpfsys, memlock
if sys.argv[1] == "without":
    memlock._done = True          # as meshbpf was before the helper: nobody raises the limit
fds = [bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, 1024, 64) for _ in range(16)]
print(len(fds))
"""


def _run(mode):
    return subprocess.run(["prlimit", "--memlock=65536:65536", sys.executable, "-c", MAPS, mode],
                          capture_output=True, text=True, timeout=300)


def test_maps_past_64k_load_with_the_helper():
    proc = _run("with")
    assert proc.returncode == 0 and proc.stdout.strip() == "16", proc.stderr[-2000:]


def test_without_the_helper_pre_511_kernels_refuse():
    proc = _run("without")
    if memlock.charges_memlock():
        assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
