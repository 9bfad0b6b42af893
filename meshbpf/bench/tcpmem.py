"""The node's TCP memory, as the kernel accounts it, sampled while a benchmark or test runs.

`/proc/net/sockstat`'s `TCP: ... mem N` is tcp_memory_allocated: pages charged to every TCP
socket of the machine (all network namespaces), the number net.ipv4.tcp_mem limits. A splice
without backpressure shows here first, so throughput figures report its peak beside Gbit/s.
"""

import threading
import time

SOCKSTAT = "/proc/net/sockstat"


def parse_tcp_mem(text):
    """Pages in the `TCP:` line's `mem` field of a sockstat text."""
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], fields[1::2]))
            return int(values["mem"])
    raise ValueError("no TCP line in sockstat")


def tcp_mem_pages(path=SOCKSTAT):
    with open(path) as f:
        return parse_tcp_mem(f.read())


class PeakSampler:
    """`with PeakSampler() as s: ...` then s.peak (pages), s.baseline, s.samples."""

    def __init__(self, interval=0.02, read=tcp_mem_pages):
        self.interval, self._read = interval, read
        self.baseline = self.peak = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = self._read()
            self.peak = v if self.peak is None else max(self.peak, v)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    @property
    def rise(self):
        """Peak pages above what the node held when sampling began."""
        return max(0, (self.peak or 0) - self.baseline)


def wait_settled(threshold_pages, timeout=10.0, read=tcp_mem_pages):
    """Wait until the node's TCP memory is at most `threshold_pages` (sockets of an earlier
    run freed); returns the last reading."""
    deadline = time.monotonic() + timeout
    v = read()
    while v > threshold_pages and time.monotonic() < deadline:
        time.sleep(0.1)
        v = read()
    return v
