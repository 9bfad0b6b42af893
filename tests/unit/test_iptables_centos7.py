"""CentOS 7's iptables 1.4.21: no iptables-legacy/-nft names, no nft, no -w for
iptables-restore. The fallback must pick the plain binaries and run restore without -w;
checked on the commands it would run (nothing is executed)."""

import subprocess

import pytest

from meshbpf.iptables import backend
from meshbpf.probe import prober

CENTOS7 = {"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
           "ip6tables-restore", "nsenter", "unshare"}
DEBIAN12 = CENTOS7 | {f"{b}-{v}{s}" for b in ("iptables", "ip6tables") for v in ("nft", "legacy")
                      for s in ("", "-save", "-restore")}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake machine: which binaries exist, what `iptables --version` says, and every
    command run is recorded (and succeeds)."""
    ran = []

    def setup(binaries, version):
        monkeypatch.setattr(backend.shutil, "which", lambda b: f"/sbin/{b}" if b in binaries else None)
        monkeypatch.setattr(backend, "_version_text", lambda b: version if b in binaries else "")

        def run(argv, **kw):
            ran.append(list(argv))
            return subprocess.CompletedProcess(argv, 0, "", "")
        monkeypatch.setattr(backend.subprocess, "run", run)
        netns = tmp_path / "netns"
        netns.write_text("")
        return str(netns), ran
    return setup


def test_centos7_uses_plain_legacy_binaries_and_restores_without_wait(machine):
    netns, ran = machine(CENTOS7, "iptables v1.4.21\n")
    be = backend.detect(netns, 4)
    assert (be.variant, be.save_bin, be.restore_bin) == ("legacy", "iptables-save", "iptables-restore")
    assert be.version == (1, 4, 21)
    ok, _ = be.restore(netns, "*nat\nCOMMIT\n")
    assert ok
    assert ran[-1] == ["nsenter", f"--net={netns}", "--", "iptables-restore", "--noflush"]
    assert all("-w" not in argv for argv in ran)
    be6 = backend.detect(netns, 6)
    assert be6.restore_bin == "ip6tables-restore"
    be6.restore(netns, "*nat\nCOMMIT\n", noflush=False)
    assert ran[-1] == ["nsenter", f"--net={netns}", "--", "ip6tables-restore"]


def test_centos7_has_no_nft_backend(machine):
    netns, _ = machine(CENTOS7, "iptables v1.4.21\n")
    assert not backend.usable("nft", 4)
    with pytest.raises(Exception, match="iptables-nft-save is not installed"):
        backend.Backend("nft", 4)


def test_centos7_canonical_spelling_runs_restore_without_wait(machine):
    _, ran = machine(CENTOS7, "iptables v1.4.21\n")
    backend.Backend("legacy", 4).canonical("*nat\nCOMMIT\n")
    script = ran[-1][ran[-1].index("-c") + 1]
    assert script == '"$0" --noflush && exec "$1"'
    assert ran[-1][-2:] == ["iptables-restore", "iptables-save"]


def test_a_recent_iptables_keeps_waiting_for_the_lock(machine):
    netns, ran = machine(DEBIAN12, "iptables v1.8.9 (nf_tables)\n")
    be = backend.detect(netns, 4)
    assert be.restore_bin == "iptables-nft-restore"
    be.restore(netns, "*nat\nCOMMIT\n")
    assert ran[-1][-4:] == ["iptables-nft-restore", "-w", "10", "--noflush"]


def test_plain_binaries_that_are_nft_are_not_taken_for_legacy(machine):
    netns, _ = machine(CENTOS7, "iptables v1.8.4 (nf_tables)\n")
    assert backend.binaries("legacy", 4) is None
    assert backend.binaries("nft", 4) == ("iptables-save", "iptables-restore")


@pytest.mark.parametrize("text,want", [("iptables v1.4.21", ((1, 4, 21), "legacy")),
                                       ("iptables v1.8.7 (legacy)", ((1, 8, 7), "legacy")),
                                       ("iptables v1.8.9 (nf_tables)", ((1, 8, 9), "nft")),
                                       ("", None)])
def test_parse_version(text, want):
    assert backend.parse_version(text) == want


@pytest.mark.parametrize("version,want", [((1, 4, 21), ["r", "--noflush"]),
                                          ((1, 6, 1), ["r", "--noflush"]),
                                          ((1, 6, 2), ["r", "-w", "10", "--noflush"]),
                                          (None, ["r", "-w", "10", "--noflush"])])
def test_restore_argv_by_version(version, want):
    assert backend.restore_argv("r", version) == want


def test_probe_checks_centos7s_plain_iptables_as_the_legacy_backend(machine):
    machine(CENTOS7, "iptables v1.4.21\n")
    assert prober._iptables_binary("legacy") == "iptables"
    assert prober._iptables_binary("nft") == "iptables-nft"


def test_private_group_file_needs_no_unshare_propagation_option(machine, tmp_path):
    """CentOS 7's util-linux 2.23 has no `unshare --propagation` (2.27+), and there a new
    mount namespace keeps systemd's shared propagation: the bind mount of the test's
    /etc/group would reach the machine's. The mount is made private inside, before it."""
    netns, ran = machine(CENTOS7, "iptables v1.4.21\n")
    group = tmp_path / "group"
    group.write_text("root:x:0:\njava:x:1001:\n")
    backend.Backend("legacy", 4, group_file=str(group)).save(netns)
    argv = ran[-1]
    assert argv[:3] == ["unshare", "--mount", "--"] and "--propagation" not in argv
    script = argv[argv.index("-c") + 1]
    assert script.index("mount --make-rprivate /") < script.index("mount --bind")
    assert argv[argv.index("-c") + 2] == str(group)
    assert argv[-4:] == ["nsenter", f"--net={netns}", "--", "iptables-save"]


def test_iptables_version_is_asked_once_per_binary_not_per_backend(monkeypatch):
    # Every attach makes a Backend per family: `--version` must not ride the update path.
    calls = []

    def run(argv, **kw):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "iptables v1.8.9 (legacy)\n", "")
    monkeypatch.setattr(backend.shutil, "which", lambda b: f"/sbin/{b}" if b in DEBIAN12 else None)
    monkeypatch.setattr(backend.subprocess, "run", run)
    backend._version_text.cache_clear()
    try:
        versions = [backend.Backend("legacy", 4).version for _ in range(3)]
    finally:
        backend._version_text.cache_clear()
    assert versions == [(1, 8, 9)] * 3
    assert calls == [["iptables-legacy", "--version"]]
