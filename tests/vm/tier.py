"""The VM tier's boots, started once per pytest session: tests/conftest.py starts them as
soon as collection selects a `vm` test, so under `make test` the guests boot (at idle CPU
priority) while the host's own tests run, and tests/vm/test_vm_tier.py only waits."""

import os

from meshbpf import vm

# The deliberately failing boot: the shortest (no probe, one test that fails on purpose).
FAIL = "6.1-deliberate-failure"
FAIL_TEST = "tests/vm/guest/check_deliberate_failure.py"

# Longest first, so the two lanes finish together.
ORDER = ("5.10-debian11", "6.12", "5.10", "6.1")

_tier = None


def jobs():
    out = {name: {"guest": vm.BY_NAME[name]} for name in ORDER}
    out[FAIL] = {"guest": vm.BY_NAME["6.1"], "fail": True, "probe": False,
                 "extra_env": {"MESHBPF_VM_TESTS": FAIL_TEST}}
    return out


def selected(items):
    """The boots the selected test items need (names of jobs())."""
    names = set()
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec and "guest_run" in spec.params:
            names.add(spec.params["guest_run"])
        elif item.name == "test_a_failing_test_inside_the_guest_fails_the_run":
            names.add(FAIL)
    return names


def start(names=None):
    """The session's Tier, started on the first call with the boots `names` (default: all).
    MESHBPF_VM_LANES: guests booting at once (default 2)."""
    global _tier
    if _tier is None:
        lanes = int(os.environ.get("MESHBPF_VM_LANES", "2"))
        want = {k: v for k, v in jobs().items() if names is None or k in names}
        _tier = vm.Tier(want, vm.host_python(), lanes=max(lanes, 1))
    return _tier
