"""Kernel feature probes and the data-path mode they select (`meshbpf probe`).

Find out, by trying, what this machine can do for meshbpf, and say which mode (`ebpf` or
`iptables`) that gives and why, in words:

  features.py  pure: the feature table, --assume-kernel, the decision and the report
  prober.py    the real checks (throwaway programs, maps, cgroup, netns); `probe()`
  inbound.py   inbound steering tried for real in a throwaway netns (needs bcc)
  command.py   the click command and its text rendering
"""

from .command import probe_command, render_text
from .features import FEATURES, build_report, decide, degraded
from .prober import probe

__all__ = ["probe", "decide", "degraded", "build_report", "FEATURES", "probe_command",
           "render_text"]
