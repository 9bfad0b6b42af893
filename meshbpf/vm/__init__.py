"""The local VM tier: boot Debian's kernels under QEMU and run the kernel smoke tier inside.

Layout (see docs in tests/vm/README.md):
- scripts/vm/fetch-kernel.sh SUITE: a Debian kernel + modules + headers, fetched with a
  private apt configuration and unpacked under the cache (/var/cache/meshbpf-vm).
- `build_initramfs`: busybox-static, the guest kernel's own 9p/virtio modules and
  scripts/vm/initramfs-init (mounts the root read-only over 9p, tmpfs for /tmp /run /var,
  the kernel tree at /mnt/kernel, the repo at /mnt/repo, the results dir at /mnt/results,
  then hands over to scripts/vm/guest-init.sh, which runs scripts/vm/guest-run.sh: the
  same script the vagrant/ VMs run).
- `run_guest`: one QEMU boot (KVM when /dev/kvm works, TCG otherwise) at idle CPU priority
  (SCHED_IDLE: whatever else runs keeps the CPU); the guest writes rc, probe.json,
  junit.xml and log.txt to the results dir.
- `Tier`: boots a set of guests in the background, `lanes` at a time, so that `make test`
  boots them while the host's own tests run (tests/conftest.py starts it at collection).

Pure parts (`module_closure`, `qemu_argv`, `read_results`, `cpio_newc`) are unit-tested.
"""

import concurrent.futures
import dataclasses
import json
import lzma
import os
import shutil
import stat
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("MESHBPF_VM_CACHE", "/var/cache/meshbpf-vm")
FETCH = os.path.join(REPO, "scripts", "vm", "fetch-kernel.sh")
INIT = os.path.join(REPO, "scripts", "vm", "initramfs-init")
BUSYBOX = "/bin/busybox"

# Modules the initramfs needs to mount 9p over virtio (built in on some kernels).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")


@dataclasses.dataclass(frozen=True)
class Guest:
    name: str            # pytest id and results dir name
    suite: str           # Debian suite the kernel comes from
    root: str = "/"      # the guest's root file system (host path, shared read-only)
    python: str = None   # the guest's Python (default: this one, in the shared root)
    userland: str = "host"


GUESTS = (
    Guest("5.10", "bullseye"),
    Guest("6.1", "bookworm"),
    Guest("6.12", "bookworm-backports"),
    Guest("5.10-debian11", "bullseye", root=os.path.join(CACHE, "debian11-root"),
          python="/usr/bin/python3", userland="debian11"),
)
BY_NAME = {g.name: g for g in GUESTS}


# ---- pure ---------------------------------------------------------------------------

def parse_modules_dep(text):
    """modules.dep text -> {module name: (path, [dependency paths])}."""
    out = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[module_name(path)] = (path.strip(), deps.split())
    return out


def module_name(path):
    base = os.path.basename(path.strip())
    for ext in (".xz", ".zst", ".gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base[:-3].replace("-", "_") if base.endswith(".ko") else base


def module_closure(dep_text, wanted, builtin_text=""):
    """Module paths to insmod, dependencies first, for `wanted` names; modules built into the
    kernel (modules.builtin) are skipped. Raises KeyError for a module that is neither."""
    deps = parse_modules_dep(dep_text)
    builtin = {module_name(l) for l in builtin_text.split()}
    by_path = {p: n for n, (p, _) in deps.items()}
    order = []

    def visit(name):
        if name in builtin:
            return
        path, ds = deps[name]
        for d in reversed(ds):           # modules.dep lists dependencies deepest last
            visit(by_path.get(d, module_name(d)))
        if path not in order:
            order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


_KVM = {}


def kvm_usable(kernel_image, dev="/dev/kvm", timeout=10):
    """Does KVM really run a guest here? /dev/kvm opening is not enough (nested setups
    hang or fail on MSRs): boot `kernel_image` without a root, which must reach its panic
    (and, with -no-reboot, exit) within `timeout` seconds. Cached per process;
    MESHBPF_VM_ACCEL=kvm|tcg decides without trying."""
    forced = os.environ.get("MESHBPF_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    if kernel_image in _KVM:
        return _KVM[kernel_image]
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError:
        _KVM[kernel_image] = False
        return False
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel_image, "-append", "console=ttyS0 panic=-1"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout)
        ok = proc.returncode == 0 and b"Kernel panic" in proc.stdout
    except subprocess.TimeoutExpired:
        ok = False
    _KVM[kernel_image] = ok
    return ok


def qemu_argv(kernel_image, initrd, shares, append, kvm, memory_mb=2048, cpus=2,
              console_log=None):
    """The QEMU command line: shares is [(tag, host path, readonly)]."""
    argv = ["qemu-system-x86_64", "-machine", "q35", "-m", str(memory_mb), "-smp", str(cpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
            "-kernel", kernel_image, "-initrd", initrd, "-append", append, "-nic", "none"]
    argv += ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
    argv += ["-serial", f"file:{console_log}" if console_log else "stdio"]
    for i, (tag, path, ro) in enumerate(shares):
        fs = f"local,id=fs{i},path={path},security_model=none,multidevs=remap"
        if ro:
            fs += ",readonly=on"
        argv += ["-fsdev", fs, "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
    return argv


def read_results(results_dir):
    """What the guest left: {"rc", "probe", "tests": {nodeid: outcome}, "log"}. rc is None
    when the guest never wrote it (crashed, timed out)."""
    out = {"rc": None, "probe": None, "tests": {}, "log": ""}
    p = os.path.join(results_dir, "rc")
    if os.path.exists(p):
        text = open(p).read().strip()
        out["rc"] = int(text) if text.lstrip("-").isdigit() else None
    p = os.path.join(results_dir, "probe.json")
    if os.path.exists(p):
        try:
            out["probe"] = json.load(open(p))
        except ValueError:
            out["probe"] = None
    p = os.path.join(results_dir, "junit.xml")
    if os.path.exists(p):
        for case in ET.parse(p).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            out["tests"][name] = outcome
    p = os.path.join(results_dir, "log.txt")
    if os.path.exists(p):
        out["log"] = open(p, errors="replace").read()
    return out


def cpio_newc(entries):
    """A newc cpio archive (bytes) from [(path, mode, data bytes or symlink target str)]."""
    out = bytearray()

    def add(name, mode, data, ino):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        out.extend(hdr.encode() + name_b)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (path, mode, data) in enumerate(entries, start=1):
        if isinstance(data, str):
            data = data.encode()
        add(path.lstrip("/"), mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


# ---- side effects -------------------------------------------------------------------

# Guests of one suite (5.10 and the Debian 11 userland) share its download and initramfs.
_PREP = {}
_PREP_LOCK = threading.Lock()


def _prep_lock(key):
    with _PREP_LOCK:
        return _PREP.setdefault(key, threading.Lock())


def fetch_kernel(suite):
    """The unpacked kernel tree for `suite` (downloads it the first time)."""
    with _prep_lock(suite):
        proc = subprocess.run(["nice", "-n", "10", FETCH, suite], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fetching the {suite} kernel failed: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


def _read_module(path):
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    return data


def build_initramfs(tree, out_path):
    """busybox + this kernel's 9p/virtio modules + scripts/vm/initramfs-init, as a cpio."""
    abi = open(os.path.join(tree, ".abi")).read().strip()
    mdir = os.path.join(tree, "lib", "modules", abi)
    dep = open(os.path.join(mdir, "modules.dep")).read()
    builtin = open(os.path.join(mdir, "modules.builtin")).read()
    mods = module_closure(dep, BOOT_MODULES, builtin)
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [(p, d, b"") for p in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries.append(("bin/busybox", x, open(BUSYBOX, "rb").read()))
    entries.append(("init", x, open(INIT, "rb").read()))
    names = []
    for m in mods:
        name = module_name(m) + ".ko"
        names.append(name)
        entries.append((f"modules/{name}", f, _read_module(os.path.join(mdir, m))))
    entries.append(("modules.order", f, "\n".join(names) + "\n"))
    # Written aside and renamed: a guest booting from the cache (another session's) never
    # reads a half-written archive.
    tmp = f"{out_path}.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(cpio_newc(entries))
    os.replace(tmp, out_path)
    return out_path


def qemu_unavailable_reason():
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (run `make setup`)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} is missing (busybox-static; run `make setup`)"
    if os.geteuid() != 0:
        return "the VM tier needs root (it shares / with the guest as root)"
    return None


def host_python():
    """The Python the guests run when they share this machine's root: this one (the venv,
    whose bcc and Envoy are in the shared root)."""
    import sys
    return sys.executable


def build_userland(guest):
    """Build the guest's own root tree (the Debian 11 userland) with scripts/vm."""
    script = os.path.join(REPO, "scripts", "vm", "debian11-root.sh")
    with _prep_lock(guest.userland):
        proc = subprocess.run(["nice", "-n", "10", script], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the {guest.userland} userland failed: "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


# QEMU at SCHED_IDLE: a guest takes only CPU nothing else wants, so the host's tests running
# next to it keep their timing (a TCG guest's own timeouts are scaled, guest-run.sh).
IDLE = ["chrt", "--idle", "0"]


def run_guest(guest, results_dir, python, fail=False, probe=True, timeout=None,
              extra_env=None):
    """Boot `guest` once and run scripts/vm/guest-run.sh inside; returns (read_results(),
    wall seconds, accel)."""
    tree = fetch_kernel(guest.suite)
    abi = open(os.path.join(tree, ".abi")).read().strip()
    os.makedirs(results_dir, exist_ok=True)
    work = os.path.join(CACHE, "initramfs")
    os.makedirs(work, exist_ok=True)
    with _prep_lock(guest.suite):
        initrd = build_initramfs(tree, os.path.join(work, f"{guest.suite}.cpio"))
    image = os.path.join(tree, "boot", f"vmlinuz-{abi}")
    kvm = kvm_usable(image)
    append = ["console=ttyS0", "panic=-1", "loglevel=4",
              f"meshbpf.python={guest.python or python}", f"meshbpf.userland={guest.userland}",
              f"meshbpf.guest={guest.name}"]
    if fail:
        append.append("meshbpf.fail=1")
    if not probe:
        append.append("meshbpf.probe=0")
    for k, v in (extra_env or {}).items():
        append.append(f"meshbpf.env.{k}={v}")
    shares = [("root", guest.root, True), ("kernel", tree, True), ("repo", REPO, True),
              ("results", results_dir, False)]
    console = os.path.join(results_dir, "console.txt")
    argv = IDLE + qemu_argv(image, initrd, shares, " ".join(append), kvm, console_log=console)
    timeout = timeout or (900 if kvm else 3600)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        qemu_out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out = proc.communicate()[0] + f"\nqemu killed after {timeout}s".encode()
    wall = time.monotonic() - t0
    with open(os.path.join(results_dir, "qemu.txt"), "wb") as fh:
        fh.write(qemu_out)
    return read_results(results_dir), wall, "kvm" if kvm else "tcg"


def guest_unavailable_reason(guest):
    """Why `guest` cannot boot here (None if it can); builds its own userland if it has one."""
    why = qemu_unavailable_reason()
    if why:
        return why
    if guest.root != "/" and not os.path.isdir(guest.root):
        try:
            build_userland(guest)
        except RuntimeError as e:
            return str(e)
    return None


class Tier:
    """Boot `jobs` ({name: run_guest keyword arguments, with "guest"}) in the background,
    `lanes` at a time, in the order given; `result(name)` waits for one. Each result is
    read_results() plus wall, accel, dir, guest, or {"skip": reason} where it cannot boot."""

    def __init__(self, jobs, python, lanes=2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=lanes,
                                                           thread_name_prefix="vm")
        self._futures = {name: self._pool.submit(self._run, name, dict(kw), python)
                         for name, kw in jobs.items()}
        self._pool.shutdown(wait=False)

    @staticmethod
    def _run(name, kw, python):
        guest = kw.pop("guest")
        why = guest_unavailable_reason(guest)
        if why:
            return {"skip": why}
        results = os.path.join(CACHE, "results", name)   # the last run's, kept to read
        shutil.rmtree(results, ignore_errors=True)
        res, wall, accel = run_guest(guest, results, python, **kw)
        res.update(wall=wall, accel=accel, dir=results, guest=guest.name)
        return res

    def result(self, name, timeout=None):
        return self._futures[name].result(timeout)
