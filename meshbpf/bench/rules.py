"""The control-plane benchmark: what one pod, one policy entry and a full sync cost at scale.

For N existing entries (excluded CIDRs) it times, in a throwaway sandbox:
- iptables (nft and legacy, each in its own pod netns): `full-sync` = one iptables-restore
  of Istio's payload holding N exclusions; `add-entry` / `remove-entry` = one `iptables
  -w -t nat -I/-D ISTIO_OUTPUT` of an exclusion (inserted where Istio puts exclusions,
  before the final jump to ISTIO_REDIRECT); `enroll-pod` = Istio's default payload
  restored (--noflush) into a fresh pod netns;
- eBPF maps (pinned under the sandbox's pin prefix; the same map types the eBPF data path
  uses): `full-sync` = N LPM-trie updates; `add-entry` / `remove-entry` = one LPM update
  or delete; `enroll-pod` = one pod record plus its outbound LPM entry and inbound port
  entries.
And the data-plane cost of N entries: new connections per second from a client pod to a
server pod whose address is matched by the LAST of N exclusions, through Istio's rules
(linear) against a cgroup/connect4 program doing one LPM lookup in a trie of N entries.

Pure helpers (CIDR generation, key packing, the connect4 program's instructions) are
separate from `run_rules`, which does the side effects.
"""

import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time

from .. import bpfsys, system
from ..config import InterceptConfig
from ..errors import MeshbpfError, UsageError
from . import stats

DEFAULT_NS = (100, 1000, 5000, 20000)
QUICK_NS = (100, 20000)
BACKENDS = ("ebpf", "iptables-nft", "iptables-legacy")
OPS = ("enroll-pod", "add-entry", "remove-entry", "full-sync")
MAX_N = 1 << 20
_FILLER_NET = ipaddress.ip_network("100.64.0.0/10")      # N exclusions live here
_EXTRA_NET = ipaddress.ip_network("100.127.0.0/16")      # single added entries
CONN_PORT = 9000

# ---- pure: entries and keys -----------------------------------------------------------


def exclusion_cidrs(n, last=None):
    """N distinct /32 exclusions from 100.64.0.0/10; the last one is `last` if given."""
    if not 0 <= n <= MAX_N:
        raise UsageError(f"N={n} is out of range (0..{MAX_N})")
    base = int(_FILLER_NET.network_address) + 1
    out = [f"{ipaddress.IPv4Address(base + i)}/32" for i in range(n - (1 if last else 0))]
    if last and n:
        out.append(f"{last}/32" if "/" not in last else last)
    return out


def extra_cidr(k):
    """The k-th single entry added on top of the N (never one of them)."""
    return f"{ipaddress.IPv4Address(int(_EXTRA_NET.network_address) + 1 + k % 65000)}/32"


def parse_ns(text):
    """'100,1000,20k' -> [100, 1000, 20000] (sorted, unique)."""
    out = set()
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = 1000 if item.endswith("k") else 1
        try:
            n = int(float(item.rstrip("k")) * mult)
        except ValueError:
            raise UsageError(f"--n: {item!r} is not a number")
        if not 1 <= n <= MAX_N:
            raise UsageError(f"--n: {n} is out of range (1..{MAX_N})")
        out.add(n)
    if not out:
        raise UsageError("--n: give at least one N")
    return sorted(out)


def iptables_payload(cidrs, config=None):
    """Istio's nat payload (meshbpf.iptables.rules) with `cidrs` as outbound exclusions."""
    from ..iptables import rules
    cfg = (config or InterceptConfig())
    if cidrs:
        cfg = cfg.replace(outbound_ip_ranges_exclude=",".join(cidrs))
    return rules.render(cfg, 4)


def exclusion_position(payload):
    """1-based ISTIO_OUTPUT position where a new exclusion goes: before the final jump."""
    rules = [l for l in payload.splitlines() if l.startswith("-A ISTIO_OUTPUT ")]
    if not rules:
        raise MeshbpfError("payload has no ISTIO_OUTPUT chain")
    if rules[-1].endswith("-j ISTIO_REDIRECT"):
        return len(rules)
    return len(rules) + 1


def lpm_key(pod_index, cidr):
    """LPM key {u32 prefixlen, u32 pod_index, u8 ip[16]} (IPv4 as v4-mapped, IPv6 in the
    scope's IPv6 half), as in meshbpf.h."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 4:
        ip16 = b"\x00" * 10 + b"\xff\xff" + net.network_address.packed
        plen = 96 + net.prefixlen
    else:
        ip16, plen = net.network_address.packed, net.prefixlen
        pod_index |= 0x40000000              # MB_IPV6_SCOPE
    return struct.pack("<II", 32 + plen, pod_index) + ip16


def port_key(pod_index, port):
    """Port policy key {u32 pod_index, u16 port (network order), u16 pad}."""
    return struct.pack("<I", pod_index) + struct.pack("!H", port) + b"\x00\x00"


def pod_value(config, pod_index, size=64):
    """A pod record of `size` bytes: ports, uids/gids and the LPM index (bench stand-in)."""
    uids = (config.proxy_uids() + [0] * 4)[:4]
    gids = (config.proxy_gids() + [0] * 4)[:4]
    raw = struct.pack("<HHII4I4I", config.proxy_port, config.inbound_capture_port,
                      pod_index, 1, *uids, *gids)
    return raw + b"\x00" * (size - len(raw))


def enroll_entries(config, pod_index, cookie, pod_ip="10.233.255.1"):
    """What enrolling one pod writes: {"pods": [(k, v)], "lpm": [(k, v)], "ports": [(k, v)],
    "local_ips": [(k, v)]}, all bytes.

    Uses the eBPF data path's own packing (meshbpf.ebpf.structs: the pod_config struct,
    Istio's include/exclude resolution, the pod's address excluded) when it is present,
    else the same-shaped stand-in above.
    """
    try:
        from ..ebpf import structs as S
    except ImportError:
        S = None
    if S is not None:
        lpm = [(bytes(S.cidr_key(pod_index, net)), S.u32_bytes(rule))
               for net, rule in S.cidr_rules(config, extra_excludes=[pod_ip])]
        ports = [(bytes(S.port_key(pod_index, p)), S.u32_bytes(rule))
                 for p, rule in S.port_rules(config)]
        return {"pods": [(S.u64_bytes(cookie), bytes(S.pod_struct(config, pod_index)))],
                "lpm": lpm, "ports": ports,
                "local_ips": [(bytes(S.ip_key(pod_ip)), S.u32_bytes(1))]}
    inc, _ = config.outbound_cidrs()
    nets = ["0.0.0.0/0"] if inc == "*" else [str(c) for c in inc]
    one = struct.pack("<I", 1)
    ip16 = b"\x00" * 10 + b"\xff\xff" + ipaddress.ip_address(pod_ip).packed
    return {"pods": [(struct.pack("<Q", cookie), pod_value(config, pod_index))],
            "lpm": [(lpm_key(pod_index, n), one) for n in nets + [f"{pod_ip}/32"]],
            "ports": [(port_key(pod_index, p), one) for p in config.inbound_excluded_always()],
            "local_ips": [(ip16, one)]}


def connect4_lpm_program(map_fd):
    """cgroup/connect4 instructions: one LPM lookup of the destination (pod index 0), allow.

    The data-plane part of the eBPF path that depends on N: the key is built on the stack
    exactly like lpm_key(0, "<dst>/32").
    """
    i = bpfsys.insn
    return [
        bpfsys.mov64_reg(6, 1),
        i(0x61, dst=2, src=6, off=4),                    # r2 = ctx->user_ip4
        i(0x62, dst=10, off=-24, imm=32 + 128),          # key.prefixlen
        i(0x62, dst=10, off=-20, imm=0),                 # key.pod_index
        i(0x62, dst=10, off=-16, imm=0),                 # ::ffff:a.b.c.d
        i(0x62, dst=10, off=-12, imm=0),
        i(0x62, dst=10, off=-8, imm=-65536),             # bytes 00 00 ff ff
        i(0x63, dst=10, src=2, off=-4),                  # the IPv4 address
        bpfsys.ld_map_fd(1, map_fd),
        bpfsys.mov64_reg(2, 10),
        i(0x07, dst=2, imm=-24),                         # r2 = &key
        bpfsys.call(bpfsys.BPF_FUNC_map_lookup_elem),
        bpfsys.mov64_imm(0, 1),                          # allow the connect
        bpfsys.exit(),
    ]


# ---- side effects: timing helpers -----------------------------------------------------

def _run_timed(cmd, netns, input=None):
    """Run `cmd` inside `netns` (this thread enters it; the child inherits); returns seconds."""
    with system.in_netns(netns):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=300)
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise MeshbpfError(f"`{' '.join(cmd[:4])} ...` failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[:300]}")
    return dt


def _binaries(backend):
    kind = backend.split("-", 1)[1]        # nft | legacy
    return f"iptables-{kind}", f"iptables-{kind}-restore"


class _Maps:
    """The eBPF side: pinned pods hash, outbound LPM trie and port hash under a prefix."""

    def __init__(self, pin_dir, max_lpm):
        self.pin_dir = pin_dir
        os.makedirs(pin_dir, exist_ok=True)
        self.fds, self.pins = {}, []
        sample = enroll_entries(InterceptConfig(), 1, 1)
        pod_vs = len(sample["pods"][0][1])
        try:
            self.fds["pods"] = self._make("pods", bpfsys.BPF_MAP_TYPE_HASH, 8, pod_vs, 4096)
            self.fds["ports"] = self._make("ports", bpfsys.BPF_MAP_TYPE_HASH, 8, 4, 65536)
            self.fds["local_ips"] = self._make("local_ips", bpfsys.BPF_MAP_TYPE_HASH, 16, 4, 65536)
            self.fds["lpm"] = self._make("lpm", bpfsys.BPF_MAP_TYPE_LPM_TRIE, 24, 4,
                                         max_lpm, bpfsys.BPF_F_NO_PREALLOC)
        except BaseException:
            self.close()
            raise

    def _make(self, name, mtype, ks, vs, maxe, flags=0):
        fd = bpfsys.map_create(mtype, ks, vs, maxe, flags, name=f"bench_{name}")
        path = os.path.join(self.pin_dir, f"bench_{name}")
        bpfsys.obj_pin(fd, path)
        self.pins.append(path)
        return fd

    def new_lpm(self, max_lpm):
        """Replace the LPM trie with an empty one (untimed)."""
        os.close(self.fds.pop("lpm"))
        path = os.path.join(self.pin_dir, "bench_lpm")
        os.unlink(path)
        self.pins.remove(path)
        self.fds["lpm"] = self._make("lpm", bpfsys.BPF_MAP_TYPE_LPM_TRIE, 24, 4, max_lpm,
                                     bpfsys.BPF_F_NO_PREALLOC)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        for p in self.pins:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.pins = []
        try:
            os.rmdir(self.pin_dir)
        except OSError:
            pass


_VAL = struct.pack("<I", 1)


def _fill_lpm(fd, keys):
    """Write every key (value 1) as an agent doing a full sync would: one bpf(2) call per
    entry, with the keys packed once in one buffer and one attr reused. Returns seconds."""
    import ctypes
    if not keys:
        return 0.0
    ks = len(keys[0])
    buf = ctypes.create_string_buffer(b"".join(keys), ks * len(keys))
    val = ctypes.create_string_buffer(_VAL, len(_VAL))
    attr = bpfsys._MapElemAttr(map_fd=fd, key=0, value=ctypes.addressof(val), flags=bpfsys.BPF_ANY)
    base = ctypes.addressof(buf)
    call = bpfsys._libc.syscall
    nr = ctypes.c_long(bpfsys.syscall_nr())
    cmd = ctypes.c_int(bpfsys.BPF_MAP_UPDATE_ELEM)
    ref, size = ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    t0 = time.perf_counter()
    for i in range(len(keys)):
        attr.key = base + i * ks
        if call(nr, cmd, ref, size) < 0:
            raise MeshbpfError(f"writing LPM entry {i + 1} of {len(keys)} failed: "
                               f"{os.strerror(ctypes.get_errno())}")
    dt = time.perf_counter() - t0
    return dt


def _bench_ebpf(maps, n, reps, sync_reps, progress):
    out = []
    keys = [lpm_key(0, c) for c in exclusion_cidrs(n)]
    syncs = []
    for _ in range(sync_reps):
        maps.new_lpm(n + 4096)
        syncs.append(_fill_lpm(maps.fds["lpm"], keys))
    out.append({"backend": "ebpf", "op": "full-sync", "n": n, "seconds": syncs})
    lpm = maps.fds["lpm"]
    adds, removes = [], []
    for k in range(reps):
        key = lpm_key(0, extra_cidr(k))
        t0 = time.perf_counter()
        bpfsys.map_update_elem(lpm, key, _VAL, bpfsys.BPF_NOEXIST)
        t1 = time.perf_counter()
        bpfsys.map_delete_elem(lpm, key)
        t2 = time.perf_counter()
        adds.append(t1 - t0)
        removes.append(t2 - t1)
    out.append({"backend": "ebpf", "op": "add-entry", "n": n, "seconds": adds})
    out.append({"backend": "ebpf", "op": "remove-entry", "n": n, "seconds": removes})
    cfg = InterceptConfig()
    enrolls = []
    for k in range(reps):
        entries = enroll_entries(cfg, 1 + k, 0x1000 + k, pod_ip=f"10.234.{k // 250}.{1 + k % 250}")
        t0 = time.perf_counter()
        for name, kvs in entries.items():
            fd = maps.fds[name]
            for key, val in kvs:
                bpfsys.map_update_elem(fd, key, val)
        enrolls.append(time.perf_counter() - t0)
        for name, kvs in entries.items():
            for key, _ in kvs:
                bpfsys.map_delete_elem(maps.fds[name], key)
    out.append({"backend": "ebpf", "op": "enroll-pod", "n": n, "seconds": enrolls})
    progress(f"rules: ebpf N={n}: add {stats.median(adds) * 1e6:.1f}us, "
             f"full sync {stats.median(syncs) * 1e3:.1f}ms")
    return out


def _bench_iptables(sb, backend, pod, n, reps, sync_reps, progress):
    ipt, restore = _binaries(backend)
    payload = iptables_payload(exclusion_cidrs(n))
    syncs = [_run_timed([restore, "-w"], pod.netns, input=payload) for _ in range(sync_reps)]
    pos = exclusion_position(payload)
    adds, removes = [], []
    for k in range(reps):
        cidr = extra_cidr(k)
        adds.append(_run_timed([ipt, "-w", "-t", "nat", "-I", "ISTIO_OUTPUT", str(pos),
                                "-d", cidr, "-j", "RETURN"], pod.netns))
        removes.append(_run_timed([ipt, "-w", "-t", "nat", "-D", "ISTIO_OUTPUT",
                                   "-d", cidr, "-j", "RETURN"], pod.netns))
    enroll_payload = iptables_payload([])
    enrolls = []
    for k in range(reps):
        name = f"en{backend[9:12]}{k}"
        p = sb.add_pod(name)
        try:
            enrolls.append(_run_timed([restore, "-w", "--noflush"], p.netns, input=enroll_payload))
        finally:
            sb.remove_pod(name)
    progress(f"rules: {backend} N={n}: add {stats.median(adds) * 1e3:.2f}ms, "
             f"remove {stats.median(removes) * 1e3:.2f}ms, full sync {stats.median(syncs) * 1e3:.1f}ms")
    return [{"backend": backend, "op": "full-sync", "n": n, "seconds": syncs},
            {"backend": backend, "op": "add-entry", "n": n, "seconds": adds},
            {"backend": backend, "op": "remove-entry", "n": n, "seconds": removes},
            {"backend": backend, "op": "enroll-pod", "n": n, "seconds": enrolls}]


# ---- data plane: connection rate through N entries --------------------------------------

# Answers "y" to any request, then closes first (so TIME_WAITs stay on the server side).
# Dual-stack: IPv4 clients arrive v4-mapped.
CONN_SERVER = r"""
import socket, sys
l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind(("::", int(sys.argv[1])))
l.listen(4096)
while True:
    c, _ = l.accept()
    try:
        if c.recv(64):
            c.sendall(b"y")
    except OSError:
        pass
    c.close()
"""

_CONN_CLIENT = r"""
import socket, sys, time
host, port, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = errors = 0
first = ""
t0 = time.perf_counter()
end = t0 + dur
while time.perf_counter() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect((host, port))
        s.sendall(b"x")
        if s.recv(1) == b"y":
            n += 1
        else:
            errors += 1
            first = first or f"connection {n + errors}: closed without a reply"
    except OSError as e:
        errors += 1
        first = first or f"connection {n + errors}: {e!r}"
    finally:
        s.close()
el = time.perf_counter() - t0
print(f"conns={n} errors={errors} seconds={el:.6f} conn_per_s={n / el:.3f}")
if first:
    print(f"first error: {first}")
"""


def measure_conn_rate(client, host, port, seconds):
    """Connect-request-close loop run in pod `client` (its netns and cgroup).

    Returns (connections per second, error or None). Failed connections (2 s timeout
    each) count against the rate and are reported; none succeeding raises MeshbpfError.
    """
    from .parse import parse_count_line
    r = client.exec([sys.executable, "-c", _CONN_CLIENT, host, str(port), str(seconds)],
                    timeout=seconds + 60)
    if r.returncode != 0:
        raise MeshbpfError(f"connection client failed: {(r.stderr or r.stdout).strip()[-300:]}")
    rate, errors = parse_count_line(r.stdout, "conn_per_s"), parse_count_line(r.stdout, "errors")
    if rate <= 0:
        raise MeshbpfError(f"no connection succeeded: {' '.join(r.stdout.split())}")
    err = None
    if errors:
        err = (f"{int(errors)} of {int(errors + parse_count_line(r.stdout, 'conns'))} "
               f"connections failed ({r.stdout.strip().splitlines()[-1]})")
    return rate, err


def start_conn_server(pod, port=CONN_PORT):
    proc = pod.spawn([sys.executable, "-c", CONN_SERVER, str(port)], label="connsrv")
    proc.wait_port(port, host="127.0.0.1", timeout=10)
    return proc


def _attach_lpm_prog(cgroup, map_fd):
    prog = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, connect4_lpm_program(map_fd),
                            expected_attach_type=bpfsys.BPF_CGROUP_INET4_CONNECT,
                            name="bench_c4_lpm")
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(cg, prog, bpfsys.BPF_CGROUP_INET4_CONNECT, bpfsys.BPF_F_ALLOW_MULTI)
    except BaseException:
        os.close(cg)
        os.close(prog)
        raise
    return cg, prog


def _detach_lpm_prog(cg, prog):
    try:
        bpfsys.prog_detach(cg, prog, bpfsys.BPF_CGROUP_INET4_CONNECT)
    finally:
        os.close(cg)
        os.close(prog)


class _EbpfExclusions:
    """N outbound exclusions on the client pod, the eBPF way.

    Preferably through the real EbpfInterceptor (its connect4 program and `cidr_rules`
    trie: the whole eBPF path, sockops included); if that is unavailable or fails, a
    connect4 program doing the same single LPM lookup (`impl` says which was used).
    """

    def __init__(self, sb, maps, client, progress):
        self.sb, self.maps, self.client, self.progress = sb, maps, client, progress
        self.icpt, self.impl, self.note, self.attached = None, "lpm-lookup", None, None
        try:
            from ..service import NodeService
            self.icpt = NodeService(mode="ebpf", pin_prefix=sb.pin_prefix,
                                        cgroup_root=sb.cgroup_root, splice=True)
            self.impl = "ebpf-interceptor"
        except Exception as e:  # noqa: BLE001 - no bcc, no module: use the stand-in
            self.note = f"eBPF interceptor unavailable ({e}); measured a connect4 LPM lookup"

    def install(self, cidrs):
        if self.icpt is not None:
            try:
                cfg = InterceptConfig().replace(outbound_ip_ranges_exclude=",".join(cidrs))
                self.icpt.attach(self.client.pod, cfg)
                self.attached = "icpt"
                return
            except Exception as e:  # noqa: BLE001 - fall back, and say so
                self.note = (f"eBPF interceptor attach failed ({e}); measured a connect4 "
                             f"LPM lookup instead")
                self.progress(f"rules: {self.note}")
                self.close()
                self.impl = "lpm-lookup"
        self.maps.new_lpm(len(cidrs) + 4096)
        _fill_lpm(self.maps.fds["lpm"], [lpm_key(0, c) for c in cidrs])
        self.attached = _attach_lpm_prog(self.client.cgroup, self.maps.fds["lpm"])

    def remove(self):
        att, self.attached = self.attached, None
        if att == "icpt":
            self.icpt.detach(self.client.pod)
        elif att:
            _detach_lpm_prog(*att)

    def close(self):
        if self.icpt is not None:
            icpt, self.icpt = self.icpt, None
            try:
                icpt.cleanup()
            except Exception as e:  # noqa: BLE001
                self.progress(f"rules: eBPF interceptor cleanup: {e}")


def _bench_dataplane(sb, maps, ns, backends, seconds, rounds, progress):
    client, server = sb.add_pod("dpc"), sb.add_pod("dps")
    client.exec(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"], check=True)
    server.exec(["sysctl", "-q", "-w", "net.core.somaxconn=4096"], check=False)
    start_conn_server(server)
    samples = {}
    errors = []
    base = []
    for _ in range(rounds):
        rate, err = measure_conn_rate(client, server.ip4, CONN_PORT, seconds)
        base.append(rate)
        if err:
            errors.append(f"data plane without rules: {err}")
    samples[("none", 0)] = {"backend": "none", "n": 0, "conn_per_s": base}
    ebpf = _EbpfExclusions(sb, maps, client, progress) if "ebpf" in backends else None
    try:
        _dataplane_loop(ns, backends, rounds, seconds, client, server, ebpf, samples, errors,
                        progress)
    finally:
        if ebpf is not None:
            ebpf.close()
    notes = [f"data plane: {ebpf.note}"] if ebpf is not None and ebpf.note else []
    return list(samples.values()), errors, notes


def _dataplane_loop(ns, backends, rounds, seconds, client, server, ebpf, samples, errors,
                    progress):
    for n in ns:
        cidrs = exclusion_cidrs(n, last=server.ip4)
        payload = iptables_payload(cidrs)
        for _ in range(rounds):
            for backend in backends:
                rec = samples.setdefault((backend, n), {"backend": backend, "n": n, "conn_per_s": []})
                try:
                    if backend == "ebpf":
                        ebpf.install(cidrs)
                        rec["impl"] = ebpf.impl
                        try:
                            rate, err = measure_conn_rate(client, server.ip4, CONN_PORT, seconds)
                        finally:
                            ebpf.remove()
                    else:
                        ipt, restore = _binaries(backend)
                        _run_timed([restore, "-w"], client.netns, input=payload)
                        try:
                            rate, err = measure_conn_rate(client, server.ip4, CONN_PORT, seconds)
                        finally:
                            _run_timed([restore, "-w"], client.netns, input="*nat\nCOMMIT\n")
                    rec["conn_per_s"].append(rate)
                    if err:
                        rec["error"] = err
                        errors.append(f"data plane {backend} N={n}: {err}")
                except MeshbpfError as e:
                    rec["error"] = str(e)
                    errors.append(f"data plane {backend} N={n}: {e}")
            progress(f"rules: data plane N={n}: " + ", ".join(
                f"{b} {stats.median(samples[(b, n)]['conn_per_s']) or 0:.0f} conn/s" for b in backends))


# ---- the runner ------------------------------------------------------------------------

def available_backends():
    """Which rules backends this machine can run (iptables binaries present)."""
    out = ["ebpf"]
    for b in ("iptables-nft", "iptables-legacy"):
        if all(system.have(x) for x in _binaries(b)):
            out.append(b)
    return out


def run_rules(ns=DEFAULT_NS, backends=BACKENDS, quick=False, reps=None, dataplane=True,
              dataplane_seconds=None, rounds=None, progress=None):
    """Run the control-plane (and data-plane-cost) benchmark; returns the result dict."""
    progress = progress or (lambda msg: None)
    ns = sorted(set(int(n) for n in ns))
    if not ns:
        raise UsageError("give at least one N")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    have = available_backends()
    missing = [b for b in backends if b not in have]
    backends = [b for b in backends if b in have]
    reps = reps or (3 if quick else 7)
    sync_reps = 1 if quick else 3
    ebpf_reps = 50 if quick else 300
    rounds = rounds or (1 if quick else 3)
    dataplane_seconds = dataplane_seconds or (0.7 if quick else 2.0)
    from ..testbed import Sandbox
    t_start = time.monotonic()
    samples, errors, notes = [], [f"{b}: not installed" for b in missing], []
    dp_samples = []
    with Sandbox(name="benchrules") as sb:
        maps = None
        try:
            if "ebpf" in backends:
                maps = _Maps(os.path.join(sb.pin_prefix, "bench"), max(ns) + 4096)
            pods = {b: sb.add_pod(b.split("-")[1]) for b in backends if b != "ebpf"}
            for n in ns:
                for b in backends:
                    try:
                        if b == "ebpf":
                            samples += _bench_ebpf(maps, n, ebpf_reps, sync_reps, progress)
                        else:
                            samples += _bench_iptables(sb, b, pods[b], n, reps, sync_reps, progress)
                    except MeshbpfError as e:
                        errors.append(f"{b} N={n}: {e}")
                        progress(f"rules: {b} N={n} failed: {e}")
            for p in pods.values():
                sb.remove_pod(p.name)
            if dataplane:
                dp_samples, dp_errors, notes = _bench_dataplane(
                    sb, maps, ns, backends, dataplane_seconds, rounds, progress)
                errors += dp_errors
        finally:
            if maps:
                maps.close()
    results = stats.aggregate_rules(samples)
    from .report import rules_targets
    return {
        "kind": "rules", "quick": quick, "ns": ns, "backends": backends,
        "results": results,
        "dataplane": stats.aggregate_dataplane(dp_samples),
        "targets": rules_targets(results),
        "errors": errors, "notes": notes,
        "seconds": time.monotonic() - t_start,
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                 "hostname": socket.gethostname()},
    }
