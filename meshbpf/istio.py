"""Istio's sidecar ports, ids and addresses, in one place.

Both data paths must agree with Istio's injector and istio-iptables on these numbers, so a
pod behaves the same whichever mode its node runs; naming them once keeps the eBPF maps,
the iptables rules and the defaults of InterceptConfig from drifting apart. Pure constants.
"""

OUTBOUND_PORT = 15001          # Envoy's outbound capture listener (istio-iptables -p)
INBOUND_PORT = 15006           # Envoy's inbound capture listener (-z)
TUNNEL_PORT = 15008            # HBONE tunnel: never captured inbound (Istio's RETURN rule)
AGENT_PORT = 15020             # pilot-agent's merged metrics and debug
HEALTH_PORT = 15021            # the health check port
ENVOY_METRICS_PORT = 15090     # Envoy's Prometheus endpoint
DNS_PORT = 15053               # the agent's DNS proxy, where captured DNS goes
# The sidecar's own ports the injector keeps out of inbound capture (-d).
INBOUND_PORTS_EXCLUDE = (AGENT_PORT, HEALTH_PORT, ENVOY_METRICS_PORT)

PROXY_UID = 1337               # Envoy runs as this uid/gid: its traffic is never captured
PROXY_GID = 1337
TPROXY_MARK = 1337             # the packet mark of TPROXY inbound interception
OUTBOUND_MARK = 1338           # istio-iptables' mark for the sidecar's outbound (TPROXY)

# Envoy's inbound passthrough binds its upstream connections to these so that they are
# told apart from the app's own loopback traffic (and not captured again).
INBOUND_PASSTHROUGH_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_V6 = "::6"
