"""deploy/base as a cluster gets it: the rendered manifests validate offline (PyPI's
kubernetes-validate --strict) for every Kubernetes from 1.28 to 1.37, and the security
posture is what the README documents: no privileged agent, each capability named with its
reason, RBAC only reads pods, the host paths the agent needs and no others."""

import copy
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests import deploy as D

VERSIONS = [f"1.{m}.0" for m in range(28, 38)]
VALIDATE = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
CAPS = {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE",
        "DAC_OVERRIDE"}
HOST_PATHS = {"/sys/fs/bpf", "/sys/fs/cgroup", "/proc", "/run/netns", "/run/meshbpf",
              "/opt/cni/bin", "/etc/cni/net.d", "/lib/modules", "/usr/src"}


@pytest.fixture(scope="module")
def rendered():
    return D.render()


def validate(path, version):
    return subprocess.run([VALIDATE, "--strict", "-k", version, path], capture_output=True,
                          text=True, timeout=300)


def known_versions():
    from kubernetes_validate import utils
    return set(utils.all_versions())


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly_offline(rendered, version, tmp_path):
    # A version the installed kubernetes-validate ships no schema for fails here, by name:
    # it is never counted as validated.
    assert version in known_versions(), (
        f"kubernetes-validate {_kv_version()} has no schemas for Kubernetes {version}: "
        "these manifests are NOT validated for it")
    docs, text = rendered
    path = tmp_path / "meshbpf.yaml"
    path.write_text(text)
    out = validate(str(path), version)
    assert out.returncode == 0, out.stdout + out.stderr
    passed = re.findall(r"passed for resource (\S+) against version", out.stdout + out.stderr)
    assert len(passed) == len(docs) == 6, out.stdout + out.stderr


def _kv_version():
    from importlib.metadata import version
    return version("kubernetes-validate")


def test_strict_validation_catches_an_unknown_field(rendered, tmp_path):
    # the check above is worth something only if --strict rejects what a cluster rejects
    docs, _ = rendered
    bad = copy.deepcopy(D.daemonset(docs))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = validate(str(path), VERSIONS[0])
    assert out.returncode != 0 and "privilegd" in out.stdout + out.stderr


def test_the_fallback_loader_renders_what_kubectl_renders():
    if not shutil.which("kubectl"):
        pytest.fail("no kubectl to compare the loader with (run `make setup`)")
    assert D.load() == [d for d in yaml.safe_load_all(D.kubectl_render()) if d]


def _pod(docs):
    return D.daemonset(docs)["spec"]["template"]["spec"]


def _containers(docs):
    spec = _pod(docs)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_only_the_bpffs_mount_step_is_privileged_and_bidirectional_only_there(rendered):
    docs, _ = rendered
    cs = _containers(docs)
    privileged = {n for n, c in cs.items() if c.get("securityContext", {}).get("privileged")}
    assert privileged == {"mount-bpffs"}
    assert cs["mount-bpffs"]["args"] == [
        '[ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ] || mount -t bpf bpf /sys/fs/bpf']
    # Kubernetes allows Bidirectional propagation in privileged containers only
    for n, c in cs.items():
        for m in c.get("volumeMounts", []):
            if m.get("mountPropagation") == "Bidirectional":
                assert n in privileged, (n, m)
    assert [m["name"] for m in cs["mount-bpffs"]["volumeMounts"]] == ["bpffs"]


def test_the_agent_has_exactly_the_documented_capabilities(rendered):
    docs, _ = rendered
    sc = _containers(docs)["meshbpf"]["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS
    assert sc["privileged"] is False and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] == 0
    with open(os.path.join(D.BASE, "daemonset.yaml")) as f:
        source = f.read()
    for cap in CAPS:                       # each one has its reason written beside it
        assert re.search(rf"^\s*#\s+{cap}\s+\S", source, re.M), cap
    # the CNI installer only writes root-owned host directories
    isc = _containers(docs)["install-cni"]["securityContext"]
    assert isc["capabilities"] == {"drop": ["ALL"]} and isc["allowPrivilegeEscalation"] is False


def test_rbac_only_reads_pods(rendered):
    docs, _ = rendered
    assert not D.by_kind(docs, "Role") and not D.by_kind(docs, "RoleBinding")
    (role,) = D.by_kind(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    (binding,) = D.by_kind(docs, "ClusterRoleBinding")
    (sa,) = D.by_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert _pod(docs)["serviceAccountName"] == sa["metadata"]["name"]


def test_node_wide_placement(rendered):
    docs, _ = rendered
    spec = _pod(docs)
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["terminationGracePeriodSeconds"] > 2


def test_host_mounts(rendered):
    docs, _ = rendered
    spec = _pod(docs)
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host.values()) == HOST_PATHS
    mounts = {m["name"]: m for m in _containers(docs)["meshbpf"]["volumeMounts"]}
    by_path = {host[n]: m for n, m in mounts.items() if n in host}
    assert by_path["/proc"]["mountPath"] == "/host/proc" and by_path["/proc"]["readOnly"]
    # what the runtime mounts after the agent started must reach it
    for p in ("/sys/fs/bpf", "/run/netns", "/sys/fs/cgroup"):
        assert by_path[p]["mountPropagation"] == "HostToContainer", p
        assert by_path[p]["mountPath"] == p
    assert by_path["/run/meshbpf"]["mountPath"] == "/run/meshbpf"
    assert by_path["/lib/modules"]["readOnly"] and by_path["/usr/src"]["readOnly"]
    # the agent itself does not write the CNI directories: the init step does
    assert "/opt/cni/bin" not in by_path and "/etc/cni/net.d" not in by_path
    cni = {host[m["name"]]: m["mountPath"]
           for m in _containers(docs)["install-cni"]["volumeMounts"]}
    assert cni == {"/opt/cni/bin": "/host/opt/cni/bin", "/etc/cni/net.d": "/host/etc/cni/net.d"}
    assert _containers(docs)["install-cni"]["args"] == [
        "cni", "install", "--bin-dir", "/host/opt/cni/bin", "--conf-dir", "/host/etc/cni/net.d"]


def test_agent_command_probes_metrics_and_stop(rendered):
    docs, _ = rendered
    ds = D.daemonset(docs)
    c = _containers(docs)["meshbpf"]
    args = c["args"]
    assert c["command"] == ["meshbpf"] and args[0] == "daemon" and "--kube" in args
    opt = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)}
    assert opt["--cni-socket"] == "/run/meshbpf/cni.sock"
    assert opt["--metrics-addr"] == ":9841" and opt["--log-format"] == "json"
    assert opt["--pods-file"] == "/etc/meshbpf/pods.yaml"
    assert "--cleanup-on-exit" not in args             # SIGTERM leaves interception
    assert c["env"] == [{"name": "NODE_NAME",
                         "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    port = c["ports"][0]["containerPort"]
    assert port == 9841
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)
    pre = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert "meshbpf" not in pre and "detach" not in pre and "cleanup" not in pre
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    (cm,) = D.by_kind(docs, "ConfigMap")
    assert yaml.safe_load(cm["data"]["pods.yaml"]) == {"pods": []}


def test_image_tag_is_the_package_version(rendered):
    docs, _ = rendered
    with open(os.path.join(D.REPO, "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    images = {c["image"] for c in _containers(docs).values()}
    assert images == {f"localhost/meshbpf:{version}"}


def test_the_manifests_commands_are_what_the_cli_accepts(rendered):
    # parsed by the real commands (nothing run): a renamed or missing option fails here,
    # not in a crash-looping pod
    import warnings

    import click

    from meshbpf.cli import main as cli

    def rest(ctx):                      # Click 8.2 deprecates protected_args, 9 drops it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(getattr(ctx, "protected_args", [])) + list(ctx.args)

    docs, _ = rendered
    for name in ("meshbpf", "install-cni"):
        c = _containers(docs)[name]
        assert c["command"] == ["meshbpf"]
        ctx = cli.make_context("meshbpf", list(c["args"]))
        group, args = ctx.command, rest(ctx)
        while isinstance(group, click.Group):
            sub = group.get_command(ctx, args[0])
            assert sub is not None, (name, args[0])
            ctx = sub.make_context(args[0], args[1:], parent=ctx)
            group, args = sub, rest(ctx)
        assert not args, (name, args)
