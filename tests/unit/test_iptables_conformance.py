"""Istio's own generator tests: `render` must produce Istio's exact payload for every case.

Cases come from ../shared/conformance/istio-iptables/cases.json (27 istio-iptables
capture cases, payload per address family, and 8 istio-cni sidecar cases).
"""

import json
import os

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.iptables.rules import render

_CASES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           os.pardir, "shared", "conformance", "istio-iptables", "cases.json")


def _load():
    try:
        with open(_CASES_FILE) as f:
            return json.load(f)
    except OSError:
        return {"cases": {}, "cni_cases": {}}


_DATA = _load()


@pytest.fixture(scope="module")
def conformance(shared_dir):
    root = os.path.join(shared_dir, "conformance", "istio-iptables")
    with open(os.path.join(root, "cases.json")) as f:
        return root, json.load(f)


def _read(root, name):
    with open(os.path.join(root, name)) as f:
        return f.read()


def test_suite_is_complete(conformance):
    _, data = conformance
    assert len(data["cases"]) == 27
    assert len(data["cni_cases"]) == 8
    assert set(data["cases"]) == set(_DATA["cases"])


@pytest.mark.parametrize("case", sorted(_DATA["cases"]))
def test_capture_case(conformance, case):
    root, data = conformance
    spec = data["cases"][case]
    cfg = InterceptConfig.from_dict({**data["base"], **spec["overrides"]})
    fams = []
    for payload in spec["payloads"]:
        family = 6 if payload.endswith(".v6.rules") else 4
        fams.append(family)
        assert render(cfg, family) == _read(root, payload), f"{case} IPv{family}"
    # A family without a golden file has no payload.
    for family in {4, 6} - set(fams):
        assert render(cfg, family) == ""


@pytest.mark.parametrize("case", sorted(_DATA["cni_cases"]))
def test_cni_case(conformance, case):
    root, data = conformance
    spec = data["cni_cases"][case]
    cfg = InterceptConfig.from_dict({**data["cni_base"], **spec["overrides"]})
    assert render(cfg, 4) == _read(root, spec["payload"])
