"""eBPF mode captures what Istio's rules capture (issue 9, items 1, 2, 6 and 9).

iptables mode is Istio's own rules, so it is the oracle: for the same config and the same
traffic the same listener must see it. Pods get `::6` on lo only from meshbpf (the sandbox
does not add it, as no init container runs in eBPF mode). Sidecars are real Envoy
configured as Istio's (meshbpf.testbed.sidecar), run as uid 1337.
"""

import json
import os
import textwrap

import pytest

from meshbpf.config import InterceptConfig
from meshbpf.service import NodeService
from meshbpf.ebpf.maps import Maps
from meshbpf.pod import Pod
from meshbpf.testbed import Sandbox, pod_python, traffic

pytestmark = pytest.mark.kernel

APP = 8080
OUT_CX = "tcp.outbound.downstream_cx_total"
IN_CX = "tcp.inbound.downstream_cx_total"
IN_UP = "cluster.InboundPassthroughCluster.upstream_cx_total"

def request(pod, host, port=APP, userns=False, check=True):
    """One connection from `pod`'s app (uid 0); the server's JSON reply (with check=False,
    {"error": ...} when it failed, so the caller can show what its sidecar counted)."""
    out = traffic.http_get(pod, host, port, path="/p", userns=userns, allow_error=not check)
    return out if "error" in out else out["reply"]


def delta(sidecar, names, fn):
    before = sidecar.stats()
    out = fn()
    after = sidecar.stats()
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}, out


def bare(ip):
    return ip[len("::ffff:"):] if ip.startswith("::ffff:") and "." in ip else ip


def lo_has_v6_passthrough(pod):
    r = pod.exec(["ip", "-6", "-o", "addr", "show", "dev", "lo"], check=True)
    return " ::6/128 " in r.stdout


def interceptor(sb, mode):
    if mode == "ebpf":
        return NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
    return NodeService(mode="iptables", pin_prefix=sb.pin_prefix)


def cleanup(sb, ic):
    ic.cleanup()
    if ic.mode == "ebpf":
        assert not os.path.exists(sb.pin_prefix)


@pytest.fixture(scope="module")
def bed():
    """a: client app + Envoy; b: app on 8080 + Envoy; c: plain pod with an app on 8080."""
    with Sandbox(name="parity") as sb:
        a, b, c = sb.add_pod("a"), sb.add_pod("b"), sb.add_pod("c")
        b.start_http_server(APP)
        c.start_http_server(APP)
        env_a, env_b = a.start_envoy(), b.start_envoy()
        yield dict(sb=sb, a=a, b=b, c=c, env_a=env_a, env_b=env_b)


# ---- item 1: ::6 for the IPv6 inbound passthrough --------------------------------------

@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_ipv6_inbound_through_istio_envoy_with_v6_passthrough_from_meshbpf(bed, mode):
    sb, b, c, env_b = bed["sb"], bed["b"], bed["c"], bed["env_b"]
    assert not lo_has_v6_passthrough(b), "the test bed must not add ::6 itself"
    ic = interceptor(sb, mode)
    try:
        rec = ic.attach(b.pod, InterceptConfig())
        d, reply = delta(env_b, (IN_CX, IN_UP), lambda: request(c, b.ip6, check=False))
        # one client connection: one inbound connection, one passthrough upstream (a loop
        # would show hundreds), bound to ::6 as Istio's passthrough is
        assert d == {IN_CX: 1, IN_UP: 1}, (d, reply, env_b.log()[-2000:])
        assert reply["pod"] == "b" and reply["peer"][0] == "::6", reply
        assert bare(reply["local"][0]) == b.ip6 and reply["local"][1] == APP
        assert rec["added_inbound_v6_address"] is True and lo_has_v6_passthrough(b)
        ic.detach(b.pod)
        assert not lo_has_v6_passthrough(b), "detach must remove the ::6 meshbpf added"
    finally:
        cleanup(sb, ic)
    assert not lo_has_v6_passthrough(b)


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_a_v6_passthrough_address_meshbpf_did_not_add_stays(bed, mode):
    sb, b = bed["sb"], bed["b"]
    b.exec(["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"], check=True)
    ic = interceptor(sb, mode)
    try:
        rec = ic.attach(b.pod, InterceptConfig())
        assert rec["added_inbound_v6_address"] is False
        ic.detach(b.pod)
        assert lo_has_v6_passthrough(b)
    finally:
        cleanup(sb, ic)
        b.exec(["ip", "-6", "addr", "del", "::6/128", "dev", "lo"])


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_reattach_without_ipv6_capture_removes_the_v6_passthrough_it_added(bed, mode):
    sb, b = bed["sb"], bed["b"]
    ic = interceptor(sb, mode)
    try:
        assert ic.attach(b.pod, InterceptConfig())["added_inbound_v6_address"] is True
        v4only = type(ic)(pin_prefix=sb.pin_prefix, ipv6_auto=False,
                          **({"cgroup_root": sb.cgroup_root} if mode == "ebpf" else {}))
        rec = v4only.attach(b.pod, InterceptConfig(enable_ipv6=False))
        assert rec["added_inbound_v6_address"] is False and not lo_has_v6_passthrough(b)
    finally:
        cleanup(sb, ic)


# ---- item 2: IPv6 ranges never match IPv4 (and the other way round) --------------------

CIDR_CASES = {
    # config: {family: captured?} as Istio's per-family rules decide
    "exclude ::/0": ({"outbound_ip_ranges_exclude": "::/0"}, {"ip4": True, "ip6": False}),
    "exclude 0.0.0.0/0": ({"outbound_ip_ranges_exclude": "0.0.0.0/0"}, {"ip4": False, "ip6": True}),
    "exclude ::ffff:0:0/96": ({"outbound_ip_ranges_exclude": "::ffff:0:0/96"},
                              {"ip4": True, "ip6": True}),
    "include ::/0": ({"outbound_ip_ranges_include": "::/0"}, {"ip4": False, "ip6": True}),
}


@pytest.mark.parametrize("case", sorted(CIDR_CASES))
def test_cidr_ranges_keep_the_families_apart_like_iptables_mode(bed, case):
    sb, a, c, env_a = bed["sb"], bed["a"], bed["c"], bed["env_a"]
    change, istio = CIDR_CASES[case]
    cfg = InterceptConfig().replace(**change)
    seen = {}
    for mode in ("iptables", "ebpf"):
        ic = interceptor(sb, mode)
        try:
            ic.attach(a.pod, cfg)
            for fam in ("ip4", "ip6"):
                d, reply = delta(env_a, (OUT_CX,), lambda: request(a, getattr(c, fam)))
                assert reply["pod"] == "c"
                captured = d[OUT_CX] >= 1
                # captured or not, c saw A's own address (Envoy's upstream or the app)
                assert bare(reply["peer"][0]) == getattr(a, fam)
                seen[(mode, fam)] = captured
        finally:
            cleanup(sb, ic)
    for fam in ("ip4", "ip6"):
        assert seen[("iptables", fam)] == istio[fam], f"oracle disagrees: {seen}"
        assert seen[("ebpf", fam)] == seen[("iptables", fam)], f"{case} {fam}: {seen}"


# ---- item 9: the proxy in the pod's own user namespace ---------------------------------

def test_proxy_in_a_pod_user_namespace_is_not_redirected_to_itself(bed):
    sb, c = bed["sb"], bed["c"]
    u = sb.add_pod("u")
    try:
        env = u.start_envoy(userns=True)       # uid 1337 inside: host uid base + 1337
        host_proxy = u.host_id(1337)
        assert host_proxy != 1337
        with open(f"/proc/{env.pid}/status") as f:
            uid_line = next(l for l in f if l.startswith("Uid:"))
        assert int(uid_line.split()[1]) == host_proxy
        ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            rec = ic.attach(u.pod, InterceptConfig())     # named by netns: found by scan
            with Maps(sb.pin_prefix) as m:
                before = m.counters()
            # the app (uid 0 inside) is redirected; the proxy's upstream connect is not
            d, reply = delta(env, (OUT_CX,), lambda: request(u, c.ip4, userns=True, check=False))
            assert d[OUT_CX] == 1, (d, reply, env.log()[-2000:])
            assert reply["pod"] == "c" and bare(reply["peer"][0]) == u.ip4
            with Maps(sb.pin_prefix) as m:
                after = m.counters()
                (pc,) = [v for _, v in m["pods"].items()]
            assert after["redirect_out"] - before["redirect_out"] == 1
            assert after["bypass_proxy"] - before["bypass_proxy"] >= 1
            assert list(pc.uids[:pc.n_uids]) == [host_proxy]
            assert list(pc.gids[:pc.n_gids]) == [host_proxy]
            assert rec["userns"]["uid_map"] == [[0, u.userns_base, 65536]]
            assert Pod.from_pid(env.pid).user_namespace().to_dict() == rec["userns"]
        finally:
            cleanup(sb, ic)
    finally:
        sb.remove_pod("u")


# ---- item 6: getsockopt calls the hook does not answer are left alone ----------------

GETSOCKOPT = textwrap.dedent(r"""
    import ctypes, json, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)

    def getsockopt(fd, level, name, size):
        buf, ln = ctypes.create_string_buffer(size), ctypes.c_uint32(size)
        rc = libc.getsockopt(fd, level, name, buf, ctypes.byref(ln))
        return [rc, ctypes.get_errno() if rc else 0, ln.value]

    # optlen above PAGE_SIZE on a connected socket: TCP_INFO, SO_RCVBUF
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    out = {"tcp_info": getsockopt(s.fileno(), socket.IPPROTO_TCP, socket.TCP_INFO, 8192),
           "rcvbuf": getsockopt(s.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)}
    s.close()
    print(json.dumps(out))
""")



def _many_rules(n):
    lines = ["*filter", ":MBTEST - [0:0]"]
    lines += [f"-A MBTEST -s 10.{i >> 8 & 255}.{i & 255}.0/24 -p tcp --dport {1000 + i} "
              f"-m comment --comment meshbpf-test-rule-{i} -j RETURN" for i in range(n)]
    return "\n".join(lines + ["COMMIT", ""])


def test_large_getsockopt_below_the_hook_gets_the_kernels_answer(bed):
    sb, a, c, env_a = bed["sb"], bed["a"], bed["c"], bed["env_a"]
    c.exec(["iptables-legacy-restore", "--noflush"], input=_many_rules(300), check=True)
    try:
        def look():
            # IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES (tens of KB) from a process in the cgroup
            saved = c.exec(["iptables-legacy-save", "-t", "filter"], check=True).stdout
            rules = [l for l in saved.splitlines() if l.startswith("-A MBTEST")]
            sockopt = json.loads(c.exec([pod_python(), "-c", GETSOCKOPT, c.ip4, str(APP)],
                                        check=True).stdout)
            return rules, sockopt
        rules0, sockopt0 = look()
        assert len(rules0) == 300
        assert sockopt0["tcp_info"][:2] == [0, 0] and sockopt0["tcp_info"][2] > 100, sockopt0
        assert sockopt0["rcvbuf"] == [0, 0, 4]
        ic = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            ic.attach(a.pod, InterceptConfig())       # programs on the test cgroup root
            rules1, sockopt1 = look()                 # c's processes run below it
            assert rules1 == rules0
            assert sockopt1 == sockopt0
            # and the hook still answers SO_ORIGINAL_DST for the sidecar
            with Maps(sb.pin_prefix) as m:
                before = m.counters()["orig_dst_answered"]
            d, reply = delta(env_a, (OUT_CX,), lambda: request(a, c.ip4))
            assert d[OUT_CX] == 1 and reply["pod"] == "c"
            with Maps(sb.pin_prefix) as m:
                assert m.counters()["orig_dst_answered"] > before
        finally:
            cleanup(sb, ic)
    finally:
        c.exec(["iptables-legacy", "-t", "filter", "-F", "MBTEST"])
        c.exec(["iptables-legacy", "-t", "filter", "-X", "MBTEST"])
