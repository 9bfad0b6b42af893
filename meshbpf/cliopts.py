"""The interception options shared by `meshbpf iptables ...` and `meshbpf attach`.

Flag letters and long names are istio-iptables' own (tools/istio-iptables/pkg/cmd),
so a pod's istio-init arguments work unchanged; what Istio reads from its environment
(owner groups, DNS servers, loopback CIDR, IPv6) gets a long flag here. `--config FILE`
loads a JSON object of InterceptConfig fields; flags given explicitly override it.
Unset flags fall back to the file, then to InterceptConfig's defaults (the Istio
sidecar injector's), so the same command means the same thing in eBPF and iptables mode.

`config_options` decorates a click command; `config_from_options(kwargs)` turns the
parsed values into (InterceptConfig, the kwargs the options did not consume).
"""

import click

from .config import InterceptConfig

_D = InterceptConfig()

# (short, long, InterceptConfig field, help). Each value is a string the config parses.
_VALUE_OPTIONS = [
    ("-p", "--envoy-port", "proxy_port",
     f"Port all outbound TCP traffic is redirected to (the sidecar). [default: {_D.proxy_port}]"),
    ("-z", "--inbound-capture-port", "inbound_capture_port",
     f"Port all inbound TCP traffic is redirected to. [default: {_D.inbound_capture_port}]"),
    ("-e", "--inbound-tunnel-port", "inbound_tunnel_port",
     f"The sidecar's inbound tunnel (HBONE) port, never captured. [default: {_D.inbound_tunnel_port}]"),
    ("-u", "--proxy-uid", "proxy_uid",
     f"Comma list of UIDs whose traffic is not redirected (the sidecar's). [default: {_D.proxy_uid}]"),
    ("-g", "--proxy-gid", "proxy_gid",
     f"Comma list of GIDs whose traffic is not redirected. [default: {_D.proxy_gid}]"),
    ("-m", "--istio-inbound-interception-mode", "inbound_interception_mode",
     f"Inbound capture mode: REDIRECT or TPROXY. [default: {_D.inbound_interception_mode}]"),
    ("-b", "--istio-inbound-ports", "inbound_ports_include",
     f"Comma list of inbound ports to capture; '*' for all, '' for none. "
     f"[default: {_D.inbound_ports_include}]"),
    ("-d", "--istio-local-exclude-ports", "inbound_ports_exclude",
     f"Comma list of inbound ports not captured (applies with -b '*'). "
     f"[default: {_D.inbound_ports_exclude}]"),
    ("-i", "--istio-service-cidr", "outbound_ip_ranges_include",
     f"Comma list of CIDRs whose outbound traffic is captured; '*' for all, '' for none. "
     f"[default: {_D.outbound_ip_ranges_include}]"),
    ("-x", "--istio-service-exclude-cidr", "outbound_ip_ranges_exclude",
     "Comma list of CIDRs never captured outbound. [default: none]"),
    ("-q", "--istio-outbound-ports", "outbound_ports_include",
     "Comma list of outbound ports always captured. [default: none]"),
    ("-o", "--istio-local-outbound-ports-exclude", "outbound_ports_exclude",
     "Comma list of outbound ports never captured. [default: none]"),
    ("-k", "--kube-virt-interfaces", "reroute_virtual_interfaces",
     "Comma list of virtual interfaces whose inbound traffic is treated as outbound. [default: none]"),
    ("-c", "--istio-exclude-interfaces", "exclude_interfaces",
     "Comma list of interfaces never captured, in or out. [default: none]"),
    ("-t", "--istio-inbound-tproxy-mark", "inbound_tproxy_mark",
     f"Packet mark used by TPROXY mode. [default: {_D.inbound_tproxy_mark}]"),
    ("-r", "--istio-inbound-tproxy-route-table", "inbound_tproxy_route_table",
     f"Routing table used by TPROXY mode. [default: {_D.inbound_tproxy_route_table}]"),
    (None, "--dns-servers-v4", "dns_servers_v4",
     "Comma list of IPv4 DNS servers whose traffic --redirect-dns captures. [default: none]"),
    (None, "--dns-servers-v6", "dns_servers_v6",
     "Comma list of IPv6 DNS servers whose traffic --redirect-dns captures. [default: none]"),
    (None, "--owner-groups-include", "owner_groups_include",
     f"Comma list of groups (names or GIDs) whose outbound traffic is captured; '*' for all. "
     f"[default: {_D.owner_groups_include}]"),
    (None, "--owner-groups-exclude", "owner_groups_exclude",
     "Comma list of groups whose outbound traffic is never captured. [default: none]"),
    (None, "--loopback-cidr", "host_ipv4_loopback_cidr",
     f"IPv4 loopback CIDR of the pod. [default: {_D.host_ipv4_loopback_cidr}]"),
]

_BOOL_OPTIONS = [
    ("--redirect-dns/--no-redirect-dns", "redirect_dns",
     "Capture DNS (port 53) to the agent on 15053. [default: off]"),
    ("--capture-all-dns/--no-capture-all-dns", "capture_all_dns",
     "With --redirect-dns: capture all port-53 traffic, not only to the listed servers. [default: off]"),
    ("--drop-invalid/--no-drop-invalid", "drop_invalid",
     "Drop packets conntrack marks INVALID instead of resetting. [default: off]"),
    ("--ipv6/--no-ipv6", "enable_ipv6",
     "Generate IPv6 rules. [default: when the pod has an IPv6 address]"),
]

CONFIG_FIELDS = tuple(f for _, _, f, _ in _VALUE_OPTIONS) + tuple(f for _, f, _ in _BOOL_OPTIONS)


def config_options(f):
    """Decorator adding every interception option (and --config FILE) to a click command."""
    for decl, field, help_ in reversed(_BOOL_OPTIONS):
        f = click.option(decl, field, default=None, help=help_)(f)
    for short, long_, field, help_ in reversed(_VALUE_OPTIONS):
        names = [n for n in (short, long_) if n]
        f = click.option(*names, field, type=str, default=None, metavar="VALUE", help=help_)(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="JSON file of InterceptConfig fields (Istio names); flags override it.")(f)
    return f


def config_from_options(kwargs):
    """(InterceptConfig, remaining kwargs) from the values `config_options` parsed.

    Precedence: explicit flag > --config file > InterceptConfig default. Raises
    meshbpf.errors.UsageError naming the bad field. The remaining kwargs get
    `ipv6_auto`: True when neither --ipv6/--no-ipv6 nor the file chose IPv6, meaning
    "IPv6 rules iff the pod has an IPv6 address" (pass it on to the interceptor).
    """
    rest = dict(kwargs)
    path = rest.pop("config_file", None)
    given = {}
    for field in CONFIG_FIELDS:
        value = rest.pop(field, None)
        if value is not None:
            given[field] = value
    if "inbound_interception_mode" in given:
        given["inbound_interception_mode"] = str(given["inbound_interception_mode"]).upper()
    base = InterceptConfig.from_file(path) if path else InterceptConfig()
    from_file = set()
    if path:
        import json
        with open(path) as fh:
            from_file = set(json.load(fh))
    cfg = base.replace(**given) if given else base.validate()
    rest["ipv6_auto"] = "enable_ipv6" not in given and "enable_ipv6" not in from_file
    return cfg, rest
