"""iptables mode on a real kernel: Istio's payloads in fresh network namespaces, on both
the nft and the legacy backend; idempotence, rollback, cleanup, drift and reconcile; the
interceptor end to end with real Envoy sidecars. Every netns is ours (mbt-...) and is
deleted in teardown; the machine's own netns is never touched.
"""

import json
import os
import subprocess
import uuid

import pytest
from click.testing import CliRunner

from meshbpf.config import InterceptConfig
from meshbpf.errors import ApplyError, MeshbpfError, UsageError
from meshbpf.iptables import apply as ops
from meshbpf.iptables import rules as rules_mod
from meshbpf.iptables import savefile
from meshbpf.iptables.backend import Backend
from meshbpf.iptables.commands import iptables as iptables_cli
from meshbpf.service import NodeService
from meshbpf.pod import Pod
from meshbpf.state import StateStore

pytestmark = pytest.mark.kernel

VARIANTS = ["nft", "legacy"]
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    os.pardir, "shared", "conformance", "istio-iptables")


def _cases():
    try:
        with open(os.path.join(CONF, "cases.json")) as f:
            data = json.load(f)
    except OSError:
        return []
    out = []
    for name in sorted(data["cases"]):
        for fam in (4, 6):
            if os.path.exists(os.path.join(CONF, "live", f"{name}.v{fam}.iptables-save")):
                out.append((name, fam))
    return out


LIVE_CASES = _cases()


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def netns():
    """A factory of fresh, empty network namespaces (mbt-ipt-*), all deleted afterwards."""
    made = []

    def make():
        name = f"mbt-ipt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return f"/run/netns/{name}"

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def group_file(tmp_path_factory):
    """/etc/group plus the owner groups the conformance cases name (java=1001, ftp=1002)."""
    path = tmp_path_factory.mktemp("grp") / "group"
    with open("/etc/group") as f:
        base = f.read()
    path.write_text(base + "java:x:1001:\nftp:x:1002:\n")
    return str(path)


@pytest.fixture
def pin_prefix():
    prefix = f"/sys/fs/bpf/meshbpf-test-ipt-{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        StateStore(prefix).destroy()


def _save(netns, variant, family=4):
    return Backend(variant, family).save(netns)


def _seed_foreign(netns, variant, family=4):
    """Rules of 'other software' that meshbpf must never touch."""
    ok, err = Backend(variant, family).restore(netns, (
        "*nat\n:FOREIGN - [0:0]\n-A OUTPUT -p udp -j FOREIGN\n-A PREROUTING -i eth7 -j RETURN\n"
        "-A FOREIGN -j RETURN\nCOMMIT\n*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"))
    assert ok, err


def _same(before, after, variant):
    """nft: exactly the same dump; legacy: the same, except that tables once used stay
    listed (empty) because legacy tables cannot be unloaded from a netns."""
    if variant == "nft":
        return savefile.parse_save(after) == savefile.parse_save(before)
    return savefile.normalized(after) == savefile.normalized(before)


def _ipt(netns, variant, *args, family=4):
    binary = ("ip6tables-" if family == 6 else "iptables-") + variant
    subprocess.run(["nsenter", f"--net={netns}", binary, "-w", *args], check=True)


def _cfg(name):
    with open(os.path.join(CONF, "cases.json")) as f:
        data = json.load(f)
    return InterceptConfig.from_dict({**data["base"], **data["cases"][name]["overrides"]})


# ---- Istio's payloads, read back from the kernel ---------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case,family", LIVE_CASES, ids=[f"{c}-v{f}" for c, f in LIVE_CASES])
def test_payload_matches_kernel_readback(netns, group_file, variant, case, family):
    ns = netns()
    cfg = _cfg(case)
    res = ops.apply(ns, cfg, families=(family,), force=variant, group_file=group_file)
    assert res["families"][family] == {"action": "applied", "backend": variant, "drift": []}
    with open(os.path.join(CONF, "live", f"{case}.v{family}.iptables-save")) as f:
        expected = savefile.normalized(f.read())
    got = savefile.normalized(Backend(variant, family, group_file=group_file).save(ns))
    assert got == expected


def test_live_suite_is_complete():
    assert len([c for c, f in LIVE_CASES if f == 4]) == 27


# ---- apply: idempotence, bad input, rollback ------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_twice_changes_nothing(netns, variant):
    ns = netns()
    cfg = InterceptConfig(inbound_interception_mode="TPROXY", redirect_dns=True,
                          dns_servers_v4=["10.96.0.10"], exclude_interfaces="eth9")
    assert ops.apply(ns, cfg, force=variant)["families"][4]["action"] == "applied"
    first = savefile.parse_save(_save(ns, variant))
    second_res = ops.apply(ns, cfg, force=variant)
    assert second_res["families"][4] == {"action": "unchanged", "backend": variant, "drift": []}
    assert savefile.parse_save(_save(ns, variant)) == first


def test_apply_twice_via_cli_exits_zero(netns, pin_prefix):
    ns = netns()
    args = ["apply", "--netns", ns, "--pin-prefix", pin_prefix, "--no-ipv6", "-i", "10.0.0.0/8",
            "--output", "json"]
    r1 = CliRunner().invoke(iptables_cli, args)
    assert r1.exit_code == 0, r1.output
    assert json.loads(r1.output)["actions"] == {"4": "applied"}
    r2 = CliRunner().invoke(iptables_cli, args)
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.output)["actions"] == {"4": "unchanged"}


@pytest.mark.parametrize("args,needle", [
    (["-x", "10.0.0.0/33"], "outbound_ip_ranges_exclude: '10.0.0.0/33' is not a valid CIDR"),
    (["-i", "10.0.0.0/8,300.1.1.1/32"], "'300.1.1.1/32' is not a valid CIDR"),
    (["-b", "80,65536"], "inbound_ports_include: port 65536 is out of range"),
    (["--owner-groups-include", "no-such-group-mbt"], "group 'no-such-group-mbt' does not exist"),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_input_is_clear_and_leaves_netns_untouched(netns, pin_prefix, variant, args, needle):
    ns = netns()
    _seed_foreign(ns, variant)
    before = _save(ns, variant)
    res = CliRunner().invoke(iptables_cli, ["apply", "--netns", ns, "--pin-prefix", pin_prefix,
                                            "--iptables-binary", variant] + args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert savefile.parse_save(_save(ns, variant)) == savefile.parse_save(before)
    assert StateStore(pin_prefix).all() == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_failed_restore_is_rolled_back(netns, monkeypatch, variant):
    """iptables-restore fails on the LAST table (after nat/mangle were committed): all undone."""
    ns = netns()
    _seed_foreign(ns, variant)
    before = _save(ns, variant)
    real = Backend.restore

    def failing(self, netns_path, payload, noflush=True):
        if noflush:
            payload += "*raw\n-A NO_SUCH_CHAIN_MBT -j RETURN\nCOMMIT\n"
        return real(self, netns_path, payload, noflush)

    monkeypatch.setattr(Backend, "restore", failing)
    cfg = InterceptConfig(inbound_interception_mode="TPROXY", drop_invalid=True)
    with pytest.raises(ApplyError, match="previous rules were restored"):
        ops.apply(ns, cfg, force=variant)
    assert _same(before, _save(ns, variant), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_failure_in_ipv6_rolls_back_ipv4_too(netns, monkeypatch, variant):
    ns = netns()
    before4, before6 = _save(ns, variant, 4), _save(ns, variant, 6)
    real = Backend.restore

    def failing(self, netns_path, payload, noflush=True):
        if noflush and self.family == 6:
            payload += "*nat\n-A NO_SUCH_CHAIN_MBT -j RETURN\nCOMMIT\n"
        return real(self, netns_path, payload, noflush)

    monkeypatch.setattr(Backend, "restore", failing)
    with pytest.raises(ApplyError):
        ops.apply(ns, InterceptConfig(enable_ipv6=True), families=(4, 6), force=variant)
    assert _same(before4, _save(ns, variant, 4), variant)
    assert _same(before6, _save(ns, variant, 6), variant)


# ---- cleanup ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_cleanup_restores_the_state_before_apply(netns, variant):
    ns = netns()
    _seed_foreign(ns, variant)
    _seed_foreign(ns, variant, 6)
    before4, before6 = _save(ns, variant, 4), _save(ns, variant, 6)
    cfg = InterceptConfig(inbound_interception_mode="TPROXY", redirect_dns=True, capture_all_dns=True,
                          exclude_interfaces="eth9", reroute_virtual_interfaces="veth1",
                          drop_invalid=True, enable_ipv6=True)
    res = ops.apply(ns, cfg, families=(4, 6), force=variant)
    assert "ISTIO_OUTPUT" in _save(ns, variant, 6)
    ops.cleanup(ns, cfg, force=variant, recorded=res["builtin"], created_tables=res["created_tables"])
    after4, after6 = _save(ns, variant, 4), _save(ns, variant, 6)
    assert "ISTIO" not in after4 and "ISTIO" not in after6
    assert _same(before4, after4, variant)
    assert _same(before6, after6, variant)
    # nothing left to remove the second time
    assert ops.cleanup(ns, cfg, force=variant)[4]["removed"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_cleanup_of_istio_init_rules_without_a_record(netns, pin_prefix, variant):
    """Rules someone else applied (no record): the same options identify non-jump rules."""
    ns = netns()
    _seed_foreign(ns, variant)
    before = _save(ns, variant)
    cfg = InterceptConfig(exclude_interfaces="eth9", outbound_ip_ranges_exclude="10.0.0.0/8")
    ok, err = Backend(variant, 4).restore(ns, rules_mod.render(cfg, 4))
    assert ok, err
    res = CliRunner().invoke(iptables_cli, ["cleanup", "--netns", ns, "--pin-prefix", pin_prefix,
                                            "--iptables-binary", variant, "-c", "eth9"])
    assert res.exit_code == 0, res.output
    assert savefile.normalized(_save(ns, variant)) == savefile.normalized(before)


# ---- drift and reconcile ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_drift_is_reported_and_reconciled(netns, monkeypatch, variant):
    ns = netns()
    _seed_foreign(ns, variant)
    cfg = InterceptConfig(exclude_interfaces="eth9", redirect_dns=True, dns_servers_v4=["10.96.0.10"])
    ops.apply(ns, cfg, force=variant)
    good = savefile.parse_save(_save(ns, variant))
    _ipt(ns, variant, "-t", "nat", "-D", "ISTIO_OUTPUT", "-o", "lo", "-s", "127.0.0.6/32", "-j", "RETURN")
    _ipt(ns, variant, "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "-j", "ISTIO_REDIRECT")
    res = ops.verify(ns, cfg, force=variant)[4]
    assert not res["in_sync"]
    assert any("ISTIO_OUTPUT" in d and "127.0.0.6/32" in d for d in res["drift"])
    assert any("OUTPUT" in d and "ISTIO_REDIRECT" in d for d in res["drift"])

    tampered = _save(ns, variant)
    with pytest.raises(MeshbpfError, match="--reconcile"):
        ops.apply(ns, cfg, force=variant)
    assert savefile.parse_save(_save(ns, variant)) == savefile.parse_save(tampered)   # untouched

    calls = []
    real = Backend.restore

    def counting(self, netns_path, payload, noflush=True):
        calls.append(payload)
        return real(self, netns_path, payload, noflush)

    monkeypatch.setattr(Backend, "restore", counting)
    out = ops.apply(ns, cfg, force=variant, reconcile=True)
    assert out["families"][4]["action"] == "reconciled"
    # one iptables-restore, every table's change inside its own single COMMIT
    assert len(calls) == 1
    for table in ("nat", "raw"):
        assert calls[0].count(f"*{table}\n") == 1
    assert ops.verify(ns, cfg, force=variant)[4]["in_sync"]
    assert savefile.parse_save(_save(ns, variant)) == good     # foreign rules intact too


@pytest.mark.parametrize("variant", VARIANTS)
def test_reconcile_to_another_config_leaves_nothing_of_the_old(netns, variant):
    ns = netns()
    _seed_foreign(ns, variant)
    before = _save(ns, variant)
    old = InterceptConfig(inbound_interception_mode="TPROXY", exclude_interfaces="eth9")
    new = InterceptConfig(outbound_ip_ranges_exclude="10.0.0.0/8", redirect_dns=True, capture_all_dns=True)
    first = ops.apply(ns, old, force=variant)
    rec, rec_tables = first["builtin"], first["created_tables"]["4"]
    res = ops.apply(ns, new, force=variant, reconcile=True, recorded=rec)
    assert res["families"][4]["action"] == "reconciled"
    assert ops.verify(ns, new, force=variant)[4]["in_sync"]
    text = _save(ns, variant)
    assert "eth9" not in text and "ISTIO_TPROXY" not in text and "0x539" not in text
    ops.cleanup(ns, new, force=variant, recorded=res["builtin"],
                created_tables={"4": sorted(set(rec_tables) | set(res["created_tables"].get("4", [])))})
    assert _same(before, _save(ns, variant), variant)


def test_verify_cli_exit_codes(netns, pin_prefix):
    ns = netns()
    assert CliRunner().invoke(iptables_cli, ["apply", "--netns", ns, "--pin-prefix", pin_prefix,
                                             "--no-ipv6"]).exit_code == 0
    ok = CliRunner().invoke(iptables_cli, ["verify", "--netns", ns, "--pin-prefix", pin_prefix])
    assert ok.exit_code == 0 and "in sync" in ok.output
    _ipt(ns, "nft", "-t", "nat", "-F", "ISTIO_INBOUND")
    bad = CliRunner().invoke(iptables_cli, ["verify", "--netns", ns, "--pin-prefix", pin_prefix])
    assert bad.exit_code == 1 and "DRIFT" in bad.output and "ISTIO_INBOUND" in bad.output
    fixed = CliRunner().invoke(iptables_cli, ["apply", "--netns", ns, "--pin-prefix", pin_prefix,
                                              "--no-ipv6", "--reconcile"])
    assert fixed.exit_code == 0, fixed.output
    assert CliRunner().invoke(iptables_cli, ["verify", "--netns", ns,
                                             "--pin-prefix", pin_prefix]).exit_code == 0


def test_the_machines_own_netns_is_refused(monkeypatch, pin_prefix):
    def no_writes(*a, **k):
        raise AssertionError("nothing may be written to the machine's own netns")

    monkeypatch.setattr(Backend, "restore", no_writes)
    monkeypatch.setattr("meshbpf.system.run", no_writes)
    own = f"/proc/{os.getpid()}/ns/net"
    for call in (lambda: ops.apply(own, InterceptConfig()),
                 lambda: ops.cleanup(own, InterceptConfig()),
                 lambda: ops.ensure_inbound_v6_address(own),
                 lambda: ops.ensure_tproxy_routes(own, InterceptConfig(inbound_interception_mode="TPROXY"),
                                                  (4,))):
        with pytest.raises(UsageError, match="machine's own network namespace"):
            call()
    res = CliRunner().invoke(iptables_cli, ["apply", "--pid", str(os.getpid()), "--pin-prefix", pin_prefix])
    assert res.exit_code == 2 and "machine's own network namespace" in res.output


def test_backend_is_chosen_as_istio_does(netns):
    from meshbpf.iptables.backend import detect
    ns = netns()
    assert detect(ns, 4).variant == "nft"             # nothing anywhere: nft
    ok, err = Backend("legacy", 4).restore(ns, "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n")
    assert ok, err
    assert detect(ns, 4).variant == "legacy"          # legacy already holds rules
    assert detect(ns, 4, force="iptables-nft").variant == "nft"
    with pytest.raises(UsageError):
        detect(ns, 4, force="bogus")


# ---- the interceptor, end to end ------------------------------------------------------------

def _stat(stats, name):
    return stats.get(name, 0)


def _curl(pod, ip, port=8080):
    url = f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"
    r = pod.exec(["curl", "-sS", "--max-time", "10", url], timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_interceptor_moves_traffic_through_envoy_and_detaches_cleanly():
    from meshbpf.testbed import Sandbox
    with Sandbox(name="iptint") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env_a, env_b = a.start_envoy(), b.start_envoy()
        before = {p.name: (_save(p.netns, "nft", 4), _save(p.netns, "nft", 6)) for p in (a, b)}
        icp = NodeService(mode="iptables", pin_prefix=sb.pin_prefix)
        for p in (a, b):
            rec = icp.attach(p.pod, InterceptConfig())
            assert rec["families"] == [4, 6]                  # the pod has IPv6: auto
            assert rec["mode"] == "iptables" and rec["backend"] == "nft"
            assert rec["config"]["enable_ipv6"] is True and rec["cgroup"] == p.pod.cgroup
        # re-attaching is a no-op
        assert icp.attach(a.pod, InterceptConfig())["actions"] == {"4": "unchanged", "6": "unchanged"}

        for fam in ("ip4", "ip6"):
            sa0, sb0 = env_a.stats(), env_b.stats()
            reply = _curl(a, getattr(b, fam))
            sa1, sb1 = env_a.stats(), env_b.stats()
            assert reply["pod"] == "b"
            # through A's outbound listener and B's inbound listener (B's app sees 127.0.0.6 / ::6)
            assert _stat(sa1, "tcp.outbound.downstream_cx_total") >= \
                _stat(sa0, "tcp.outbound.downstream_cx_total") + 1, env_a.log()
            assert _stat(sb1, "tcp.inbound.downstream_cx_total") >= \
                _stat(sb0, "tcp.inbound.downstream_cx_total") + 1, env_b.log()
            expected = "127.0.0.6" if fam == "ip4" else "::6"
            assert reply["peer"][0] in (expected, "::ffff:" + expected), reply

        st = icp.status()
        assert st["mode"] == "iptables" and len(st["pods"]) == 2
        assert all(p["in_sync"] for p in st["pods"])
        _ipt(a.netns, "nft", "-t", "nat", "-F", "ISTIO_OUTPUT")
        drifted = {p["name"]: p for p in icp.status()["pods"]}
        assert drifted[a.pod.name]["in_sync"] is False and drifted[a.pod.name]["drift"]
        with pytest.raises(MeshbpfError, match="--reconcile"):
            icp.attach(a.pod, InterceptConfig())
        NodeService(mode="iptables", pin_prefix=sb.pin_prefix, reconcile=True).attach(a.pod, InterceptConfig())
        assert all(p["in_sync"] for p in icp.status()["pods"])

        # a new config for an attached pod is an update, applied atomically
        rec = icp.attach(b.pod, InterceptConfig(inbound_ports_exclude="8080"))
        assert rec["actions"] == {"4": "reconciled", "6": "reconciled"}
        sb0 = env_b.stats()
        reply = _curl(a, b.ip4)
        assert reply["peer"][0].endswith(a.ip4)               # B's app now reached directly
        assert _stat(env_b.stats(), "tcp.inbound.downstream_cx_total") == \
            _stat(sb0, "tcp.inbound.downstream_cx_total")

        for p in (a, b):
            icp.detach(p.pod)
            after = (_save(p.netns, "nft", 4), _save(p.netns, "nft", 6))
            for x, y in zip(before[p.name], after):
                assert _same(x, y, "nft")
        assert icp.status()["pods"] == []
        sa0 = env_a.stats()
        assert _curl(a, b.ip4)["peer"][0].endswith(a.ip4)
        assert _stat(env_a.stats(), "tcp.outbound.downstream_cx_total") == \
            _stat(sa0, "tcp.outbound.downstream_cx_total")


def test_interceptor_no_ipv6_and_cleanup_all(netns, pin_prefix):
    ns = netns()
    pod = Pod.from_netns(ns)
    subprocess.run(["ip", "-n", os.path.basename(ns), "link", "add", "d0", "type", "veth", "peer",
                    "name", "d1"], check=True)
    subprocess.run(["ip", "-n", os.path.basename(ns), "link", "set", "d0", "up"], check=True)
    subprocess.run(["ip", "-n", os.path.basename(ns), "addr", "add", "fd00:6d62:ffff::1/64", "dev", "d0",
                    "nodad"], check=True)
    assert pod.has_ipv6
    lo6 = ["ip", "-n", os.path.basename(ns), "-6", "-o", "addr", "show", "dev", "lo"]
    subprocess.run(["ip", "-n", os.path.basename(ns), "link", "set", "lo", "up"], check=True)
    rec = NodeService(mode="iptables", pin_prefix=pin_prefix, ipv6_auto=False).attach(pod, InterceptConfig())
    assert rec["families"] == [4]
    assert "ISTIO" not in _save(ns, "nft", 6)
    assert "::6/128" not in subprocess.run(lo6, capture_output=True, text=True).stdout
    icp = NodeService(mode="iptables", pin_prefix=pin_prefix)
    rec = icp.attach(pod, InterceptConfig())
    assert rec["families"] == [4, 6] and rec["added_inbound_v6_address"] is True
    assert "ISTIO_OUTPUT" in _save(ns, "nft", 6)
    assert " ::6/128 " in subprocess.run(lo6, capture_output=True, text=True).stdout   # as Istio does
    StateStore(pin_prefix).save(999, {"name": "ebpf-pod", "mode": "ebpf", "netns": "/x"})
    assert [p["name"] for p in icp.status()["pods"]] == [pod.name]      # eBPF records are not ours
    icp.cleanup()
    assert "ISTIO" not in _save(ns, "nft", 4) and "ISTIO" not in _save(ns, "nft", 6)
    assert "::6/128" not in subprocess.run(lo6, capture_output=True, text=True).stdout
    assert [r["name"] for r in StateStore(pin_prefix).all()] == ["ebpf-pod"]


def test_tproxy_attach_sets_up_and_removes_policy_routing(netns, pin_prefix):
    """As Istio's ConfigureRoutes: fwmark 1337 -> table 133 -> local default dev lo."""
    ns = netns()
    name = os.path.basename(ns)

    def ip(*args):
        return subprocess.run(["ip", "-n", name, *args], capture_output=True, text=True, check=True).stdout

    rules_before, routes_before = ip("-4", "rule", "show"), ip("-4", "route", "show", "table", "all")
    pod = Pod.from_netns(ns)
    icp = NodeService(mode="iptables", pin_prefix=pin_prefix, ipv6_auto=False)
    rec = icp.attach(pod, InterceptConfig(inbound_interception_mode="TPROXY", inbound_tproxy_mark=1337,
                                          inbound_tproxy_route_table=133))
    assert len(rec["added_routes"]) == 2
    assert "fwmark 0x539 lookup 133" in ip("-4", "rule", "show")
    assert "local default dev lo" in ip("-4", "route", "show", "table", "133")
    assert "ISTIO_TPROXY" in _save(ns, "nft")
    # back to REDIRECT: the routing goes, the rules follow the new mode
    rec = icp.attach(pod, InterceptConfig())
    assert rec["added_routes"] == [] and "fwmark" not in ip("-4", "rule", "show")
    icp.attach(pod, InterceptConfig(inbound_interception_mode="TPROXY"))
    icp.detach(pod)
    assert ip("-4", "rule", "show") == rules_before
    assert ip("-4", "route", "show", "table", "all") == routes_before
    assert "ISTIO" not in _save(ns, "nft")
