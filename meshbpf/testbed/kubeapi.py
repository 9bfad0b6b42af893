"""A local Kubernetes API server for tests: the pod list and watch API, enough for the
official `kubernetes` client, served from pod objects the test adds (no cluster here).

    GET /api/v1/pods                          ?fieldSelector=spec.nodeName=X (also !=, ==)
    GET /api/v1/namespaces/{ns}/pods          the same, one namespace
    GET /api/v1/namespaces/{ns}/pods/{name}   one pod (404 Status if none)
    ...&watch=1&resourceVersion=N             JSON lines {type, object}: the events after N
        (ADDED/MODIFIED/DELETED; BOOKMARK with allowWatchBookmarks=true when the test sends one;
        an ERROR event with a 410 Status when N is older than the compacted history, as
        etcd's compaction gives); no N or "0": the current pods as ADDED, then live events;
        ends after timeoutSeconds.

A modify that moves a pod into or out of a field selector is seen by that watch as ADDED or
DELETED, as the real API server filters. Every change bumps the one resourceVersion.

Test controls: add/modify/delete pods, bookmark(), drop_watches() (close every open watch
stream), compact() (an older resourceVersion gets 410), fail_next(n, code) (the next n
requests get that error Status), hold_watches(True/False) (open watches deliver nothing until
released, as a slow watch or a lagging API server cache does: a GET still sees the pod). `requests` records every request (path and query) and
`watch_versions()` the resourceVersion each watch asked for. `write_kubeconfig(path)`.
"""

import copy
import http.server
import itertools
import json
import threading
import time
import urllib.parse

HTTP_GONE = 410


def _status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def parse_field_selector(text):
    """[(field, op, value)] from `spec.nodeName=a,metadata.namespace!=b`; ValueError if bad."""
    terms = []
    for part in filter(None, (text or "").split(",")):
        for op in ("!=", "==", "="):
            if op in part:
                field, value = part.split(op, 1)
                terms.append((field.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            raise ValueError(f"invalid field selector term {part!r}")
    return terms


_FIELDS = {
    "spec.nodeName": lambda p: (p.get("spec") or {}).get("nodeName") or "",
    "metadata.name": lambda p: p["metadata"].get("name", ""),
    "metadata.namespace": lambda p: p["metadata"].get("namespace", ""),
    "status.phase": lambda p: (p.get("status") or {}).get("phase", ""),
}


def check_fields(terms):
    for field, _op, _value in terms:
        if field not in _FIELDS:
            raise ValueError(f'field label not supported: {field}')


def matches(pod, terms, namespace=None):
    if pod is None:
        return False
    if namespace is not None and pod["metadata"].get("namespace") != namespace:
        return False
    for field, op, value in terms:
        if (_FIELDS[field](pod) == value) != (op == "="):
            return False
    return True


class KubeAPIServer:
    """The server; `with KubeAPIServer() as api:` starts it on 127.0.0.1 (a free port)."""

    def __init__(self, host="127.0.0.1", port=0):
        self.lock = threading.Condition()
        self.rv = 1000                    # resourceVersion: one counter for every change
        self.floor = self.rv              # a watch from below this gets 410 Gone
        self.pods = {}                    # (namespace, name) -> pod object
        self.events = []                  # (seq, rv, type, object, old object)
        self.seq = itertools.count(1)
        self.drops = 0                    # bumped by drop_watches()
        self.failures = []                # status codes the next requests get
        self.requests = []                # (method, path, {query: value})
        self.request_times = []           # time.monotonic() of each request
        self.open_watches = 0
        self.held = False                 # hold_watches(): open watches deliver nothing
        self.closed = False
        server = self

        class Handler(_Handler):
            api = server

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = None

    # ---- lifetime ----------------------------------------------------------------------------
    @property
    def url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="kubeapi",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def write_kubeconfig(self, path, token="meshbpf-test-token"):
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "local",
               "clusters": [{"name": "local", "cluster": {"server": self.url}}],
               "users": [{"name": "meshbpf-test", "user": {"token": token}}],
               "contexts": [{"name": "local",
                             "context": {"cluster": "local", "user": "meshbpf-test"}}]}
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)       # JSON is YAML
        return path

    # ---- test controls -----------------------------------------------------------------------
    def _record(self, kind, obj, old):
        self.rv += 1
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((next(self.seq), self.rv, kind, copy.deepcopy(obj),
                            copy.deepcopy(old)))
        self.lock.notify_all()
        return copy.deepcopy(obj)

    def add(self, pod):
        """Create `pod` (a dict); returns it as stored (with its resourceVersion)."""
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self.lock:
            if key in self.pods:
                raise ValueError(f"pod {key[0]}/{key[1]} exists")
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime()))
            self.pods[key] = pod
            return self._record("ADDED", pod, None)

    def modify(self, namespace, name, change):
        """`change(pod)` edits a copy of the pod in place; the result is stored (MODIFIED)."""
        with self.lock:
            old = self.pods[(namespace, name)]
            new = copy.deepcopy(old)
            change(new)
            self.pods[(namespace, name)] = new
            return self._record("MODIFIED", new, old)

    def delete(self, namespace, name):
        with self.lock:
            old = self.pods.pop((namespace, name))
            gone = copy.deepcopy(old)
            return self._record("DELETED", gone, old)

    def bookmark(self):
        """A BOOKMARK (the current resourceVersion) to every open watch that allows them."""
        with self.lock:
            self.events.append((next(self.seq), self.rv, "BOOKMARK", None, None))
            self.lock.notify_all()

    def drop_watches(self):
        """Close every open watch stream (as a restarting API server or a load balancer's
        idle timeout does)."""
        with self.lock:
            self.drops += 1
            self.lock.notify_all()

    def hold_watches(self, held=True):
        """Hold back (True) or release (False) every watch's events; lists and GETs are
        answered as before."""
        with self.lock:
            self.held = held
            self.lock.notify_all()

    def compact(self):
        """Forget the history: a watch from an older resourceVersion gets 410 Gone."""
        with self.lock:
            self.floor = self.rv

    def fail_next(self, n, code=500):
        with self.lock:
            self.failures.extend([code] * n)

    def watch_versions(self):
        """The resourceVersion each watch request asked for, in order (None: not given)."""
        return [q.get("resourceVersion") for _m, _p, q in list(self.requests)
                if q.get("watch") in ("1", "true")]

    def lists(self):
        return [q for _m, _p, q in list(self.requests) if q.get("watch") not in ("1", "true")]

    def wait_watches(self, n, timeout=10):
        """Wait until `n` watch streams are open."""
        end = time.monotonic() + timeout
        with self.lock:
            while self.open_watches < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.open_watches} watch(es) open, not {n}")
                self.lock.wait(left)


class _Handler(http.server.BaseHTTPRequestHandler):
    api = None                  # set per server
    protocol_version = "HTTP/1.1"        # a watch streams in chunks, as the real one does

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send_json(self, code, doc):
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        api = self.api
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        with api.lock:
            api.requests.append(("GET", url.path, query))
            api.request_times.append(time.monotonic())
            code = api.failures.pop(0) if api.failures else None
        if code is not None:
            return self._send_json(code, _status(code, "InternalError" if code >= 500 else
                                                 "BadRequest", "injected failure"))
        parts = url.path.strip("/").split("/")
        namespace = name = None
        if parts == ["api", "v1", "pods"]:
            pass
        elif len(parts) in (5, 6) and parts[:3] == ["api", "v1", "namespaces"] \
                and parts[4] == "pods":
            namespace = parts[3]
            name = parts[5] if len(parts) == 6 else None
        else:
            return self._send_json(404, _status(404, "NotFound", f"no route {url.path}"))
        if name is not None:
            with api.lock:
                pod = api.pods.get((namespace, name))
                pod = copy.deepcopy(pod)
            if pod is None:
                return self._send_json(404, _status(404, "NotFound",
                                                    f'pods "{name}" not found'))
            return self._send_json(200, dict(pod, kind="Pod", apiVersion="v1"))
        try:
            terms = parse_field_selector(query.get("fieldSelector"))
            check_fields(terms)
        except ValueError as e:
            return self._send_json(400, _status(400, "BadRequest", str(e)))
        if query.get("watch") in ("1", "true"):
            return self._watch(namespace, terms, query)
        with api.lock:
            items = [copy.deepcopy(p) for _k, p in sorted(api.pods.items())
                     if matches(p, terms, namespace)]
            rv = api.rv
        return self._send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _line(self, kind, obj):
        data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, namespace, terms, query):
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        try:
            timeout = float(query.get("timeoutSeconds", 1800))
        except ValueError:
            return self._send_json(400, _status(400, "BadRequest", "bad timeoutSeconds"))
        rv_arg = query.get("resourceVersion") or "0"
        try:
            since = int(rv_arg)
        except ValueError:
            return self._send_json(400, _status(400, "BadRequest",
                                                f"invalid resourceVersion {rv_arg!r}"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            self._stream(namespace, terms, since, timeout, bookmarks)
            self.wfile.write(b"0\r\n\r\n")           # the stream's clean end
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream(self, namespace, terms, since, timeout, bookmarks):
        api = self.api
        end = time.monotonic() + timeout
        with api.lock:
            drops = api.drops
            if since != 0 and since < api.floor:
                gone = _status(HTTP_GONE, "Expired",
                               f"too old resource version: {since} ({api.floor})")
                self._line("ERROR", gone)
                return
            if since == 0:
                # no version: the current state as ADDED, then what happens from now
                pending = [("ADDED", copy.deepcopy(p)) for _k, p in sorted(api.pods.items())
                           if matches(p, terms, namespace)]
                seq = api.events[-1][0] if api.events else 0
            else:
                pending, seq = [], 0
                for s, rv, kind, obj, old in api.events:
                    seq = s
                    if rv > since and kind != "BOOKMARK":
                        ev = _filtered(kind, obj, old, terms, namespace)
                        if ev:
                            pending.append(ev)
            api.open_watches += 1
            api.lock.notify_all()
        try:
            while True:
                with api.lock:
                    while pending and api.held:          # hold_watches(): not yet
                        if api.closed or api.drops != drops or time.monotonic() >= end:
                            return
                        api.lock.wait(min(max(end - time.monotonic(), 0.01), 1.0))
                for kind, obj in pending:
                    self._line(kind, obj)
                pending = []
                with api.lock:
                    while True:
                        if api.closed or api.drops != drops:
                            return
                        new = [e for e in api.events if e[0] > seq]
                        if new and not api.held:
                            break
                        left = end - time.monotonic()
                        if left <= 0:
                            return
                        api.lock.wait(min(left, 1.0))
                    for s, rv, kind, obj, old in new:
                        seq = s
                        if kind == "BOOKMARK":
                            if bookmarks:
                                pending.append(("BOOKMARK", {
                                    "kind": "Pod", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(rv)}}))
                            continue
                        ev = _filtered(kind, obj, old, terms, namespace)
                        if ev:
                            pending.append(ev)
        finally:
            with api.lock:
                api.open_watches -= 1
                api.lock.notify_all()


def _filtered(kind, obj, old, terms, namespace):
    """The event as a watch with this selector sees it, or None."""
    now, before = matches(obj, terms, namespace), matches(old, terms, namespace)
    if kind == "DELETED":
        return ("DELETED", obj) if before else None
    if now and before:
        return (kind, obj)
    if now:
        return ("ADDED", obj)
    if before:
        return ("DELETED", obj)
    return None
