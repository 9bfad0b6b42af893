"""The service layer on a real kernel: enrollment cost that does not grow with the node
(counted in bpf syscalls), two writers on one prefix, and re-configuring a live pod while
its app connects without one connection going around the sidecar or failing."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from meshbpf import bpfsys
from meshbpf.config import InterceptConfig
from meshbpf.ebpf import structs
from meshbpf.ebpf.maps import Maps
from meshbpf.testbed import Sandbox, pod_python
from meshbpf.testbed.traffic import CONNECT_LOOP as LOOP
from meshbpf.service import NodeService

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = dict(outbound_ip_ranges_exclude="10.250.0.0/16,fd00:250::/64", outbound_ports_exclude="22")


def _bpf_calls(fn):
    """(result of fn(), {bpf command: calls} it made)."""
    before = bpfsys.SYSCALLS.copy()
    out = fn()
    return out, dict(bpfsys.SYSCALLS - before)


def _entry_counts(pin_prefix):
    with Maps(pin_prefix) as m:
        return {name: len(m[name]) for name in structs.ENTRY_MAPS}


def test_enroll_and_detach_cost_is_the_same_with_1_and_250_pods():
    with Sandbox(name="flat") as sb:
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        cfg = InterceptConfig(**CFG)
        probe = sb.add_pod("probe")
        try:
            svc.attach(sb.add_pod("p0").pod, cfg)

            def cycle():
                rec, att = _bpf_calls(lambda: svc.attach(probe.pod, cfg, pod_id="probe"))
                _, rec_upd = _bpf_calls(lambda: svc.update("probe", InterceptConfig(
                    outbound_ip_ranges_exclude="10.251.0.0/16", outbound_ports_exclude="23")))
                _, det = _bpf_calls(lambda: svc.detach("probe"))
                return att, rec_upd, det, rec["timings"]

            cycle()                                 # the probe pod's first enrollment
            one = cycle()
            for i in range(1, 250):
                svc.attach(sb.add_pod(f"p{i}").pod, cfg)
            assert len(svc.store.ids()) == 250
            many = cycle()
            assert one[:3] == many[:3], (one[:3], many[:3])
            assert sum(one[0].values()) > 0 and sum(one[2].values()) > 0
            # and the maps hold exactly the 250 pods' entries
            counts = _entry_counts(sb.pin_prefix)
            assert counts["pods"] == 250 and counts["netns_src"] == 250
            cidrs, dns, ports = structs.pod_rules(cfg)
            assert counts["cidr_rules"] == 250 * (len(cidrs) + len(dns))
            assert counts["port_rules"] == 250 * len(ports) == 250
        finally:
            svc.cleanup()


WORKER = textwrap.dedent("""
    import json, sys
    from meshbpf.cli import main
    netns, cgroup, pod_id, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    node = ["--pin-prefix", sys.argv[5], "--cgroup-root", sys.argv[6]]
    for i in range(rounds):
        excl = f"10.{200 + i % 50}.0.0/16"
        main(["attach", "--netns", netns, "--cgroup", cgroup, "--id", pod_id, "--mode", "ebpf",
              "-x", excl, "--output", "json"] + node, standalone_mode=False)
        if i % 2:
            main(["detach", "--id", pod_id] + node, standalone_mode=False)
    print("done")
""")


def test_two_writers_on_one_prefix_leave_records_and_maps_consistent():
    """Two processes (the CLI and a stand-in agent) attach, re-configure and detach their
    own pods 100 times each, concurrently, on one pin prefix."""
    with Sandbox(name="race") as sb:
        pods = [sb.add_pod("a"), sb.add_pod("b")]
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            svc.attach(sb.add_pod("c").pod, InterceptConfig(), pod_id="anchor")   # loads the node
            procs = [subprocess.Popen(
                [sys.executable, "-c", WORKER, p.netns, p.cgroup, f"uid-{p.name}", "100",
                 sb.pin_prefix, sb.cgroup_root], cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True) for p in pods]
            for p in procs:
                out, err = p.communicate(timeout=900)
                assert p.returncode == 0 and out.strip().endswith("done"), err[-2000:]
            # both ended on a detach: only the anchor is left, in records and maps alike
            recs = svc.store.all()
            assert [r["id"] for r in recs] == ["anchor"]
            with Maps(sb.pin_prefix) as m:
                keys = {name: {bytes(k).hex() for k in m[name].keys()} for name in structs.ENTRY_MAPS}
            assert keys == {name: set(v) for name, v in recs[0]["keys"].items()}
            owners = json.load(open(os.path.join(svc.store.instance_dir, "indexes.json")))["owners"]
            assert owners == {str(recs[0]["pod_index"]): "anchor"}
        finally:
            svc.cleanup()




def test_reconfiguring_a_live_pod_never_lets_a_connection_bypass_or_fail():
    """Envoy counts every outbound connection it accepts: while the pod's rules switch back
    and forth between two configs that both capture the server, the app's connections and
    Envoy's count must match, with no error."""
    configs = [InterceptConfig(outbound_ip_ranges_include="10.233.0.0/16",
                               outbound_ip_ranges_exclude="10.233.200.0/24",
                               outbound_ports_exclude="9999"),
               InterceptConfig(outbound_ip_ranges_include="*",
                               outbound_ip_ranges_exclude="10.250.0.0/16,10.251.0.0/16",
                               outbound_ports_include="8080,9090")]
    with Sandbox(name="reconf") as sb:
        a, b = sb.add_pod("a"), sb.add_pod("b")
        b.start_http_server(8080)
        env = a.start_envoy()
        svc = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix, cgroup_root=sb.cgroup_root)
        try:
            svc.attach(a.pod, configs[0], pod_id="a")
            before = env.stats().get("tcp.outbound.downstream_cx_total", 0)
            result = {}
            t = threading.Thread(target=lambda: result.update(r=a.exec(
                [pod_python(), "-c", LOOP, b.ip4, "8080", "8"], uid=1000, timeout=60)))
            t.start()
            n = 0
            while t.is_alive():
                svc.update("a", configs[n % 2])
                n += 1
            t.join()
            r = result["r"]
            ok, fail = map(int, r.stdout.split())
            assert fail == 0, r.stderr[-2000:]
            assert n >= 20 and ok >= 50, (n, ok)
            after = env.stats().get("tcp.outbound.downstream_cx_total", 0)
            assert after - before == ok          # every one went through the sidecar
            # the rule generations switched: exactly one pod index is held
            owners = json.load(open(os.path.join(svc.store.instance_dir, "indexes.json")))["owners"]
            assert list(owners.values()) == ["a"]
        finally:
            svc.cleanup()
