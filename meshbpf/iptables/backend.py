"""Running iptables-save / iptables-restore inside a pod's network namespace.

The only module of meshbpf.iptables that starts processes. It picks the iptables
variant the way Istio does (rules already present in legacy -> legacy, else nft when
usable, `force=` overrides), enters the pod's netns with `nsenter --net=` (never the
machine's own), waits for the xtables lock (`-w`), and can spell a payload the way the
kernel reads it back by applying it in a throwaway network namespace (`unshare --net`)
that vanishes with the process.

`group_file` (tests): resolve owner-group names against a private copy of /etc/group,
bind-mounted in a private mount namespace for the duration of one command.
"""

import functools
import os
import re
import shutil
import subprocess

from ..errors import ApplyError, NotFoundError, UnsupportedError, UsageError

VARIANTS = ("nft", "legacy")
LOCK_WAIT_SECONDS = "10"


def normalize_variant(name):
    """'nft'/'legacy', also accepting the binary spellings 'iptables-nft'/'iptables-legacy'."""
    if name is None:
        return None
    short = str(name).strip().lower()
    for prefix in ("ip6tables-", "iptables-"):
        if short.startswith(prefix):
            short = short[len(prefix):]
    if short not in VARIANTS:
        raise UsageError(f"iptables binary must be one of {', '.join(VARIANTS)}, got {name!r}")
    return short


def _binary(variant, family, suffix=""):
    base = "ip6tables" if int(family) == 6 else "iptables"
    return f"{base}-{variant}{suffix}" if variant else f"{base}{suffix}"


# iptables-restore learned -w (wait for the xtables lock) in 1.6.2; older ones (CentOS 7's
# 1.4.21) reject it, so there the restore runs without it.
RESTORE_WAIT_SINCE = (1, 6, 2)


def parse_version(text):
    """'iptables v1.8.9 (nf_tables)' -> ((1, 8, 9), "nft"); 'iptables v1.4.21' ->
    ((1, 4, 21), "legacy"); None if there is no version in `text`."""
    m = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    kind = "nft" if "nf_tables" in text else "legacy"
    return tuple(int(x or 0) for x in m.groups()), kind


def binaries(variant, family, which=None, version_of=None):
    """(save, restore) binaries of `variant`: the suffixed ones (iptables-legacy-save, ...)
    where installed, else the plain ones when they are that variant (iptables < 1.8, e.g.
    CentOS 7's 1.4.21, is legacy and has no suffixed names); None if neither."""
    which = which or shutil.which
    pair = tuple(_binary(variant, family, s) for s in ("-save", "-restore"))
    if all(which(b) for b in pair):
        return pair
    plain = tuple(_binary(None, family, s) for s in ("-save", "-restore"))
    if all(which(b) for b in plain) and which(_binary(None, family)):
        parsed = parse_version((version_of or _version_text)(_binary(None, family)))
        if parsed and parsed[1] == variant:
            return plain
    return None


def restore_argv(restore_bin, version, noflush=True):
    """The iptables-restore command line for iptables `version` (a tuple, or None when
    unknown: assumed recent)."""
    argv = [restore_bin]
    if version is None or version >= RESTORE_WAIT_SINCE:
        argv += ["-w", LOCK_WAIT_SECONDS]
    if noflush:
        argv.append("--noflush")
    return argv


@functools.lru_cache(maxsize=None)
def _version_text(binary):
    """`binary --version`'s output, asked once per process: every Backend (two per attach,
    one per family) would otherwise run it again on the rule-update path."""
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


class Backend:
    """One iptables variant ("nft" or "legacy") for one address family (4 or 6)."""

    def __init__(self, variant, family, group_file=None, timeout=60):
        variant = normalize_variant(variant)
        self.variant = variant
        self.family = int(family)
        self.group_file = group_file
        self.timeout = timeout
        found = binaries(variant, family)
        if found is None:
            missing = [b for b in (_binary(variant, family, s) for s in ("-save", "-restore"))
                       if not shutil.which(b)]
            raise UnsupportedError(f"{missing[0]} is not installed",
                                   hint="install the iptables package")
        self._save_bin, self._restore_bin = found
        self._version = False   # unknown until asked

    @property
    def version(self):
        """This iptables' version tuple (None if it does not say)."""
        if self._version is False:
            base = self._restore_bin[: -len("-restore")]
            parsed = parse_version(_version_text(base))
            self._version = parsed[0] if parsed else None
        return self._version

    @property
    def save_bin(self):
        return self._save_bin

    @property
    def restore_bin(self):
        return self._restore_bin

    def describe(self):
        return f"{self.restore_bin}"

    # ---- process plumbing ---------------------------------------------------------

    def _run(self, argv, netns=None, input=None):
        inner = list(argv)
        if netns:
            if not os.path.exists(netns):
                raise NotFoundError(f"network namespace {netns} does not exist")
            inner = ["nsenter", f"--net={netns}", "--"] + inner
        if self.group_file:
            # Private by hand, not `unshare --propagation private` (util-linux 2.27+; CentOS
            # 7 has 2.23, whose new namespace keeps systemd's shared propagation).
            inner = ["unshare", "--mount", "--", "sh", "-c",
                     'mount --make-rprivate / && mount --bind "$0" /etc/group && exec "$@"',
                     self.group_file] + inner
        try:
            return subprocess.run(inner, input=input, capture_output=True, text=True,
                                  timeout=self.timeout)
        except FileNotFoundError as e:
            raise UnsupportedError(f"{e.filename or inner[0]} is not installed")
        except subprocess.TimeoutExpired:
            raise ApplyError(f"`{' '.join(argv)}` did not finish within {self.timeout}s "
                             "(is the xtables lock held?)")

    # ---- operations ---------------------------------------------------------------

    def save(self, netns):
        """iptables-save of `netns` for this family and variant."""
        proc = self._run([self.save_bin], netns=netns)
        if proc.returncode != 0:
            raise ApplyError(f"{self.save_bin} failed in {netns}: {_err(proc)}")
        return proc.stdout

    def restore(self, netns, payload, noflush=True):
        """Apply `payload` in one iptables-restore run; returns (ok, error text)."""
        argv = restore_argv(self.restore_bin, self.version, noflush)
        proc = self._run(argv, netns=netns, input=payload)
        return proc.returncode == 0, _err(proc)

    def canonical(self, payload):
        """What iptables-save prints after `payload` is applied to an empty netns.

        Runs in a throwaway network namespace (unshare --net): nothing persists.
        """
        if not payload:
            return ""
        restore = " ".join(restore_argv('"$0"', self.version))
        script = restore + ' && exec "$1"'
        proc = self._run(["unshare", "--net", "--", "sh", "-c", script,
                          self.restore_bin, self.save_bin], input=payload)
        if proc.returncode != 0:
            raise UsageError(f"iptables rejected the generated rules: {_err(proc)}")
        return proc.stdout

    def delete_empty_tables(self, netns, tables):
        """nft only: delete `tables` (created by meshbpf) if they hold nothing any more.

        iptables-nft leaves an emptied table behind; deleting it makes iptables-save
        show exactly what it showed before meshbpf came. Legacy tables cannot be
        unloaded from a netns; there an empty table simply stays.
        """
        if self.variant != "nft" or not tables or not shutil.which("nft"):
            return []
        from .savefile import parse_save
        current = parse_save(self.save(netns))
        family = "ip6" if self.family == 6 else "ip"
        removed = []
        for table in tables:
            if table in current and current[table].is_empty():
                proc = self._run(["nft", "delete", "table", family, table], netns=netns)
                if proc.returncode == 0:
                    removed.append(table)
        return removed

    def has_rules(self, netns):
        """True if this variant holds any rule or user chain in `netns`."""
        try:
            text = self.save(netns)
        except ApplyError:
            return False
        for line in text.splitlines():
            if line.startswith("-A ") or (line.startswith(":") and line.split()[1:2] == ["-"]):
                return True
        return False


def _err(proc):
    text = (proc.stderr or proc.stdout or "").strip()
    return " ".join(text.split("\n")[:6]) or f"exit {proc.returncode}"


def usable(variant, family):
    return binaries(variant, family) is not None


def detect(netns, family, force=None, group_file=None):
    """The Backend to use in `netns`, chosen as Istio does.

    force="legacy"/"nft": that one or an error. Otherwise: legacy when it already holds
    rules in the netns, else nft when installed, else legacy.
    """
    if force:
        return Backend(force, family, group_file=group_file)
    if usable("legacy", family):
        legacy = Backend("legacy", family, group_file=group_file)
        if legacy.has_rules(netns):
            return legacy
    if usable("nft", family):
        return Backend("nft", family, group_file=group_file)
    if usable("legacy", family):
        return Backend("legacy", family, group_file=group_file)
    raise UnsupportedError(f"no {_binary(None, family)} (nft or legacy) is installed",
                           hint="install the iptables package")
