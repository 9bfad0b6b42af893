"""The agent's container image, built here (deploy/build-image.sh: podman, a local Debian
base, cached by content) and run as the DaemonSet runs it: the rendered DaemonSet's
hostPath mounts (with their propagation and read-only flags), its capabilities (all others
dropped, not privileged), read-only root, host PID and network namespaces, its pods file
mounted as the ConfigMap is. Against test-bed pods with a real Envoy sidecar on this host:
a pod named in the pods file is intercepted, then detached when the entry goes; a pending
entry is enrolled by meshbpf-cni's ADD on the host through the agent's socket in the
DaemonSet's /run/meshbpf mount, and detached by its DEL. Only the
test's own pin prefix, cgroup and netns are touched; the container, pins and records go
also when the test fails."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests import deploy as D
from meshbpf.testbed import Sandbox, agentfiles, traffic

# the first test may build the image (debootstrap, apt, pip: minutes on a fresh machine)
pytestmark = [pytest.mark.kernel, pytest.mark.slow, pytest.mark.timeout(1800)]

OUT_CX = "tcp.outbound.downstream_cx_total"
# runc, cgroupfs, and vfs storage where podman's storage is on overlayfs (deploy/podman.sh)
PODMAN = ["bash", os.path.join(D.REPO, "deploy", "podman.sh")]
# this kind of machine refuses the runtime's default rlimits: set them explicitly
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
# CAP_* numbers (linux/capability.h) of the names the DaemonSet adds
CAP_BITS = {"NET_RAW": 13, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21,
            "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39, "DAC_OVERRIDE": 1}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image():
    for tool in ("podman", "runc", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing: scripts/setup.sh installs it"
    out = subprocess.run(["bash", os.path.join(D.REPO, "deploy", "build-image.sh")],
                         capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


# host directories made here as the kubelet makes a DirectoryOrCreate hostPath, removed again
# (if still empty) when the test ends: a fresh machine has no /run/meshbpf or /opt/cni/bin
_made = []


@pytest.fixture(autouse=True)
def _remove_made_host_dirs():
    yield
    while _made:
        with contextlib.suppress(OSError):
            os.rmdir(_made.pop())


def _directory_or_create(path):
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        _made.append(d)


def podman_args(ds, config_dir=None, container="meshbpf", host_paths=None):
    """`podman run` options that give a container what the kubelet gives one of the
    DaemonSet's containers: its mounts (hostPath as bind mounts with the same propagation,
    or from a test directory standing in for that host path in `host_paths`; the ConfigMap
    as a read-only directory, emptyDir as tmpfs), its security context, the host's PID and
    network namespaces, its environment."""
    spec = ds["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == container]
    host_paths = host_paths or {}
    vols = {v["name"]: v for v in spec["volumes"]}
    args = []
    assert spec["hostPID"] and spec["hostNetwork"]
    args += ["--pid", "host", "--network", "host"]
    for m in c["volumeMounts"]:
        v = vols[m["name"]]
        ro = ",ro" if m.get("readOnly") else ""
        if "hostPath" in v:
            prop = {"HostToContainer": "rslave", "Bidirectional": "rshared"}.get(
                m.get("mountPropagation"), "rprivate")
            src = host_paths.get(v["hostPath"]["path"], v["hostPath"]["path"])
            if v["hostPath"].get("type") == "DirectoryOrCreate":
                _directory_or_create(src)
            args += ["--mount", f"type=bind,src={src},dst={m['mountPath']}"
                                f",bind-propagation={prop}{ro}"]
        elif "configMap" in v:
            args += ["--mount", f"type=bind,src={config_dir},dst={m['mountPath']}{ro}"]
        elif "emptyDir" in v:
            args += ["--mount", f"type=tmpfs,dst={m['mountPath']}"]
        else:
            raise AssertionError(f"volume kind the test cannot give: {v}")
    sc = c["securityContext"]
    assert not sc.get("privileged")
    args += ["--user", str(sc["runAsUser"])]
    if sc["capabilities"]["drop"] == ["ALL"]:
        args += ["--cap-drop", "all"]
    for cap in sc["capabilities"].get("add", []):
        args += ["--cap-add", f"CAP_{cap}"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    # seccomp RuntimeDefault: podman's default profile, as containerd's, is applied
    for e in c.get("env", []):
        assert e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        args += ["-e", f"{e['name']}={socket.gethostname()}"]
    return args


def agent_args(ds, sb, port, kubeconfig=None):
    """The DaemonSet's agent arguments, with this test's own CNI socket and metrics port for
    the node-wide ones; --kube with a kubeconfig for the local API server (the DaemonSet's
    in-cluster config needs a cluster), or without --kube."""
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "meshbpf"]
    out, args = [], list(c["args"])
    while args:
        a = args.pop(0)
        if a == "--kube":
            if kubeconfig:
                out += [a, "--kubeconfig", kubeconfig]
            continue
        if a in ("--cni-socket", "--metrics-addr"):
            args.pop(0)  # the DaemonSet's value; the test's own follows
            if a == "--cni-socket":
                out += [a, os.path.join(sb.state_dir, "cni.sock")]
            elif a == "--metrics-addr":
                out += [a, f"127.0.0.1:{port}"]
            continue
        out.append(a)
    return out + ["--cgroup-root", sb.cgroup_root, "--mode", "ebpf"]


def cni(sb, command, pod, sock):
    """meshbpf-cni run on the host as a runtime runs the last plugin of a chain."""
    import meshbpf.cni.plugin
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": pod.netns}],
            "ips": [{"address": f"{pod.ip4}/16", "interface": 0}]}
    conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "meshbpf-cni",
            "agent_socket": sock, "prevResult": prev}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee" + sb.id.replace("-", ""),
           "CNI_NETNS": pod.netns, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a;"
                       "K8S_POD_UID=0b5e1d2c-3f4a-4b6c-8d7e-9f0a1b2c3d4e",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(["/usr/bin/python3", "-I", meshbpf.cni.plugin.__file__],
                          input=json.dumps(conf), env=env, capture_output=True, text=True,
                          timeout=60)


def capabilities(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int([line for line in f if line.startswith(field + ":")][0].split()[1], 16)


def write_pods(config_dir, pods):
    """As the kubelet updates a ConfigMap volume: new content, renamed over."""
    agentfiles.write_pods(os.path.join(config_dir, "pods.yaml"), pods)


def remove_agent(name, sb):
    """The agent's container gone, and whatever interception it left on the test node."""
    subprocess.run(PODMAN + ["rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "meshbpf", "cleanup", "--pin-prefix", sb.pin_prefix,
                    "--cgroup-root", sb.cgroup_root], cwd=D.REPO, capture_output=True,
                   timeout=60)


def through_sidecar(env, pod, host):
    before = env.stats().get(OUT_CX, 0)
    traffic.http_get(pod, host, 8080)
    return env.stats().get(OUT_CX, 0) - before


def agent_doc(sb):
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(sb.state_dir, "agent.json")) as f:
            return json.load(f)
    return None


def pod_state(sb, name):
    return {p["name"]: p for p in (agent_doc(sb) or {}).get("pods", [])}.get(name, {}).get("state")


def running(name):
    return subprocess.run(PODMAN + ["inspect", "--format", "{{.State.Running}}", name],
                          capture_output=True, text=True, timeout=60).stdout.strip() == "true"


def wait(pred, timeout, what, logs, name):
    end = time.monotonic() + timeout
    n = 0
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        n += 1
        if n % 20 == 0 and not running(name):
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{logs()[-4000:]}")


def test_agent_image_intercepts_a_pods_file_pod_with_the_daemonsets_mounts_and_caps(image):
    docs, _ = D.render()
    ds = D.daemonset(docs)
    with Sandbox(name="image") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        config_dir = os.path.join(sb.tmpdir, "config")
        os.makedirs(config_dir)
        write_pods(config_dir, [])
        port = _free_port()
        name = f"meshbpf-test-{sb.id}"
        run = PODMAN + ["run", "-d", "--name", name, *ULIMITS,
                        "-e", f"MESHBPF_PIN_PREFIX={sb.pin_prefix}",
                        *podman_args(ds, config_dir), image, *agent_args(ds, sb, port)]

        def logs():
            out = subprocess.run(PODMAN + ["logs", name], capture_output=True, text=True,
                                 timeout=60)
            state = subprocess.run(PODMAN + ["inspect", "--format", "{{.State.Status}} "
                                             "{{.State.ExitCode}}", name],
                                   capture_output=True, text=True, timeout=60).stdout
            return f"{out.stdout}{out.stderr}\ncontainer: {state}\n{' '.join(run)}"

        try:
            started = subprocess.run(run, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stderr
            wait(lambda: agent_doc(sb), 120, "the agent's first reconcile", logs, name)
            assert through_sidecar(env, a, b.ip4) == 0          # not listed yet

            # the agent runs unprivileged, with exactly the DaemonSet's capabilities
            pid = int(subprocess.run(PODMAN + ["inspect", "--format", "{{.State.Pid}}", name],
                                     capture_output=True, text=True, timeout=60).stdout)
            # (less any this machine itself lacks: this kind of VM has no CAP_SYS_RESOURCE, so
            # no container here has it either; BPF maps are charged to the memory cgroup on
            # its kernel, not to RLIMIT_MEMLOCK, which is all the DaemonSet wants it for)
            want = sum(1 << CAP_BITS[c] for c in
                       ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                       ["capabilities"]["add"]) & capabilities("self", "CapBnd")
            assert capabilities(pid, "CapEff") == want, (hex(capabilities(pid, "CapEff")), hex(want))

            write_pods(config_dir, [{"name": "a", "netns": a.netns, "cgroup": a.cgroup}])
            wait(lambda: pod_state(sb, "a") == "attached", 30, "pod a attached", logs, name)
            assert through_sidecar(env, a, b.ip4) == 1
            ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert ready.status == 200
            # pinned where the host sees them (bpffs mounted from the host, not the container's)
            assert os.path.isdir(sb.pin_prefix) and os.listdir(sb.pin_prefix)

            write_pods(config_dir, [])
            wait(lambda: pod_state(sb, "a") is None and agent_doc(sb) is not None, 30,
                 "pod a detached", logs, name)
            assert through_sidecar(env, a, b.ip4) == 0

            # the same pod enrolled by meshbpf-cni on the host, through the agent's socket
            # in the DaemonSet's /run/meshbpf mount (a pending entry the ADD completes)
            sock = os.path.join(sb.state_dir, "cni.sock")
            write_pods(config_dir, [{"name": "shop/a", "cgroup": a.cgroup}])
            wait(lambda: pod_state(sb, "shop/a") == "pending" and os.path.exists(sock),
                 30, "the pending entry and the CNI socket", logs, name)
            added = cni(sb, "ADD", a, sock)
            assert added.returncode == 0, added.stdout + added.stderr
            assert json.loads(added.stdout)["ips"][0]["address"] == f"{a.ip4}/16"
            assert pod_state(sb, "shop/a") == "attached"
            assert through_sidecar(env, a, b.ip4) == 1
            deleted = cni(sb, "DEL", a, sock)
            assert deleted.returncode == 0, deleted.stdout + deleted.stderr
            wait(lambda: pod_state(sb, "shop/a") == "pending", 10, "shop/a detached", logs,
                 name)
            assert through_sidecar(env, a, b.ip4) == 0
            stop = subprocess.run(PODMAN + ["stop", "-t", "20", name], capture_output=True,
                                  text=True, timeout=60)
            assert stop.returncode == 0, stop.stderr
            assert '"level": "error"' not in logs().split("\ncontainer: ")[0], logs()
        finally:
            remove_agent(name, sb)
        assert subprocess.run(PODMAN + ["container", "exists", name]).returncode == 1


def _mounts_at(path):
    with open("/proc/self/mountinfo") as f:
        return [line.split(" - ")[1].split()[0] for line in f if line.split()[4] == path]


def test_the_bpffs_init_step_mounts_bpffs_for_the_host_and_is_a_no_op_the_second_time(
        image, tmp_path):
    """The mount-bpffs init container, as its manifest says (privileged, Bidirectional), on a
    test directory standing in for the node's /sys/fs/bpf: the bpffs it mounts is the host's
    and outlives the container (pins survive agent restarts); a second run changes nothing."""
    docs, _ = D.render()
    spec = D.daemonset(docs)["spec"]["template"]["spec"]
    (init,) = [c for c in spec["initContainers"] if c["name"] == "mount-bpffs"]
    assert init["securityContext"]["privileged"] is True
    (m,) = init["volumeMounts"]
    assert m["mountPropagation"] == "Bidirectional"
    node_bpffs = str(tmp_path / "bpffs")
    os.makedirs(node_bpffs)
    # a kubelet's hostPath for Bidirectional must be a shared mount: make the test directory one
    subprocess.run(["mount", "--bind", node_bpffs, node_bpffs], check=True)
    try:
        subprocess.run(["mount", "--make-shared", node_bpffs], check=True)
        run = PODMAN + ["run", "--rm", *ULIMITS, "--privileged", "--mount",
                        f"type=bind,src={node_bpffs},dst={m['mountPath']},bind-propagation=rshared",
                        "--entrypoint", init["command"][0], image, *init["command"][1:],
                        *init["args"]]
        for attempt in (1, 2):
            out = subprocess.run(run, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert _mounts_at(node_bpffs)[-1] == "bpf", (attempt, _mounts_at(node_bpffs))
            assert _mounts_at(node_bpffs).count("bpf") == 1, attempt   # not mounted twice
    finally:
        while _mounts_at(node_bpffs):
            subprocess.run(["umount", node_bpffs], check=True)


CONFLIST = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": True,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}


def test_the_install_cni_step_chains_meshbpf_cni_as_its_manifest_runs_it(image, tmp_path):
    """The install-cni init container with its manifest's security context (every capability
    dropped, no privilege escalation, read-only root) and mounts, on test directories standing
    in for the node's /opt/cni/bin and /etc/cni/net.d: the plugin lands in the bin dir, runs
    on this host's Python, is chained last into the node's conflist; a second run (a
    restarted pod) changes no byte."""
    docs, _ = D.render()
    ds = D.daemonset(docs)
    (init,) = [c for c in ds["spec"]["template"]["spec"]["initContainers"]
               if c["name"] == "install-cni"]
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (conf_dir / "10-podnet.conflist").write_text(json.dumps(CONFLIST, indent=2))
    run = PODMAN + ["run", "--rm", *ULIMITS,
                    *podman_args(ds, container="install-cni",
                                 host_paths={"/opt/cni/bin": str(bin_dir),
                                             "/etc/cni/net.d": str(conf_dir)}),
                    "--entrypoint", init["command"][0], image, *init["args"]]

    def snapshot():
        return {str(p.relative_to(tmp_path)): p.read_bytes()
                for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    chained = json.loads((conf_dir / "10-podnet.conflist").read_text())
    assert [p["type"] for p in chained["plugins"]] == ["bridge", "portmap", "meshbpf-cni"]
    plugin = bin_dir / "meshbpf-cni"
    assert os.access(plugin, os.X_OK)
    ver = subprocess.run([str(plugin)], input="{}", capture_output=True, text=True,
                         timeout=30, env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    assert ver.returncode == 0, ver.stderr
    assert "1.0.0" in json.loads(ver.stdout)["supportedVersions"]
    first = snapshot()
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert snapshot() == first


def test_agent_image_intercepts_a_pod_from_the_kubernetes_api(image, tmp_path):
    """The agent in the image with the DaemonSet's --kube, its NODE_NAME, mounts and
    capabilities, against the local API server (meshbpf.testbed.kubeapi) on this host: a pod
    object for this node is intercepted (found by its UID through the kubelet-like pod<uid>
    cgroup), one for another node is not, a deleted one is detached."""
    import uuid

    import yaml

    from meshbpf.testbed.kubeapi import KubeAPIServer

    data = os.path.join(D.REPO, "tests", "data", "k8s", "watch-istio-running.yaml")
    node = socket.gethostname()                     # what podman_args gives as NODE_NAME

    def pod_object(name, uid, on=node):
        with open(data) as f:
            p = yaml.safe_load(f)
        p["metadata"].update(name=name, uid=uid)
        p["spec"]["nodeName"] = on
        return p

    docs, _ = D.render()
    ds = D.daemonset(docs)
    uid = f"{uuid.uuid4().hex[:8]}-7e57-4b1d-9c0d"
    with Sandbox(name="imgkube") as sb, KubeAPIServer() as api:
        a, b = sb.add_pod(f"pod{uid}"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        config_dir, kube_dir = os.path.join(sb.tmpdir, "config"), str(tmp_path / "kube")
        os.makedirs(config_dir)
        os.makedirs(kube_dir)
        write_pods(config_dir, [])
        api.write_kubeconfig(os.path.join(kube_dir, "kubeconfig"))
        port = _free_port()
        name = f"meshbpf-test-{sb.id}"
        run = PODMAN + ["run", "-d", "--name", name, *ULIMITS,
                        "-e", f"MESHBPF_PIN_PREFIX={sb.pin_prefix}",
                        "--mount", f"type=bind,src={kube_dir},dst=/etc/meshbpf-kube,ro",
                        *podman_args(ds, config_dir), image,
                        *agent_args(ds, sb, port, kubeconfig="/etc/meshbpf-kube/kubeconfig")]

        def logs():
            out = subprocess.run(PODMAN + ["logs", name], capture_output=True, text=True,
                                 timeout=60)
            return f"{out.stdout}{out.stderr}\n{' '.join(run)}"

        try:
            started = subprocess.run(run, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stderr
            wait(lambda: agent_doc(sb), 120, "the agent's first reconcile", logs, name)
            api.wait_watches(1, timeout=60)
            assert through_sidecar(env, a, b.ip4) == 0
            api.add(pod_object("reviews-elsewhere", uid, on="node-b"))
            api.add(pod_object("reviews-v1-5c7f8d9b8-x2kq4", uid))
            pod = "bookinfo/reviews-v1-5c7f8d9b8-x2kq4"
            wait(lambda: pod_state(sb, pod) == "attached", 30, "the API's pod attached", logs,
                 name)
            assert pod_state(sb, "bookinfo/reviews-elsewhere") is None
            assert through_sidecar(env, a, b.ip4) == 1
            api.delete("bookinfo", "reviews-v1-5c7f8d9b8-x2kq4")
            wait(lambda: pod_state(sb, pod) is None, 30, "the API's pod detached", logs, name)
            assert through_sidecar(env, a, b.ip4) == 0
            assert not os.path.exists(os.path.join(sb.state_dir, "pods", f"{uid}.json"))
        finally:
            remove_agent(name, sb)
        assert subprocess.run(PODMAN + ["container", "exists", name]).returncode == 1
