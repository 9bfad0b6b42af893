"""Inbound steering tried for real, for the probe's tc_sk_assign* and sk_lookup_reuseport
features: a throwaway network namespace, meshbpf's own tc_inbound and mb_sk_lookup
programs, and listeners on its `lo`. Needs bcc; runs in a child (`unshare --net`), so the
namespace and everything loaded in it go with the child.
"""

import json
import os
import subprocess
import sys

from ..ebpf import loader

_PROBE = r"""
import json, os, socket, sys
from bcc import BPF
from pyroute2 import IPRoute
sys.path.insert(0, sys.argv[1])
from meshbpf import bpfsys
from meshbpf.ebpf import loader, structs
from meshbpf.ebpf.inbound import policy, tc
bpf_dir = sys.argv[2]
text = loader.c_text(["tc_inbound.c"], bpf_dir)
b = BPF(text=text.encode(), cflags=["-Wno-comment"])
fn = b.load_func(b"tc_inbound_ingress", BPF.SCHED_CLS)
with IPRoute() as ipr:
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    ipr.tc("add", "clsact", lo)
    tc.add_filter(ipr, lo, tc.TC_INGRESS_PARENT, fn.fd)
out = {}
for name, reuse in (("plain", False), ("reuseport", True)):
    srv = socket.socket()
    if reuse:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cap = srv.getsockname()[1]
    # 127.0.0.1 enrolled like a pod IP whose policy captures every port into `cap`.
    bpfsys.map_update_elem(b[b"inbound_pods"].map_fd, structs.inbound_pod_key("127.0.0.1"),
                           policy.pod_value(policy.InboundPolicy(cap, True)))
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 9))          # the discard port: nothing listens on it
        s, _ = srv.accept()
        out[name] = s.getsockname()[1] == 9
    except OSError:
        out[name] = False
    c.close()
    srv.close()
# The path for SO_REUSEPORT listeners that bpf_sk_assign refuses (Linux < 6.5): tc marks
# the SYN and mb_sk_lookup, linked in this netns, assigns the listener from
# capture_listeners. Forced (NODE_F_INBOUND_SK_LOOKUP) so it is tried on every kernel.
try:
    text2 = loader.c_text(["tc_inbound.c", "sk_lookup.c"], bpf_dir)
    b2 = BPF(text=text2.encode(), cflags=["-Wno-comment"])
    fn2 = b2.load_func(b"tc_inbound_ingress", BPF.SCHED_CLS)
    # through the loader, which sets the expected attach type even with bcc < 0.25
    skl_fd = loader._load_prog(b2, next(p for p in loader.PROGRAMS if p.name == "mb_sk_lookup"))
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY)
    link = bpfsys.link_create(skl_fd, nsfd, bpfsys.BPF_SK_LOOKUP)
    with IPRoute() as ipr:
        tc.add_filter(ipr, lo, tc.TC_INGRESS_PARENT, fn2.fd)
    from meshbpf import system as _system
    cookie = _system.netns_cookie()      # SO_NETNS_COOKIE, or through BPF before 5.14
    bpfsys.map_update_elem(b2[b"node_cfg"].map_fd, structs.u32_bytes(0),
                           bytes(structs.node_config(False, inbound_sk_lookup=True)))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cap = srv.getsockname()[1]
    key = structs.inbound_pod_key("127.0.0.1")
    bpfsys.map_update_elem(b2[b"inbound_pods"].map_fd, key, policy.pod_value(
        policy.InboundPolicy(cap, True), sk_lookup=True))
    bpfsys.map_update_elem(b2[b"inbound_netns"].map_fd, key, cookie.to_bytes(8, "little"))
    from bcc import libbcc                     # bcc's Python has no SOCKHASH type
    bpfsys.map_update_elem(libbcc.lib.bpf_table_fd(b2.module, b"capture_listeners"),
                           structs.capture_listener_key(cookie, cap, structs.MB_AF_INET),
                           structs.u32_bytes(srv.fileno()))
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 9))
        a, _ = srv.accept()
        # and it went that way, not through bpf_sk_assign (which 6.5+ would also manage)
        via = sum(b2[b"counters"][structs.COUNTERS.index("inbound_sk_lookup")])
        out["sk_lookup_reuseport"] = a.getsockname()[1] == 9 and via > 0
    except OSError:
        out["sk_lookup_reuseport"] = False
except Exception as e:  # noqa: BLE001 - no sk_lookup here: reported, not raised
    out["sk_lookup_reuseport"] = False
    out["sk_lookup_error"] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else repr(e)
print(json.dumps(out))
"""


TIMEOUT_ENV = "MESHBPF_PROBE_INBOUND_TIMEOUT"


def run(timeout=None):
    """Try inbound steering for real: the tc_inbound program on `lo` of a throwaway
    network namespace (`unshare --net`, gone with the child) hands a connection to port 9
    to a listener on another port, once plain and once with SO_REUSEPORT (what Envoy
    uses; bpf_sk_assign accepts those only since Linux 6.5).

    Then the path such listeners take where bpf_sk_assign refuses them (Linux < 6.5): tc
    leaves the SYN to mb_sk_lookup, linked in that netns, which assigns a SO_REUSEPORT
    listener ("sk_lookup_reuseport").

    Returns {"ok": bool, "reuseport": bool, "sk_lookup_reuseport": bool, "detail": str}.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Two bcc compiles: about a second here, minutes in an emulated (TCG) VM guest.
    timeout = timeout or float(os.environ.get(TIMEOUT_ENV) or 60)
    try:
        proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _PROBE, root,
                               loader.BPF_DIR],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                "detail": f"the probe did not finish within {timeout:g}s (${TIMEOUT_ENV} "
                          "raises it)"}
    except OSError as e:
        return {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                "detail": f"the probe could not run: {e}"}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {"ok": False, "reuseport": False, "sk_lookup_reuseport": False,
                "detail": "tc_inbound could not be loaded or attached: "
                          + (err[-1] if err else f"exit {proc.returncode}")}
    skl = bool(res.get("sk_lookup_reuseport"))
    skl_detail = ("sk_lookup handed a connection to a SO_REUSEPORT listener" if skl else
                  "sk_lookup did not hand a connection to a SO_REUSEPORT listener"
                  + (f" ({res['sk_lookup_error']})" if res.get("sk_lookup_error") else ""))
    if res.get("plain") and res.get("reuseport"):
        return {"ok": True, "reuseport": True, "sk_lookup_reuseport": skl,
                "detail": "bpf_sk_assign handed connections to plain and SO_REUSEPORT "
                          "listeners; " + skl_detail}
    if res.get("plain"):
        return {"ok": True, "reuseport": False, "sk_lookup_reuseport": skl,
                "detail": "bpf_sk_assign cannot use SO_REUSEPORT listeners (Linux < 6.5); "
                          + skl_detail + (": tc_inbound hands such connections to it" if skl
                                          else "")}
    return {"ok": False, "reuseport": False, "sk_lookup_reuseport": skl,
            "detail": "bpf_sk_assign did not hand a connection to the listener"}
