"""The data path for kernels without bpf_get_netns_cookie in sock_ops, sk_msg and
cgroup/getsockopt (5.10 LTS), loaded on this kernel with MESHBPF_DISABLE_FEATURES: sock_ops
finds the pod through the socket's BTF and netns_ino, getsockopt answers from the
sidecar's accepted socket (sk_orig). Outbound through a real Envoy with its original
destination, and pods whose loopback 4-tuples are the same at once, each get their own.
(The other e2e tests run in this variant too: `make test-510-variant`.)"""

import json
import os

import pytest

from meshbpf import bpfsys, system
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import loader, structs
from meshbpf.ebpf.maps import Maps
from meshbpf.probe.features import DISABLE_ENV
from meshbpf.service import NodeService
from meshbpf.testbed import Sandbox, traffic

pytestmark = pytest.mark.kernel

APP_UID = 1000
VARIANT = "netns_cookie_sock_ops,netns_cookie_sockopt,so_netns_cookie"


@pytest.fixture(scope="module")
def node():
    with Sandbox(name="nonc") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        yield sb, a, b, env


@pytest.fixture
def service(node, monkeypatch):
    sb = node[0]
    made = []

    def make(variant=True):
        if variant:
            monkeypatch.setenv(DISABLE_ENV, VARIANT)
        else:
            monkeypatch.delenv(DISABLE_ENV, raising=False)
        ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        made.append(ic)
        return ic
    yield make
    for ic in made:
        ic.cleanup()
    assert not os.path.exists(sb.pin_prefix)


def _maps_used(pin_prefix, prog):
    fd = loader.prog_fd(pin_prefix, prog)
    try:
        names = set()
        for mid in bpfsys.prog_map_ids(fd):
            with bpfsys.closing(bpfsys.map_get_fd_by_id(mid)) as mfd:
                names.add(bpfsys.map_get_info(mfd)["name"])
        return names
    finally:
        os.close(fd)


def test_netns_cookie_through_bpf_is_the_one_so_netns_cookie_reports(node, monkeypatch):
    """5.10 has no SO_NETNS_COOKIE: the cookie comes from a throwaway connect4 program."""
    _, a, b, _ = node
    monkeypatch.setenv(DISABLE_ENV, "so_netns_cookie")
    for pod in (a, b):
        want = system.netns_cookie(pod.pod.netns, fallback=False)    # SO_NETNS_COOKIE
        assert system.netns_cookie(pod.pod.netns) == want
    assert system.netns_cookie() == system.netns_cookie(fallback=False)
    assert a.pod.netns_cookie != b.pod.netns_cookie
    mount = system.cgroup2_mount()
    assert not [n for n in os.listdir(mount) if n.endswith("-cookie")]   # nothing left


def test_variant_is_loaded_and_outbound_reaches_the_original_destination(node, service):
    sb, a, b, env = node
    ic = service()
    ic.attach(a.pod, InterceptConfig())
    # what runs is the variant: sock_ops reads netns_ino, getsockopt the socket storage
    assert "netns_ino" in _maps_used(sb.pin_prefix, "mb_sockops")
    assert "sk_orig" in _maps_used(sb.pin_prefix, "mb_getsockopt")
    with Maps(sb.pin_prefix) as maps:
        got = maps["netns_ino"].lookup(structs.U32(system.netns_inode(a.pod.netns)))
        assert got is not None and got.value == a.pod.netns_cookie
    before = env.stats().get("tcp.outbound.downstream_cx_total", 0)
    out = traffic.http_get(a, b.ip4, 8080, uid=APP_UID)
    assert out["peer"] == [b.ip4, 8080]
    assert out["reply"]["pod"] == "b"          # Envoy read the original destination
    assert env.stats().get("tcp.outbound.downstream_cx_total", 0) == before + 1
    with Maps(sb.pin_prefix) as maps:
        c = maps.counters()
    assert c["orig_dst_answered"] >= 1 and c["orig_dst_miss"] == 0
    ic.detach(a.pod)
    with Maps(sb.pin_prefix) as maps:     # the pod's netns_ino entry goes with it
        assert maps["netns_ino"].lookup(
            structs.U32(system.netns_inode(a.pod.netns))) is None


def test_without_the_override_the_cookie_path_is_loaded(node, service):
    sb, a, _, _ = node
    ic = service(variant=False)
    ic.attach(a.pod, InterceptConfig())
    assert "netns_ino" not in _maps_used(sb.pin_prefix, "mb_sockops")
    assert "sk_orig" not in _maps_used(sb.pin_prefix, "mb_getsockopt")


def test_pods_with_the_same_loopback_tuple_at_once_each_get_their_destination(node, service):
    """getsockopt cannot tell these pods apart by tuple; the socket's own storage can."""
    sb, _, b, _ = node
    ports = [8091, 8092, 8093]
    for port in ports:
        b.start_http_server(port)
    pods = [sb.add_pod(f"n{i}") for i in range(len(ports))]
    try:
        ic = service()
        for p in pods:
            p.start_haproxy()
            ic.attach(p.pod, InterceptConfig())
        procs = [p.spawn(traffic.connect_argv(b.ip4, port, http="/", bind_port=41001,
                                              hold=1.5), uid=APP_UID, label="client")
                 for p, port in zip(pods, ports)]
        for p, port, proc in zip(pods, ports, procs):
            assert proc.wait(timeout=30) == 0, proc.output()
            out = json.loads(proc.output().strip().splitlines()[-1])
            assert out["peer"] == [b.ip4, port]
            assert out["reply"]["local"][1] == port        # each reached its own port
            assert out["reply"]["peer"][0].replace("::ffff:", "") == p.ip4
    finally:
        for p in pods:
            sb.remove_pod(p.name)


def test_old_bcc_path_loads_the_programs_itself_and_outbound_works(node, service, monkeypatch):
    """bcc < 0.25 cannot set expected_attach_type: the loader loads bcc's bytecode with its
    own BPF_PROG_LOAD (forced here by MESHBPF_OWN_PROG_LOAD), with the 5.10 variant, as on
    a Debian 11 node (5.10, bcc 0.18); sk_msg (always loaded so) gets sock_hash in place
    of its placeholder map fd, and splices."""
    _, a, b, env = node
    own = []
    real = loader._own_load

    def spy(bpf, spec, attach_type):
        own.append(spec.name)
        return real(bpf, spec, attach_type)
    monkeypatch.setattr(loader, "_own_load", spy)
    monkeypatch.setenv(loader.OWN_LOAD_ENV, "1")
    ic = service()
    ic.attach(a.pod, InterceptConfig())
    assert {"mb_connect4", "mb_connect6", "mb_getsockopt", "mb_sockops", "mb_sk_msg"} <= set(own)
    assert "sock_hash" in _maps_used(ic.pin_prefix, "mb_sk_msg")
    before = env.stats().get("tcp.outbound.downstream_cx_total", 0)
    out = traffic.http_get(a, b.ip4, 8080, uid=APP_UID)
    assert out["peer"] == [b.ip4, 8080]
    assert out["reply"]["pod"] == "b"
    assert env.stats().get("tcp.outbound.downstream_cx_total", 0) == before + 1
    with Maps(ic.pin_prefix) as m:          # the request and reply took the splice
        assert m.counters()["splice_msgs"] > 0
