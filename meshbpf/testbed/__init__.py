"""The test bed: a throwaway node and pods on this machine, built from network namespaces, a
bridge, veths, cgroup v2 leaves and processes, with Istio-like sidecars (Envoy, HAProxy) and
the apps and clients that send traffic through them.

Used explicitly by the tests, `meshbpf demo` and `meshbpf bench`; product code (the CLI's
attach/detach/status, the interceptors, the loaders) never imports it, and
tests/unit/test_layout.py keeps it that way.

    node.py     the node (netns + bridge, run ids, cgroup, pins) and cleanup of stale runs
    pods.py     pods: netns, veth, addresses, cgroup leaf; their processes
    procs.py    running a process in a pod (fork, setns, setuid), the interpreter pods run
    sidecar.py  Envoy/HAProxy configured like Istio's sidecar, started in a pod
    traffic.py  apps and clients that tests, the demo and the benchmark run in pods
"""

from .node import Sandbox
from .pods import SandboxPod, pod_addresses
from .procs import Proc, pod_python
from .sidecar import HAProxy, Sidecar

__all__ = ["Sandbox", "SandboxPod", "Proc", "Sidecar", "HAProxy", "pod_addresses", "pod_python"]
