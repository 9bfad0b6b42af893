"""`meshbpf daemon` as a subprocess for kernel tests: started on a test-bed node (its pins,
its cgroup root, metrics on a free loopback port, JSON logs), read through its agent.json,
waited on, stopped. The agent tests, the host-workload tests and the CNI tests share it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from meshbpf.testbed.agentfiles import free_port, write_pods  # noqa: F401 (the tests' API)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class AgentProcess:
    """One agent. `args`: its options beyond the node's (sources, mode, flags). `popen`
    starts it (default subprocess.Popen; e.g. one that enters a netns first). `timeout`:
    the default wait."""

    def __init__(self, sb, *args, popen=subprocess.Popen, env=None, timeout=10, tag="agent"):
        self.sb, self.timeout = sb, timeout
        self.port = free_port()
        self.state = os.path.join(sb.state_dir, "agent.json")
        self.log = open(os.path.join(sb.tmpdir, f"{tag}-{time.monotonic_ns()}.log"), "w+")  # noqa: SIM115 - read after stop()
        self.proc = popen(
            [sys.executable, "-m", "meshbpf", "daemon", "--pin-prefix", sb.pin_prefix,
             "--cgroup-root", sb.cgroup_root, "--metrics-addr", f"127.0.0.1:{self.port}",
             "--log-format", "json", *args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env=env or dict(os.environ, PYTHONPATH=REPO))

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def doc(self):
        """This agent's agent.json (None before it wrote one, or while another's is there)."""
        with contextlib.suppress(OSError, ValueError):
            with open(self.state) as f:
                d = json.load(f)
            if d.get("pid") == self.proc.pid:
                return d
        return None

    def pods(self):
        return {p["name"]: p for p in (self.doc() or {}).get("pods", [])}

    def wait(self, pred, timeout=None, what="condition"):
        end = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.output()}"
            v = pred()
            if v:
                return v
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; agent.json={self.doc()}\n"
                             f"{self.output()[-3000:]}")

    def wait_state(self, name, state, timeout=None):
        return self.wait(lambda: self.pods().get(name, {}).get("state") == state and
                         self.pods()[name], timeout, f"{name} {state}")

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal the agent and wait for it; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)     # the log stays readable: output()

    def kill(self):
        return self.stop(signal.SIGKILL)
