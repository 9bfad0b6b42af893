"""classify(): which pods are meshed, by which mesh, with which config.

Istio: the pods of istio-cni's own rule-generation test (one per case, as the injector
writes them, in tests/data/k8s/istio-cni-cases.yaml) must give configs whose iptables
rendering is exactly Istio's CNI golden. Linkerd: pods as linkerd's injector writes them.
"""

import copy
import os

import pytest
import yaml

from meshbpf import istio
from meshbpf.iptables.rules import render
from meshbpf.k8s import mesh
from meshbpf.k8s.mesh import Meshing, classify, pod_id, pod_name

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "k8s")


def _docs(name):
    with open(os.path.join(DATA, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


ISTIO_CASES = {p["metadata"]["annotations"]["meshbpf.test/case"]: p
               for p in _docs("istio-cni-cases.yaml")}
LINKERD = {p["metadata"]["name"]: p for p in _docs("linkerd-pods.yaml")}
OTHERS = {p["metadata"]["name"]: p for p in _docs("other-pods.yaml")}


def _basic():
    return copy.deepcopy(ISTIO_CASES["basic"])


def _annotate(pod, **ann):
    pod["metadata"]["annotations"].update(ann)
    return pod


# ---- Istio: istio-cni's goldens --------------------------------------------------------------

def test_every_istio_cni_golden_has_a_pod(shared_dir):
    goldens = set(os.listdir(os.path.join(shared_dir, "conformance", "istio-iptables", "cni")))
    used = {p["metadata"]["annotations"]["meshbpf.test/golden"] for p in ISTIO_CASES.values()}
    assert len(goldens) == 8 and used == goldens


@pytest.mark.parametrize("case", sorted(ISTIO_CASES))
def test_istio_pod_renders_istio_cni_golden(shared_dir, case):
    pod = ISTIO_CASES[case]
    golden = os.path.join(shared_dir, "conformance", "istio-iptables", "cni",
                          pod["metadata"]["annotations"]["meshbpf.test/golden"])
    with open(golden) as f:
        want = f.read()
    m = classify(pod)
    assert m.meshed and m.mesh == "istio" and not m.left_alone, m.reason
    assert render(m.config, 4) == want
    assert render(m.config, 6) == ""          # no ISTIO_DUAL_STACK on these pods


def test_istio_defaults_come_from_istio_module():
    cfg = classify(_basic()).config
    assert cfg.proxy_port == istio.OUTBOUND_PORT
    assert cfg.inbound_capture_port == istio.INBOUND_PORT
    assert cfg.proxy_uid == str(istio.PROXY_UID) and cfg.proxy_gid == str(istio.PROXY_GID)
    assert cfg.inbound_ports_exclude == ",".join(map(str, istio.INBOUND_PORTS_EXCLUDE))
    assert cfg.outbound_ports_exclude == str(istio.AGENT_PORT)


def test_istio_always_excluded_ports_appended_and_deduplicated_as_written():
    pod = _annotate(_basic(), **{mesh.A_EXCLUDE_IN: "15021,8443"})
    assert classify(pod).config.inbound_ports_exclude == "15021,8443,15020,15090"
    pod = _annotate(_basic(), **{mesh.A_EXCLUDE_IN: " 8443 "})
    assert classify(pod).config.inbound_ports_exclude == "8443,15020,15021,15090"
    # A trailing comma is an empty port item: Istio's validation rejects it.
    assert not classify(_annotate(_basic(), **{mesh.A_EXCLUDE_IN: "8443,"})).meshed
    pod = _annotate(_basic(), **{mesh.A_EXCLUDE_IN: ""})
    assert classify(pod).config.inbound_ports_exclude == "15020,15021,15090"


def test_istio_outbound_exclude_annotation_replaces_the_status_port():
    pod = _annotate(_basic(), **{mesh.A_EXCLUDE_OUT: "5555"})
    assert classify(pod).config.outbound_ports_exclude == "5555"


def test_istio_interfaces_and_dual_stack():
    pod = _annotate(_basic(), **{mesh.A_EXCLUDE_IFACES: "eth1,net2",
                                 mesh.A_KUBEVIRT: "k6t-eth0",
                                 mesh.A_INCLUDE_OUT: "80,443"})
    cfg = classify(pod).config
    assert (cfg.exclude_interfaces, cfg.reroute_virtual_interfaces) == ("eth1,net2", "k6t-eth0")
    assert cfg.outbound_ports_include == "80,443"
    # reroute-virtual-interfaces wins over the deprecated kubevirtInterfaces.
    pod = _annotate(pod, **{mesh.A_REROUTE: "k6t-net1"})
    assert classify(pod).config.reroute_virtual_interfaces == "k6t-net1"
    pod = _basic()
    pod["spec"]["containers"][1]["env"].append({"name": "ISTIO_DUAL_STACK", "value": "true"})
    cfg = classify(pod).config
    assert cfg.enable_ipv6 and render(cfg, 6).startswith("* nat")


def test_istio_native_sidecar_in_init_containers():
    pod = _basic()
    proxy = pod["spec"]["containers"].pop(1)
    proxy["restartPolicy"] = "Always"
    proxy["securityContext"]["runAsUser"] = 4242
    pod["spec"]["initContainers"].append(proxy)
    m = classify(pod)
    assert m.meshed and m.config.proxy_uid == "4242"


@pytest.mark.parametrize("key,value", [
    (mesh.A_MODE, "NONE"),
    (mesh.A_INCLUDE_CIDRS, "10.0.0.0/8,bogus"),
    (mesh.A_INCLUDE_CIDRS, "10.0.0.1"),               # Istio wants a prefix length
    (mesh.A_EXCLUDE_CIDRS, "10.0.0.0/33"),
    (mesh.A_EXCLUDE_IN, "80,http"),
    (mesh.A_INCLUDE_IN, "70000"),
    (mesh.A_EXCLUDE_OUT, "1,,2"),
    (mesh.A_INCLUDE_OUT, "-1"),
    (mesh.A_EXCLUDE_IFACES, "eth0,bad iface"),
    (mesh.A_EXCLUDE_IFACES, "averyveryverylongname"),
    (mesh.A_EXCLUDE_OUT, "*"),                    # Istio accepts it, the config cannot
    (mesh.A_INCLUDE_IN, "0"),                     # a uint16, but no port
])
def test_istio_invalid_annotation_is_not_meshed_and_named(key, value):
    m = classify(_annotate(_basic(), **{key: value}))
    assert not m.meshed and m.config is None and not m.left_alone
    assert m.mesh == "istio" and key in m.reason


def test_istio_invalid_proxy_uid_is_named():
    pod = _basic()
    pod["spec"]["containers"][1]["securityContext"]["runAsUser"] = "root"
    m = classify(pod)
    assert not m.meshed and "runAsUser" in m.reason


def test_istio_init_pod_left_alone():
    m = classify(OTHERS["reviews-v1-5c8b9f7d6-k9j8h"])
    assert m == Meshing(False, mesh="istio", config=None, reason=m.reason, left_alone=True)
    assert "istio-init" in m.reason


@pytest.mark.parametrize("name", ["coredns-5d78c9869d-4xq7z", "istio-ingressgateway-6b7c8d9e0f-zz9yy",
                                  "node-exporter-abcde"])
def test_pods_not_meshed(name):
    m = classify(OTHERS[name])
    assert not m.meshed and not m.left_alone and m.config is None and m.reason


def test_istio_exclusions_in_istio_cni_order():
    pod = _basic()
    pod["spec"]["containers"][1]["env"].append({"name": "DISABLE_ENVOY", "value": "true"})
    assert "DISABLE_ENVOY" in classify(pod).reason and not classify(pod).meshed
    pod = _annotate(_basic(), **{mesh.A_INJECT: "false"})
    assert not classify(pod).meshed
    # The label wins over the annotation.
    pod["metadata"]["labels"][mesh.A_INJECT] = "true"
    assert classify(pod).meshed
    pod = _basic()
    del pod["metadata"]["annotations"][mesh.A_STATUS]
    m = classify(pod)
    assert not m.meshed and m.mesh == "istio" and mesh.A_STATUS in m.reason
    pod = _basic()
    pod["spec"]["containers"].pop(1)
    m = classify(pod)
    assert not m.meshed and m.mesh == "istio" and "istio-proxy" in m.reason


# ---- Linkerd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, p in LINKERD.items()
                                  if p["metadata"]["annotations"]["meshbpf.test/expect"] == "meshed"])
def test_linkerd_injected_pod_meshed(name):
    pod = LINKERD[name]
    ann = pod["metadata"]["annotations"]
    m = classify(pod)
    assert m.meshed and m.mesh == "linkerd" and not m.left_alone, m.reason
    cfg = m.config
    assert (cfg.proxy_port, cfg.inbound_capture_port) == (4140, 4143)
    assert cfg.proxy_uid == "2102"
    assert cfg.inbound_ports_include == "*"
    assert cfg.inbound_ports_exclude == ann["meshbpf.test/inbound-exclude"]
    assert cfg.outbound_ports_exclude == ann["meshbpf.test/outbound-exclude"]
    assert cfg.outbound_ip_ranges_include == "*"
    # The config is usable as is: the iptables rendering redirects to Linkerd's ports.
    rules = render(cfg, 4)
    assert "--to-ports 4140" in rules and "--to-ports 4143" in rules
    assert "--uid-owner 2102" in rules


def test_linkerd_init_pod_left_alone():
    m = classify(LINKERD["emoji-5b6c7d8e9f-a1b2c"])
    assert not m.meshed and m.left_alone and m.mesh == "linkerd" and "linkerd-init" in m.reason


def test_linkerd_overrides():
    pod = copy.deepcopy(LINKERD["voting-7f4d8b9c5-q2w3e"])
    pod["metadata"]["annotations"].update({mesh.L_PROXY_UID: "3000", mesh.L_PROXY_GID: "3001"})
    pod["metadata"]["labels"][mesh.L_CONTROL_PLANE] = "destination"
    cfg = classify(pod).config
    assert (cfg.proxy_uid, cfg.proxy_gid) == ("3000", "3001")
    assert cfg.outbound_ip_ranges_exclude == ""
    assert cfg.outbound_ports_exclude == "443,6443"


def test_linkerd_skip_subnets_has_no_equivalent():
    # linkerd-init skips inbound traffic by source subnet: not expressible, so not meshed.
    pod = copy.deepcopy(LINKERD["voting-7f4d8b9c5-q2w3e"])
    pod["metadata"]["annotations"][mesh.L_SKIP_SUBNETS] = "10.1.0.0/16"
    m = classify(pod)
    assert not m.meshed and m.config is None and mesh.L_SKIP_SUBNETS in m.reason


@pytest.mark.parametrize("key,value", [
    (mesh.L_SKIP_IN, "80,abc"),
    (mesh.L_SKIP_IN, "5002-5000"),
    (mesh.L_SKIP_OUT, "70000"),
    (mesh.L_PROXY_UID, "linkerd"),
])
def test_linkerd_invalid_annotation_named(key, value):
    pod = copy.deepcopy(LINKERD["voting-7f4d8b9c5-q2w3e"])
    pod["metadata"]["annotations"][key] = value
    m = classify(pod)
    assert not m.meshed and m.config is None and m.mesh == "linkerd" and key in m.reason


# ---- identity and malformed input ---------------------------------------------------------------

def test_pod_id_and_name():
    pod = LINKERD["web-6d4cf56db6-x7k2p"]
    assert pod_id(pod) == "3c1a9e55-2b7f-4c1e-9d0a-5f6b7c8d9e01"
    assert pod_name(pod) == "emojivoto/web-6d4cf56db6-x7k2p"
    assert pod_id({}) is None


@pytest.mark.parametrize("pod", [
    None, [], "pod", {"spec": []}, {"spec": {"containers": "x"}},
    {"metadata": {"annotations": {"a": 1}}, "spec": {"containers": [{"name": "istio-proxy"}]}},
    {"spec": {"containers": [{"name": "istio-proxy", "env": [1]}]},
     "metadata": {"annotations": {mesh.A_STATUS: "{}"}}},
])
def test_malformed_pod_not_meshed_without_traceback(pod):
    m = classify(pod)
    assert isinstance(m, Meshing) and not m.meshed and m.reason
