"""The agent's /metrics on a real kernel: a pod attached in eBPF mode with a real Envoy
sidecar; a connection through the sidecar moves the redirect counter read from the pinned
per-CPU map, and the map fill ratios are exposed; after cleanup the BPF families are gone."""

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshbpf.agent.metrics import Metrics
from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, traffic

pytestmark = pytest.mark.kernel

APP = 8080
OUT_CX = "tcp.outbound.downstream_cx_total"


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(url):
    code, body = get(url + "/metrics")
    assert code == 200, body
    return {f.name: f for f in text_string_to_metric_families(body)}


def sample(fams, family, **labels):
    fam = fams[family]
    name = family + "_total" if fam.type == "counter" else family
    hits = [s.value for s in fam.samples if s.name == name and s.labels == labels]
    assert len(hits) == 1, (family, labels, fam.samples)
    return hits[0]


def test_redirect_counter_moves_when_a_connection_goes_through_the_sidecar():
    with Sandbox(name="metrics") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(APP)
        env_a = a.start_envoy()
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        m = Metrics(sb.pin_prefix)
        cleaned = False
        try:
            svc.attach(a.pod, InterceptConfig(), pod_id="a")
            host, port = m.serve("127.0.0.1:0")
            url = f"http://{host}:{port}"
            assert get(url + "/readyz")[0] == 503
            assert get(url + "/healthz")[0] == 200

            before = scrape(url)
            assert before["meshbpf_connections_redirected"].type == "counter"
            out0 = sample(before, "meshbpf_connections_redirected", direction="out")
            cx0 = env_a.stats().get(OUT_CX, 0)
            res = traffic.http_get(a, b.ip4, APP, path="/x")
            assert res["reply"]["pod"] == "b"
            assert env_a.stats().get(OUT_CX, 0) > cx0, "the connection did not go through A's Envoy"

            after = scrape(url)
            assert sample(after, "meshbpf_connections_redirected", direction="out") >= out0 + 1
            # Envoy asked for the original destination and got it from the map.
            assert sample(after, "meshbpf_original_dst_answers") > \
                sample(before, "meshbpf_original_dst_answers")
            # one of the node's pods map slots is taken; orig_dst's ratio is exposed
            assert 0 < sample(after, "meshbpf_map_fill_ratio", map="pods") < 1
            assert 0 <= sample(after, "meshbpf_map_fill_ratio", map="orig_dst") < 1

            m.set_ready(True)
            assert get(url + "/readyz")[0] == 200

            svc.cleanup()
            cleaned = True
            # nothing pinned any more: the BPF families are absent, the agent's remain
            gone = scrape(url)
            assert "meshbpf_connections_redirected" not in gone
            assert "meshbpf_map_fill_ratio" not in gone
            assert "meshbpf_build_info" in gone
        finally:
            m.close()
            if not cleaned:
                svc.cleanup()
