"""meshbpf-cni's protocol handling: the CNI environment and config, the previous result
passed through unchanged, the spec's error object, fail_open, DEL and CHECK without an
agent; and the real executable run as a runtime runs it against a stand-in agent socket."""

import io
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from meshbpf.cni import plugin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/run/netns/x"}],
        "ips": [{"interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"}],
        "dns": {}}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
                   "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1a2b-3c"}


def conf(**kw):
    return dict({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshbpf-cni",
                 "agent_socket": "/nonexistent/meshbpf-test/cni.sock", "prevResult": PREV}, **kw)


def run(env, config, agent=None):
    """main() with a stand-in agent: (exit code, stdout parsed or None, requests seen)."""
    seen = []

    def fake(path, req, timeout):
        seen.append(req)
        if agent is None:
            raise plugin.AgentUnreachable("No such file or directory")
        return agent(req)

    out = io.StringIO()
    stdin = io.BytesIO(config if isinstance(config, bytes) else json.dumps(config).encode())
    orig = plugin.call_agent
    plugin.call_agent = fake
    try:
        rc = plugin.main(env=env, stdin=stdin, stdout=out)
    finally:
        plugin.call_agent = orig
    text = out.getvalue()
    return rc, (json.loads(text) if text.strip() else None), seen


def test_env_and_cni_args_are_parsed():
    inv = plugin.parse_env(ENV)
    assert (inv.command, inv.container_id, inv.netns, inv.ifname) == \
        ("ADD", "c0ffee", "/run/netns/x", "eth0")
    assert (inv.namespace, inv.name, inv.uid) == ("shop", "web-0", "1a2b-3c")
    assert inv.args["IgnoreUnknown"] == "1"


@pytest.mark.parametrize("env,missing", [
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c"}, "CNI_NETNS, CNI_IFNAME"),
    ({"CNI_COMMAND": "CHECK", "CNI_NETNS": "/n", "CNI_IFNAME": "eth0"}, "CNI_CONTAINERID"),
    ({"CNI_COMMAND": "DEL"}, "CNI_CONTAINERID"),
])
def test_missing_environment_is_error_4(env, missing):
    rc, out, seen = run(env, conf())
    assert rc == 1 and out["code"] == 4 and missing in out["msg"] and not seen
    assert set(out) == {"cniVersion", "code", "msg", "details"}


def test_unknown_command_and_bad_cni_args_are_error_4():
    rc, out, _ = run(dict(ENV, CNI_COMMAND="STATUS"), conf())
    assert rc == 1 and out["code"] == 4 and "STATUS" in out["msg"]
    rc, out, _ = run(dict(ENV, CNI_ARGS="K8S_POD_NAME"), conf())
    assert rc == 1 and out["code"] == 4 and "K8S_POD_NAME" in out["details"]


def test_add_asks_the_agent_and_passes_the_previous_result_through_unchanged():
    rc, out, seen = run(ENV, conf(), agent=lambda r: {"ok": True, "meshed": True,
                                                      "message": "enrolled"})
    assert rc == 0 and out == PREV
    assert seen == [{"op": "add", "container_id": "c0ffee", "netns": "/run/netns/x",
                     "ifname": "eth0", "namespace": "shop", "name": "web-0", "uid": "1a2b-3c",
                     "network": "k8s-pod-network"}]


def test_add_of_a_pod_the_agent_does_not_mesh_passes_through():
    rc, out, _ = run(ENV, conf(), agent=lambda r: {"ok": True, "meshed": False})
    assert rc == 0 and out == PREV


def test_add_without_kubernetes_identity_does_not_ask_the_agent():
    rc, out, seen = run(dict(ENV, CNI_ARGS="IgnoreUnknown=1"), conf())
    assert rc == 0 and out == PREV and not seen


def test_add_fails_with_try_again_when_the_agent_is_unreachable():
    rc, out, seen = run(ENV, conf())
    assert rc == 1 and len(seen) == 1
    assert out["code"] == 11 and out["cniVersion"] == "1.0.0"
    assert "not reachable" in out["msg"] and "/nonexistent/meshbpf-test/cni.sock" in out["details"]


def test_add_with_fail_open_succeeds_without_the_agent():
    rc, out, _ = run(ENV, conf(fail_open=True))
    assert rc == 0 and out == PREV


def test_add_refused_by_the_agent_is_an_error_unless_fail_open():
    refuse = lambda r: {"ok": False, "error": "attach failed: no such netns"}  # noqa: E731
    rc, out, _ = run(ENV, conf(), agent=refuse)
    assert rc == 1 and out["code"] == 100 and "shop/web-0" in out["msg"]
    assert out["details"] == "attach failed: no such netns"
    rc, out, _ = run(ENV, conf(fail_open=True), agent=refuse)
    assert rc == 0 and out == PREV


def test_add_standalone_without_prev_result_prints_an_empty_result():
    c = conf()
    del c["prevResult"]
    rc, out, _ = run(ENV, c, agent=lambda r: {"ok": True})
    assert rc == 0 and out == {"cniVersion": "1.0.0"}


def test_del_succeeds_when_the_agent_is_absent_and_the_netns_gone():
    env = {k: v for k, v in ENV.items() if k != "CNI_NETNS"}
    rc, out, seen = run(dict(env, CNI_COMMAND="DEL"), conf())
    assert rc == 0 and out is None and seen[0]["op"] == "del" and seen[0]["netns"] is None


def test_del_and_check_ask_the_agent():
    rc, out, seen = run(dict(ENV, CNI_COMMAND="DEL"), conf(), agent=lambda r: {"ok": True})
    assert rc == 0 and out is None and seen[0]["op"] == "del"
    rc, out, seen = run(dict(ENV, CNI_COMMAND="CHECK"), conf(), agent=lambda r: {"ok": True})
    assert rc == 0 and out is None and seen[0]["op"] == "check"
    rc, out, _ = run(dict(ENV, CNI_COMMAND="CHECK"), conf(),
                     agent=lambda r: {"ok": False, "error": "not enrolled"})
    assert rc == 1 and out["code"] == 100 and out["details"] == "not enrolled"


def test_check_without_the_agent_fails_unless_fail_open():
    rc, out, _ = run(dict(ENV, CNI_COMMAND="CHECK"), conf())
    assert rc == 1 and out["code"] == 11
    rc, out, _ = run(dict(ENV, CNI_COMMAND="CHECK"), conf(fail_open=True))
    assert rc == 0 and out is None


def test_version_lists_supported_versions():
    rc, out, _ = run({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out == {"cniVersion": "1.0.0",
                               "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    rc, out, _ = run({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert out["cniVersion"] == "0.4.0"


@pytest.mark.parametrize("config,code,word", [
    (b"{not json", 6, "not JSON"),
    (b"", 6, "no network configuration"),
    (b"[1]", 6, "object"),
    (conf(cniVersion="9.9.9"), 1, "9.9.9"),
    (conf(fail_open="yes"), 7, "fail_open"),
    (conf(agent_socket="relative.sock"), 7, "agent_socket"),
    (conf(timeout=0), 7, "timeout"),
    (conf(log_level="loud"), 7, "log_level"),
    (conf(prevResult=[1]), 7, "prevResult"),
])
def test_bad_config_is_the_spec_error_and_nothing_is_asked(config, code, word):
    rc, out, seen = run(ENV, config)
    assert rc == 1 and out["code"] == code and not seen
    assert word in out["msg"] + out["details"]


def test_log_file_gets_the_decision(tmp_path):
    log = tmp_path / "cni.log"
    rc, _, _ = run(ENV, conf(fail_open=True, log_file=str(log), log_level="info"))
    assert rc == 0 and "fail_open" in log.read_text() and "shop/web-0" in log.read_text()


# ---- the real executable over a real socket ----------------------------------------------

class FakeAgent:
    """A Unix socket answering each request line with `answer(request)`."""

    def __init__(self, path, answer):
        self.path, self.answer, self.seen = path, answer, []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                data = b""
                while not data.endswith(b"\n"):
                    b = c.recv(4096)
                    if not b:
                        break
                    data += b
                req = json.loads(data)
                self.seen.append(req)
                c.sendall((json.dumps(self.answer(req)) + "\n").encode())

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes the accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def exec_plugin(env, config):
    r = subprocess.run([sys.executable, "-m", "meshbpf.cni.plugin"], input=json.dumps(config),
                       env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=30)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r.stderr


def test_executable_over_a_real_socket(tmp_path):
    path = str(tmp_path / "cni.sock")
    agent = FakeAgent(path, lambda r: {"ok": True, "meshed": True})
    try:
        rc, out, err = exec_plugin(ENV, conf(agent_socket=path))
        assert rc == 0 and out == PREV, err
        assert agent.seen[0]["op"] == "add" and agent.seen[0]["uid"] == "1a2b-3c"
    finally:
        agent.close()
    # the agent has gone: a stale socket file refuses connections
    rc, out, err = exec_plugin(ENV, conf(agent_socket=path))
    assert rc == 1 and out["code"] == 11 and "refused" in out["details"].lower()
    rc, out, err = exec_plugin(dict(ENV, CNI_COMMAND="DEL"), conf(agent_socket=path))
    assert rc == 0 and out is None


def test_slow_agent_times_out_as_unreachable(tmp_path):
    path = str(tmp_path / "slow.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)                        # accepts (backlog) but never answers
    try:
        rc, out, _ = exec_plugin(ENV, conf(agent_socket=path, timeout=0.5))
        assert rc == 1 and out["code"] == 11 and "0.5s" in out["details"]
    finally:
        s.close()


def test_plugin_imports_only_the_standard_library():
    code = ("import sys; import meshbpf.cni.plugin; "
            "print(sorted(m for m in sys.modules if m.startswith(('meshbpf', 'bcc', 'pyroute2', "
            "'click', 'yaml'))))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(r.stdout.replace("'", '"')) == ["meshbpf", "meshbpf.cni", "meshbpf.cni.plugin"]


def test_add_the_agent_cannot_answer_yet_is_try_again_unless_fail_open():
    # the agent's pod source cannot say (its API server is down): the runtime retries
    later = lambda r: {"ok": False, "retry": True, "error": "cannot get pod shop/web-0"}  # noqa: E731
    rc, out, _ = run(ENV, conf(), agent=later)
    assert rc == 1 and out["code"] == 11 and out["details"] == "cannot get pod shop/web-0"
    rc, out, _ = run(ENV, conf(fail_open=True), agent=later)
    assert rc == 0 and out == PREV
