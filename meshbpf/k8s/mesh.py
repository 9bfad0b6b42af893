"""Which pods are meshed, by which mesh, and how: a Pod object in, a Meshing out.

`classify(pod)` reads a Pod as the API server returns it in JSON (camelCase keys) and
decides what the node's CNI plugin of the pod's mesh would have done with it:

- Istio: the checks and the redirect config of istio-cni's sidecar plugin
  (cni/pkg/plugin/plugin.go doAddRun, kubernetes.go getK8sPodInfo, sidecar_redirect.go
  NewRedirect, sidecar_iptables_linux.go Program), in the same order, with the same
  annotation defaults and validation, so the config rendered in iptables mode is the
  payload istio-cni applies (tests compare with Istio's own CNI goldens).
- Linkerd: linkerd-cni's cmdAdd (linkerd2-proxy-init cni-plugin/main.go) with the
  values linkerd2-cni's chart puts into the plugin config (inbound 4143, outbound 4140,
  proxy uid 2102, inbound ports 4190/4191 ignored).

A pod whose own init container installs the rules (istio-init, linkerd-init) is left
alone: both meshes' CNI plugins skip such pods, and rules installed twice would capture
twice. An annotation value the mesh's plugin rejects makes the pod not meshed, with a
reason naming the annotation (istio-cni fails the pod's ADD there; here nothing is half
applied either). Pure: no I/O, never raises on a malformed pod.
"""

import dataclasses
import ipaddress
import re

from .. import istio
from ..config import InterceptConfig
from ..errors import UsageError

ISTIO = "istio"
LINKERD = "linkerd"

# Container names both meshes' injectors use, and their CNI plugins look for.
ISTIO_PROXY = "istio-proxy"
ISTIO_INIT = "istio-init"
LINKERD_PROXY = "linkerd-proxy"
LINKERD_INIT = "linkerd-init"

# Istio's annotations (istio.io/api annotation names).
A_STATUS = "sidecar.istio.io/status"
A_INJECT = "sidecar.istio.io/inject"            # also a label, which wins
A_MODE = "sidecar.istio.io/interceptionMode"
A_INCLUDE_CIDRS = "traffic.sidecar.istio.io/includeOutboundIPRanges"
A_EXCLUDE_CIDRS = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
A_EXCLUDE_IN = "traffic.sidecar.istio.io/excludeInboundPorts"
A_INCLUDE_IN = "traffic.sidecar.istio.io/includeInboundPorts"
A_EXCLUDE_OUT = "traffic.sidecar.istio.io/excludeOutboundPorts"
A_INCLUDE_OUT = "traffic.sidecar.istio.io/includeOutboundPorts"
A_EXCLUDE_IFACES = "traffic.sidecar.istio.io/excludeInterfaces"
A_KUBEVIRT = "traffic.sidecar.istio.io/kubevirtInterfaces"     # deprecated
A_REROUTE = "istio.io/reroute-virtual-interfaces"
# The istio-proxy container's environment variables istio-cni reads.
ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
ENV_DUAL_STACK = "ISTIO_DUAL_STACK"
ENV_INVALID_DROP = "INVALID_DROP"
ENV_DISABLE_ENVOY = "DISABLE_ENVOY"

# Linkerd's annotations linkerd-cni reads.
L_SKIP_IN = "config.linkerd.io/skip-inbound-ports"
L_SKIP_OUT = "config.linkerd.io/skip-outbound-ports"
L_SKIP_SUBNETS = "config.linkerd.io/skip-subnets"
L_PROXY_UID = "config.linkerd.io/proxy-uid"
L_PROXY_GID = "config.linkerd.io/proxy-gid"
L_CONTROL_PLANE = "linkerd.io/control-plane-component"    # a label

# Linkerd's numbers, as linkerd2-cni's chart writes them into linkerd-cni's config.
LINKERD_INBOUND_PORT = 4143
LINKERD_OUTBOUND_PORT = 4140
LINKERD_PROXY_UID = 2102
LINKERD_ADMIN_PORT = 4191
LINKERD_CONTROL_PORT = 4190
# linkerd-cni skips the API server's ports outbound for control-plane pods; it reads them
# from the `kubernetes` Service and falls back to these when it cannot (a pure function
# cannot read the Service: the fallback is used).
LINKERD_API_SERVER_PORTS = ("443", "6443")


@dataclasses.dataclass(frozen=True)
class Meshing:
    """What to do with one pod. `config` is set exactly when `meshed`."""

    meshed: bool
    mesh: str = None                 # "istio" | "linkerd" | None
    config: InterceptConfig = dataclasses.field(default=None, hash=False)
    reason: str = ""                 # why not meshed / why left alone / how meshed
    left_alone: bool = False         # its own init container installs iptables rules


def pod_id(pod):
    """The pod's UID (metadata.uid), or None."""
    return _meta(pod).get("uid")


def pod_name(pod):
    """'namespace/name' (namespace 'default' when the object leaves it out)."""
    meta = _meta(pod)
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def classify(pod):
    """The Meshing of `pod` (a dict as the API returns it). Never raises on bad input."""
    if not isinstance(pod, dict):
        return Meshing(False, reason="not a Pod object (expected a JSON object)")
    try:
        return _classify(pod)
    except _Malformed as e:
        return Meshing(False, reason=f"malformed pod object: {e}")


# ---- detection ---------------------------------------------------------------------------

class _Malformed(Exception):
    pass


def _classify(pod):
    spec = _dict(pod.get("spec"), "spec")
    if spec.get("hostNetwork") is True:
        # The kubelet never runs CNI for these: intercepting them would rewrite the node's
        # own network namespace.
        return Meshing(False, reason="hostNetwork pod: shares the node's network, never intercepted")
    init = _containers(spec, "initContainers")
    main = _containers(spec, "containers")
    names = {c.get("name") for c in init + main}
    annotations = _str_map(_meta(pod).get("annotations"), "metadata.annotations")
    labels = _str_map(_meta(pod).get("labels"), "metadata.labels")

    is_istio = ISTIO_PROXY in names or A_STATUS in annotations or ISTIO_INIT in names
    # linkerd-cni looks for the proxy among containers and (native sidecar) init containers.
    is_linkerd = LINKERD_PROXY in names or LINKERD_INIT in {c.get("name") for c in init}
    if is_istio and is_linkerd:
        return Meshing(False, reason="has both Istio and Linkerd sidecar containers: not intercepted")
    if is_istio:
        return _istio(annotations, labels, init + main, names)
    if is_linkerd:
        return _linkerd(annotations, labels, init, main)
    return Meshing(False, reason="no sidecar (no istio-proxy or linkerd-proxy container)")


def _istio(annotations, labels, containers, names):
    """istio-cni doAddRun's checks, in its order, then NewRedirect."""
    if ISTIO_INIT in names:
        return Meshing(False, mesh=ISTIO, left_alone=True,
                       reason="istio-init container installs its own iptables rules: left alone")
    env, args, uid, gid = {}, [], None, None
    for c in containers:
        if c.get("name") != ISTIO_PROXY:
            continue
        for e in _list(c.get("env"), "istio-proxy env"):
            e = _dict(e, "istio-proxy env item")
            env[str(e.get("name"))] = str(e.get("value") or "")
        args = _list(c.get("args"), "istio-proxy args")
        sc = c.get("securityContext")
        if sc is not None:
            sc = _dict(sc, "istio-proxy securityContext")
            uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if _go_bool(env.get(ENV_DISABLE_ENVOY)) is True:
        return Meshing(False, mesh=ISTIO, reason=f"{ENV_DISABLE_ENVOY} is set on istio-proxy")
    if ISTIO_PROXY not in names:
        return Meshing(False, mesh=ISTIO, reason=f"{A_STATUS} but no istio-proxy container")
    if len(args) >= 2 and args[0] == "proxy" and args[1] != "sidecar":
        return Meshing(False, mesh=ISTIO, reason=f"istio-proxy runs as a {args[1]}, not a sidecar")
    inject = labels.get(A_INJECT, annotations.get(A_INJECT, ""))
    if inject and _go_bool(inject) is False:
        return Meshing(False, mesh=ISTIO, reason=f"{A_INJECT} is {inject!r}")
    if A_STATUS not in annotations:
        return Meshing(False, mesh=ISTIO, reason=f"istio-proxy container but no {A_STATUS} annotation")
    try:
        cfg = _istio_config(annotations, env, uid, gid)
    except _Invalid as e:
        return Meshing(False, mesh=ISTIO, reason=str(e))
    return Meshing(True, mesh=ISTIO, config=cfg, reason="Istio sidecar (istio-cni's redirect)")


class _Invalid(Exception):
    pass


def _istio_config(ann, env, uid, gid):
    """NewRedirect + Program: the InterceptConfig istio-cni would program."""
    def get(key, default, check):
        if key not in ann:
            return default
        value = ann[key]
        err = check(value)
        if err:
            raise _Invalid(f"annotation {key}={value!r} is invalid: {err}")
        return value

    mode = get(A_MODE, "REDIRECT", _check_mode)
    include_cidrs = get(A_INCLUDE_CIDRS, "*", _check_cidrs_wildcard)
    exclude_cidrs = get(A_EXCLUDE_CIDRS, "", _check_cidrs)
    status_port = str(istio.AGENT_PORT)
    exclude_in = get(A_EXCLUDE_IN, status_port, _check_ports_wildcard)
    include_in = get(A_INCLUDE_IN, "*", _check_ports_wildcard)
    exclude_out = get(A_EXCLUDE_OUT, status_port, _check_ports_wildcard)
    include_out = get(A_INCLUDE_OUT, "", _check_ports_wildcard)
    # The sidecar's own ports are appended to whatever the pod excludes inbound, then
    # duplicates dropped as written (istio-cni's dedupPorts compares the raw strings).
    exclude_in = exclude_in.strip()
    if exclude_in and not exclude_in.endswith(","):
        exclude_in += ","
    exclude_in += ",".join(map(str, istio.INBOUND_PORTS_EXCLUDE))
    exclude_in = ",".join(dict.fromkeys(exclude_in.split(",")))
    exclude_ifaces = get(A_EXCLUDE_IFACES, "", _check_ifaces)
    # reroute-virtual-interfaces wins over the deprecated kubevirtInterfaces.
    if A_REROUTE in ann:
        reroute = ann[A_REROUTE]
    else:
        reroute = ann.get(A_KUBEVIRT, "")
    dns = bool(_go_bool(env.get(ENV_DNS_CAPTURE)))
    fields = {
        "proxy_port": istio.OUTBOUND_PORT,
        "proxy_uid": _proxy_id(uid, istio.PROXY_UID, "runAsUser"),
        "proxy_gid": _proxy_id(gid, istio.PROXY_GID, "runAsGroup"),
        "inbound_interception_mode": mode,
        "outbound_ip_ranges_include": include_cidrs,
        "outbound_ip_ranges_exclude": exclude_cidrs,
        "inbound_ports_exclude": exclude_in,
        "inbound_ports_include": include_in,
        "exclude_interfaces": exclude_ifaces,
        "outbound_ports_exclude": exclude_out,
        "outbound_ports_include": include_out,
        "reroute_virtual_interfaces": reroute,
        "redirect_dns": dns,
        "capture_all_dns": dns,
        "drop_invalid": bool(_go_bool(env.get(ENV_INVALID_DROP))),
        "enable_ipv6": bool(_go_bool(env.get(ENV_DUAL_STACK))),
    }
    return _build(fields, _ISTIO_SOURCES)


# Where each config field came from, to name it when the config rejects a value.
_ISTIO_SOURCES = {
    "inbound_interception_mode": A_MODE,
    "outbound_ip_ranges_include": A_INCLUDE_CIDRS,
    "outbound_ip_ranges_exclude": A_EXCLUDE_CIDRS,
    "inbound_ports_exclude": A_EXCLUDE_IN,
    "inbound_ports_include": A_INCLUDE_IN,
    "exclude_interfaces": A_EXCLUDE_IFACES,
    "outbound_ports_exclude": A_EXCLUDE_OUT,
    "outbound_ports_include": A_INCLUDE_OUT,
    "reroute_virtual_interfaces": f"{A_REROUTE} / {A_KUBEVIRT}",
    "proxy_uid": "istio-proxy securityContext.runAsUser",
    "proxy_gid": "istio-proxy securityContext.runAsGroup",
}


def _proxy_id(value, default, what):
    """istio-cni: the container's runAsUser/runAsGroup unless unset or 0."""
    if value is None or value == 0:
        return str(default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"istio-proxy securityContext.{what}={value!r} is not a user/group id")
    return str(value)


def _build(fields, sources):
    try:
        return InterceptConfig.from_dict(fields)
    except UsageError as e:
        msg = str(e)
        field = msg.split(":", 1)[0]
        where = sources.get(field, field)
        raise _Invalid(f"{where}: {msg}")


# ---- Istio's validators (sidecar_redirect.go) ---------------------------------------------

def _check_mode(v):
    return None if v in ("REDIRECT", "TPROXY") else "interception mode must be REDIRECT or TPROXY"


def _check_cidrs(v):
    # netip.ParsePrefix on each comma item as written: a prefix length is required and
    # spaces are not trimmed.
    if not v:
        return None
    for item in v.split(","):
        if "/" not in item or item != item.strip():
            return f"{item!r} is not a CIDR"
        try:
            ipaddress.ip_interface(item)
        except ValueError:
            return f"{item!r} is not a CIDR"
    return None


def _check_cidrs_wildcard(v):
    return None if v == "*" else _check_cidrs(v)


def _check_ports(v):
    # parsePorts: the whole string trimmed, each item trimmed, base-10 uint16.
    v = v.strip()
    if not v:
        return None
    for item in v.split(","):
        item = item.strip()
        if not item.isascii() or not item.isdigit() or int(item) > 65535:
            return f"{item!r} is not a port number"
    return None


def _check_ports_wildcard(v):
    return None if v == "*" else _check_ports(v)


_IFACE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.\-]*$")


def _check_ifaces(v):
    # istio pkg/util/net ValidateInterfaceNames.
    if not v:
        return None
    for item in v.split(","):
        item = item.strip()
        if not item:
            return "empty interface name"
        if len(item) > 15:
            return f"interface name {item!r} too long (max 15 chars)"
        if not _IFACE.match(item):
            return f"interface name {item!r} contains invalid characters"
    return None


def _go_bool(v):
    """Go's strconv.ParseBool: True/False, or None when unset or unparsable."""
    if v in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if v in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


# ---- Linkerd -------------------------------------------------------------------------------

def _linkerd(annotations, labels, init, main):
    """linkerd-cni cmdAdd: skip pods with linkerd-init, else program linkerd-proxy's pod."""
    if LINKERD_INIT in {c.get("name") for c in init}:
        return Meshing(False, mesh=LINKERD, left_alone=True,
                       reason="linkerd-init container installs its own iptables rules: left alone")
    try:
        cfg = _linkerd_config(annotations, labels)
    except _Invalid as e:
        return Meshing(False, mesh=LINKERD, reason=str(e))
    return Meshing(True, mesh=LINKERD, config=cfg, reason="Linkerd proxy (linkerd-cni's redirect)")


def _linkerd_config(ann, labels):
    # An annotation replaces the plugin's default list (it is not added to it), as
    # linkerd-cni's getAnnotationOverride does; an empty value counts as unset.
    inbound = [str(LINKERD_ADMIN_PORT), str(LINKERD_CONTROL_PORT)]
    outbound = []
    uid, gid = str(LINKERD_PROXY_UID), str(LINKERD_PROXY_UID)
    if ann.get(L_SKIP_IN):
        inbound = _linkerd_ports(ann[L_SKIP_IN], L_SKIP_IN)
    if ann.get(L_SKIP_OUT):
        outbound = _linkerd_ports(ann[L_SKIP_OUT], L_SKIP_OUT)
    if ann.get(L_SKIP_SUBNETS):
        # proxy-init skips inbound traffic by *source* subnet (PROXY_INIT_REDIRECT
        # -s <subnet> -j RETURN); InterceptConfig has no inbound source exclusion, and
        # capturing that traffic anyway is not what the pod asked for.
        raise _Invalid(f"annotation {L_SKIP_SUBNETS} (inbound traffic skipped by source "
                       "subnet) has no equivalent in meshbpf: not intercepted")
    for key in (L_PROXY_UID, L_PROXY_GID):
        if ann.get(key):
            v = ann[key]
            if not re.fullmatch(r"[+-]?[0-9]+", v) or int(v) < 0:
                raise _Invalid(f"annotation {key}={v!r} is not a user/group id")
            if key == L_PROXY_UID:
                uid = str(int(v))
            else:
                gid = str(int(v))
    if labels.get(L_CONTROL_PLANE):
        outbound += list(LINKERD_API_SERVER_PORTS)
    fields = {
        "proxy_port": LINKERD_OUTBOUND_PORT,
        "inbound_capture_port": LINKERD_INBOUND_PORT,
        # Linkerd has no tunnel port: its inbound port itself is the harmless choice
        # (a connection to 4143 already reaches the proxy's inbound listener).
        "inbound_tunnel_port": LINKERD_INBOUND_PORT,
        "proxy_uid": uid,
        "proxy_gid": gid,
        "inbound_ports_include": "*",
        "inbound_ports_exclude": ",".join(dict.fromkeys(inbound)),
        "outbound_ports_exclude": ",".join(dict.fromkeys(outbound)),
        "outbound_ip_ranges_include": "*",
    }
    return _build(fields, {"inbound_ports_exclude": L_SKIP_IN,
                           "outbound_ports_exclude": L_SKIP_OUT,
                           "proxy_uid": L_PROXY_UID, "proxy_gid": L_PROXY_GID})


def _linkerd_ports(value, key):
    """Linkerd's port list: ports and inclusive ranges 'lo-hi' (proxy-init's ParsePortRange);
    ranges are spelled out port by port."""
    out = []
    for item in value.split(","):
        item = item.strip()
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item)
        lo = int(m.group(1)) if m else -1
        hi = int(m.group(2)) if m and m.group(2) else lo
        if not m or not 0 < lo <= hi <= 65535:
            raise _Invalid(f"annotation {key}: {item!r} is not a port or port range (1-65535)")
        out.extend(str(p) for p in range(lo, hi + 1))
    return out


# ---- pod object access -----------------------------------------------------------------

def _meta(pod):
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    return meta if isinstance(meta, dict) else {}


def _dict(v, what):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Malformed(f"{what} is not an object")
    return v


def _list(v, what):
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Malformed(f"{what} is not a list")
    return v


def _containers(spec, key):
    return [_dict(c, f"spec.{key} item") for c in _list(spec.get(key), f"spec.{key}")]


def _str_map(v, what):
    v = _dict(v, what)
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise _Malformed(f"{what} must map strings to strings")
    return v
