"""What the layout promises and a reader relies on, checked on the source (no root):
Istio's numbers are written once (meshbpf/istio.py), the C structs have one Python mirror
(meshbpf/ebpf/structs.py), and each bpf(2) command number is defined once (bpfsys)."""

import ast
import os
import re

import meshbpf
from meshbpf import istio

ROOT = os.path.dirname(meshbpf.__file__)
# Modules that still write Istio's numbers themselves: the config and the CLI (switched
# over where they are rewritten), and the test bed and benchmark, which are not the product.
ISTIO_LITERALS_ALLOWED = {"istio.py"}
NOT_PRODUCT = ("bench/", "testbed/")


def _product_modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)
                if not rel.startswith(NOT_PRODUCT):
                    yield rel, path


def _constants(path):
    """Constants written in code (docstrings left out: they may name a port)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            docs.add(id(node.body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and id(n) not in docs]


def test_istio_numbers_are_written_only_in_the_constants_module():
    ports = {istio.OUTBOUND_PORT, istio.INBOUND_PORT, istio.TUNNEL_PORT, istio.AGENT_PORT,
             istio.HEALTH_PORT, istio.ENVOY_METRICS_PORT, istio.DNS_PORT, istio.PROXY_UID,
             istio.OUTBOUND_MARK}
    addrs = {istio.INBOUND_PASSTHROUGH_V4, istio.INBOUND_PASSTHROUGH_V6}
    found = []
    for rel, path in _product_modules():
        if rel in ISTIO_LITERALS_ALLOWED:
            continue
        for line, value in _constants(path):
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value in ports or \
                    isinstance(value, str) and (value.strip() in {str(p) for p in ports} or
                                                value.split("/")[0].strip() in addrs):
                found.append(f"{rel}:{line}: {value!r}")
    assert found == []


def test_one_python_mirror_of_the_c_structs():
    # bpfsys.py lays out the kernel's union bpf_attr and agent/kernel.py rtnetlink's
    # nlmsghdr/tcmsg, not bpf/lib/types.h's structs
    found = []
    for rel, path in _product_modules():
        with open(path) as f:
            text = f.read()
        if re.search(r"\bstruct\.Struct\(|ctypes\.Structure\)", text):
            found.append(rel)
    assert sorted(found) == ["agent/kernel.py", "bpfsys.py", "ebpf/structs.py"]


def test_bpf_link_detach_is_written_once():
    found = []
    for rel, path in _product_modules():
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if re.search(r"BPF_LINK_DETACH\s*=|bpf\(\s*34\b", line):
                    found.append(f"{rel}:{n}")
    assert [f.split(":")[0] for f in found] == ["bpfsys.py"]
