#!/usr/bin/env python3
"""meshbpf-cni: a chained CNI plugin (spec 1.0.0) that has the node agent enroll a pod's
network namespace before any of its containers starts.

The container runtime runs it after the plugin that made the pod's interface (bridge,
Cilium, Calico, ...), with the network configuration on stdin and CNI_* in the
environment. On ADD it asks the agent, over its Unix socket (`agent_socket`, default
/run/meshbpf/cni.sock), to enroll that netns now, waits for the answer, and prints the
previous plugin's result unchanged (a chained plugin passes it through). If the agent
cannot be reached, ADD fails with a CNI error (code 11, "try again later") so the runtime
retries, unless the config says `"fail_open": true`. DEL asks the agent to detach and
succeeds whatever is already gone (the pod, its netns, the agent). CHECK asks whether the
pod is enrolled. VERSION lists the spec versions it speaks.

Config keys (besides name, cniVersion, type, prevResult): agent_socket, fail_open
(false), timeout (seconds to wait for the agent, 30), log_level (debug|info|warning|error,
default warning), log_file (default: stderr, which the runtime logs).

It runs once per pod: it imports nothing but Python's standard library (no bcc, not even
the rest of meshbpf), so the file can also be copied alone onto a node as the plugin.
"""

import json
import os
import socket
import sys
import time

SPEC_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_SOCKET = "/run/meshbpf/cni.sock"
DEFAULT_TIMEOUT = 30.0
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40}
MAX_REPLY = 1 << 20

# The spec's well-known error codes; 100 and up are the plugin's own.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_AGENT_REFUSED = 100


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_dict(self, cni_version=SPEC_VERSION):
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg,
                "details": self.details}


class AgentUnreachable(Exception):
    """No answer from the agent's socket (missing, refused, timed out, cut off)."""


# ---- pure: what the runtime handed us -----------------------------------------------------

class Invocation:
    """The CNI_* environment of one call."""

    def __init__(self, command, container_id=None, netns=None, ifname=None, args=None,
                 path=None):
        self.command, self.container_id, self.netns = command, container_id, netns
        self.ifname, self.args, self.path = ifname, dict(args or {}), path

    @property
    def namespace(self):
        return self.args.get("K8S_POD_NAMESPACE") or None

    @property
    def name(self):
        return self.args.get("K8S_POD_NAME") or None

    @property
    def uid(self):
        return self.args.get("K8S_POD_UID") or None


def parse_cni_args(text):
    """CNI_ARGS ("K=V;K2=V2") as a dict; CniError(4) on a pair without "="."""
    out = {}
    for pair in (text or "").split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(E_INVALID_ENV, "invalid CNI_ARGS", f"pair {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_env(env):
    """The Invocation `env` (a mapping) describes; CniError(4) if a variable the command
    needs is missing. DEL needs only CNI_CONTAINERID: the netns may be gone already."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(E_INVALID_ENV, f"unknown CNI_COMMAND {command!r}",
                       f"expected one of {', '.join(COMMANDS)}")
    if command == "VERSION":
        return Invocation(command)
    need = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "DEL": ("CNI_CONTAINERID",)}[command]
    missing = [k for k in need if not env.get(k)]
    if missing:
        raise CniError(E_INVALID_ENV, f"{command}: missing {', '.join(missing)}",
                       "the runtime must set these for this command")
    return Invocation(command, container_id=env.get("CNI_CONTAINERID"),
                      netns=env.get("CNI_NETNS") or None, ifname=env.get("CNI_IFNAME") or None,
                      args=parse_cni_args(env.get("CNI_ARGS", "")), path=env.get("CNI_PATH"))


class Conf:
    """The plugin's network configuration (from stdin)."""

    def __init__(self, doc):
        self.doc = doc
        self.cni_version = doc.get("cniVersion") or SPEC_VERSION
        self.name, self.type = doc.get("name"), doc.get("type")
        self.prev_result = doc.get("prevResult")
        self.agent_socket = doc.get("agent_socket", DEFAULT_SOCKET)
        self.fail_open = doc.get("fail_open", False)
        self.timeout = doc.get("timeout", DEFAULT_TIMEOUT)
        self.log_level = str(doc.get("log_level", "warning")).lower()
        self.log_file = doc.get("log_file")


def parse_config(data, command):
    """The Conf on stdin; CniError 6 (not JSON), 7 (bad field) or 1 (unsupported version).
    VERSION needs no config (an empty stdin is fine)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
    if not text.strip():
        if command == "VERSION":
            return Conf({})
        raise CniError(E_DECODE, "no network configuration on stdin")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CniError(E_DECODE, "the network configuration is not JSON", str(e))
    if not isinstance(doc, dict):
        raise CniError(E_DECODE, "the network configuration must be a JSON object")
    conf = Conf(doc)
    if command == "VERSION":
        return conf
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION, f"cniVersion {conf.cni_version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    for key, ok, want in (
            ("name", isinstance(conf.name, str) and conf.name, "a non-empty string"),
            ("agent_socket", isinstance(conf.agent_socket, str) and conf.agent_socket.startswith("/"),
             "an absolute path"),
            ("fail_open", isinstance(conf.fail_open, bool), "true or false"),
            ("timeout", isinstance(conf.timeout, (int, float)) and not isinstance(conf.timeout, bool)
             and 0 < conf.timeout <= 600, "seconds, more than 0 and at most 600"),
            ("log_level", conf.log_level in LEVELS, "debug, info, warning or error"),
            ("log_file", conf.log_file is None or (isinstance(conf.log_file, str)
                                                   and conf.log_file.startswith("/")),
             "an absolute path"),
            ("prevResult", conf.prev_result is None or isinstance(conf.prev_result, dict),
             "an object (the previous plugin's result)")):
        if not ok:
            raise CniError(E_INVALID_CONFIG, f"invalid {key!r} in the meshbpf-cni configuration",
                           f"{key} must be {want}, not {conf.doc.get(key)!r}")
    return conf


def request_for(inv, conf, op):
    """What the agent is asked: one JSON object (see meshbpf.agent.cniserver)."""
    return {"op": op, "container_id": inv.container_id, "netns": inv.netns,
            "ifname": inv.ifname, "namespace": inv.namespace, "name": inv.name,
            "uid": inv.uid, "network": conf.name}


def passthrough(conf):
    """ADD's result: the previous plugin's, unchanged (a standalone call gets an empty one)."""
    if conf.prev_result is None:
        return {"cniVersion": conf.cni_version}
    if "cniVersion" in conf.prev_result:
        return conf.prev_result
    return dict(conf.prev_result, cniVersion=conf.cni_version)


def handle(inv, conf, agent, log=None):
    """One call: (exit code, the object to print or None). `agent(request)` returns the
    agent's reply or raises AgentUnreachable; `log(level, msg)` records what happened."""
    log = log or (lambda level, msg: None)
    if inv.command == "VERSION":
        return 0, {"cniVersion": conf.cni_version if conf.doc.get("cniVersion") else SPEC_VERSION,
                   "supportedVersions": list(SUPPORTED_VERSIONS)}
    op = inv.command.lower()
    who = f"{inv.namespace}/{inv.name}" if inv.namespace and inv.name else None
    if who is None and op != "del":
        # Not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): nothing names it in a pod source.
        log("info", f"{op} {inv.container_id}: no K8S_POD_NAMESPACE/K8S_POD_NAME; not meshed")
        return 0, (passthrough(conf) if op == "add" else None)
    try:
        reply = agent(request_for(inv, conf, op))
    except AgentUnreachable as e:
        if op == "del":
            log("warning", f"del {who or inv.container_id}: agent unreachable ({e}); nothing to undo here")
            return 0, None
        if conf.fail_open:
            log("warning", f"{op} {who}: agent unreachable ({e}); fail_open: pod not intercepted")
            return 0, (passthrough(conf) if op == "add" else None)
        log("error", f"{op} {who}: agent unreachable: {e}")
        return _error(conf, CniError(E_TRY_AGAIN, "the meshbpf agent is not reachable",
                                     f"{conf.agent_socket}: {e}"))
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        err = CniError(E_AGENT_REFUSED, "the meshbpf agent gave an answer this plugin does not "
                       "understand", json.dumps(reply)[:500])
        return _refused(inv, conf, op, who, err, log)
    if not reply["ok"]:
        # "retry": the agent cannot say yet (its pod source's API is unreachable): try again
        err = CniError(E_TRY_AGAIN if reply.get("retry") is True else E_AGENT_REFUSED,
                       f"meshbpf: {op} of pod {who or inv.container_id} failed",
                       str(reply.get("error") or "no reason given"))
        return _refused(inv, conf, op, who, err, log)
    log("info", f"{op} {who or inv.container_id}: {reply.get('message') or 'ok'}")
    return 0, (passthrough(conf) if op == "add" else None)


def _refused(inv, conf, op, who, err, log):
    if conf.fail_open and op != "del":
        log("warning", f"{op} {who}: {err.msg}: {err.details}; fail_open: pod not intercepted")
        return 0, (passthrough(conf) if op == "add" else None)
    log("error", f"{op} {who or inv.container_id}: {err.msg}: {err.details}")
    return _error(conf, err)


def _error(conf, err):
    return 1, err.to_dict(conf.cni_version if conf.cni_version in SUPPORTED_VERSIONS
                          else SPEC_VERSION)


# ---- side effects ---------------------------------------------------------------------------

def call_agent(path, request, timeout):
    """Send `request` to the agent at Unix socket `path`, return its JSON reply."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise AgentUnreachable(e.strerror or str(e))
        try:
            s.sendall((json.dumps(request) + "\n").encode())
            s.shutdown(socket.SHUT_WR)
            chunks, size = [], 0
            while True:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                size += len(b)
                if size > MAX_REPLY:
                    raise AgentUnreachable("the reply is too large")
        except socket.timeout:
            raise AgentUnreachable(f"no answer within {timeout:g}s")
        except OSError as e:
            raise AgentUnreachable(f"connection lost: {e.strerror or e}")
    finally:
        s.close()
    data = b"".join(chunks)
    if not data.strip():
        raise AgentUnreachable("the agent closed the connection without an answer")
    try:
        return json.loads(data)
    except ValueError:
        return {"ok": None, "raw": data[:200].decode("utf-8", "replace")}


class Log:
    def __init__(self, inv, conf):
        self.level = LEVELS.get(getattr(conf, "log_level", "warning"), 30)
        self.path = getattr(conf, "log_file", None)
        self.tag = f"meshbpf-cni[{os.getpid()}] {inv.command if inv else '?'} " \
                   f"{(inv.container_id or '')[:12] if inv else ''}".rstrip()

    def __call__(self, level, msg):
        if LEVELS[level] < self.level:
            return
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {level} {self.tag}: {msg}\n"
        try:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line)
            else:
                sys.stderr.write(line)
        except OSError:
            pass


def main(env=None, stdin=None, stdout=None):
    env = os.environ if env is None else env
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    inv, conf = None, None
    try:
        inv = parse_env(env)
        conf = parse_config(stdin.read(), inv.command)
        rc, out = handle(inv, conf, lambda req: call_agent(conf.agent_socket, req, conf.timeout),
                         Log(inv, conf))
    except CniError as e:
        Log(inv, conf)("error", f"{e.msg}: {e.details}")
        rc, out = 1, e.to_dict(SPEC_VERSION if conf is None or conf.cni_version
                               not in SUPPORTED_VERSIONS else conf.cni_version)
    if out is not None:
        stdout.write(json.dumps(out) + "\n")
        stdout.flush()
    return rc


def _console():
    """The `meshbpf-cni` console script."""
    sys.exit(main())


if __name__ == "__main__":
    _console()
