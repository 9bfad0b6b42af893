"""The VM tier: Debian's 5.10, 6.1 and 6.12 kernels (and a Debian 11 userland on 5.10)
booted under QEMU, each running the kernel smoke tier inside (scripts/vm/guest-run.sh:
`meshbpf probe -o json`, then probe-vs-table, eBPF e2e with real Envoy sidecars (outbound
to the original destination, inbound from an unmeshed pod to Envoy's reuse_port listener),
splice, iptables e2e). One boot per guest; the guest's rc and junit are the result.

Marker `vm`: `make vm-test-local` runs these; `make test` runs them too, the guests booting
in the background (tests/vm/tier.py) while the host's tests run. They skip (with the
reason) only where QEMU cannot run; under MESHBPF_REQUIRE_KERNEL=1 that skip fails.
"""

import pytest

from meshbpf import vm

from . import tier

# A TCG guest runs the smoke tier in minutes, not seconds.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

SMOKE = ("check_guest_probe", "check_memlock",
         "test_outbound_goes_through_the_sidecar_to_the_original_destination",
         "test_inbound_from_a_non_meshed_pod",
         "test_envoy_reuseport_inbound_listener_through_sk_lookup",
         "test_splice_skips_tcp_for_app_to_sidecar_bytes",
         "test_interceptor_moves_traffic_through_envoy_and_detaches_cleanly")


def _result(name):
    res = tier.start().result(name)
    if "skip" in res:
        pytest.skip(res["skip"])
    print(f"\nvm {name}: {res['wall']:.0f}s wall ({res['accel']}), rc={res['rc']}, "
          f"mode={(res['probe'] or {}).get('mode')}, results in {res['dir']}")
    return res


@pytest.fixture(scope="module", params=tier.ORDER)
def guest_run(request):
    return _result(request.param)


def _explain(res):
    return (f"guest rc={res['rc']}, tests={res['tests']}\n--- guest log (tail) ---\n"
            + res["log"][-4000:] + f"\n(full results in {res['dir']})")


def test_guest_ran_the_whole_smoke_tier_and_passed(guest_run):
    res = guest_run
    assert res["rc"] is not None, "the guest never wrote its result\n" + _explain(res)
    ran = " ".join(res["tests"])
    for name in SMOKE:
        assert name in ran, f"{name} did not run\n" + _explain(res)
    bad = {k: v for k, v in res["tests"].items() if v not in ("passed", "xfailed")}
    assert bad == {}, _explain(res)
    assert res["rc"] == 0, _explain(res)


def test_probe_report_is_written_and_names_the_kernel(guest_run):
    probe = guest_run["probe"]
    assert probe is not None, _explain(guest_run)
    guest = vm.BY_NAME[guest_run["guest"]]
    assert probe["kernel"].startswith(guest.name.split("-")[0] + "."), probe["kernel"]
    assert probe["mode"] in ("ebpf", "iptables")


def test_a_failing_test_inside_the_guest_fails_the_run():
    # The shortest boot (no probe, one test that fails on purpose): the host must see it.
    res = _result(tier.FAIL)
    assert res["tests"] == {"tests.vm.guest.check_deliberate_failure::"
                            "test_fails_on_purpose_when_the_host_asks": "failed"}, _explain(res)
    assert res["rc"] not in (None, 0), _explain(res)
