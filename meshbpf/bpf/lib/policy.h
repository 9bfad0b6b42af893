/* policy.h — the outbound capture decision: given a meshed pod's config and a socket's
 * destination, owner and source, redirect it to which sidecar listener, or leave it.
 *
 * Why one function for every hook: Istio decides in one chain (nat ISTIO_OUTPUT) whether a
 * packet is TCP to any host or UDP DNS, on IPv4 or IPv6. connect4/6 (TCP, and UDP DNS on a
 * connect()) and sendmsg4/6 (UDP DNS) ask mb_should_capture, so the rules are written once,
 * in Istio's order, for both families (addresses in the 16-byte form, addr.h).
 */
#ifndef MESHBPF_LIB_POLICY_H
#define MESHBPF_LIB_POLICY_H

#include "maps.h"
#include "counters.h"
#include "addr.h"
#include "netns.h"
#include "inbound.h"

#define MB_CAPTURE_PROXY 1       /* redirect to the outbound listener (proxy_port)     */
#define MB_CAPTURE_DNS 2         /* redirect to the DNS listener (dns_port)            */
#define MB_CAPTURE_INBOUND 3     /* redirect to the inbound listener (inbound_port)    */

/* Which rule decided (mb_should_capture's `why`, and trace.h's events): `meshbpf trace`
 * answers "why did (not) this connection go through the sidecar" with it, so a number
 * never changes meaning (meshbpf/ebpf/structs.py TRACE_RULES mirrors them). */
#define MB_WHY_EXCLUDED_PORT 1   /* outbound_ports_exclude                             */
#define MB_WHY_PASSTHROUGH 2     /* from 127.0.0.6 / ::6 over lo (inbound passthrough) */
#define MB_WHY_PROXY_ID 3        /* the proxy's own uid/gid                            */
#define MB_WHY_LO_OTHER_ID 4     /* another id over lo (Istio's `! --uid-owner` RETURN) */
#define MB_WHY_OWNER_GROUP 5     /* owner_groups_include / _exclude                    */
#define MB_WHY_DNS 6             /* port 53 to a captured DNS server                   */
#define MB_WHY_UDP 7             /* UDP other than captured DNS                        */
#define MB_WHY_LOOPBACK_DST 8    /* -d 127.0.0.1 / ::1                                 */
#define MB_WHY_EXCLUDED_CIDR 9   /* outbound_ip_ranges_exclude                         */
#define MB_WHY_INCLUDED_PORT 10  /* outbound_ports_include                             */
#define MB_WHY_INCLUDED_CIDR 11  /* outbound_ip_ranges_include (a range)               */
#define MB_WHY_INCLUDE_ALL 12    /* outbound_ip_ranges_include '*'                     */
#define MB_WHY_NOT_INCLUDED 13   /* no include range or port matched                   */
#define MB_WHY_PROXY_TO_POD 14   /* the proxy dialling its own pod: inbound listener   */
#define MB_WHY_TPROXY_INBOUND 15 /* TPROXY: a proxy id's connect to a captured port    */
#define MB_WHY_IPV6_OFF 16       /* an IPv6 destination without enable_ipv6 (outbound.h) */
#define MB_WHY_MAP_FULL 17       /* no room to record the connection: refused (conn.h) */

/* The cidr_rules scope an address is looked up in (see MB_IPV6_SCOPE). */
static __always_inline __u32 mb_cidr_scope(__u32 scope, const __u32 *ip)
{
    return mb_is_mapped(ip) ? scope : scope | MB_IPV6_SCOPE;
}

static __always_inline int mb_id_in(__u32 id, const __u32 *ids, __u32 n)
{
#pragma unroll
    for (int i = 0; i < MB_MAX_IDS; i++) {
        if (i < n && ids[i] == id)
            return 1;
    }
    return 0;
}

/* Is a port-53 destination one the pod's DNS capture takes (Istio's ISTIO_OUTPUT_DNS)? */
static __always_inline int mb_dns_target(struct pod_config *pc, const __u32 *ip)
{
    if (!(pc->flags & POD_F_DNS))
        return 0;
    if (pc->flags & POD_F_DNS_ALL)
        return 1;
    struct cidr_key ck = {};
    ck.prefixlen = 32 + 128;
    ck.pod_index = mb_cidr_scope(pc->pod_index | MB_DNS_SCOPE, ip);
    __builtin_memcpy(ck.ip, ip, 16);
    __u32 *r = cidr_rules.lookup(&ck);
    return r && *r == RULE_INCLUDE;
}

/* mb_should_capture's TPROXY case: a proxy id's connect over lo whose port the pod's
 * inbound policy captures (the policy is the same for every pod IP: look it up under the
 * pod address of the destination's family). */
static __always_inline int mb_tproxy_inbound(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                             __u16 port, __u32 uid, __u32 gid)
{
    if (!mb_id_in(uid, pc->uids, pc->n_uids) && !mb_id_in(gid, pc->gids, pc->n_gids))
        return 0;
    struct netns_src *s = netns_src.lookup(&nc);
    if (!s)
        return 0;
    struct inbound_pod_key pk = {};
    if (mb_is_mapped(ip))
        mb_copy_ip(pk.ip, s->v4);
    else
        mb_copy_ip(pk.ip, s->v6);
    __be16 capture_port;
    __u16 pod_flags;
    return mbi_policy(&pk, port, &capture_port, &pod_flags) > 0;
}

#define MB_IDS_PROXY (-1)        /* the proxy's own id: leave it                      */
#define MB_IDS_BYPASS (-2)       /* another id over lo (Istio's `! --uid-owner` RETURN) */

/* One of Istio's per-proxy-id rule groups, for the uids and then for the gids: per id U,
 * `-o lo [...] owner U -> inbound listener` (`in_redirect`), `-o lo ! owner U -> leave`
 * (`lo_return`), `owner U -> leave`. MB_CAPTURE_INBOUND, MB_IDS_PROXY, MB_IDS_BYPASS, or
 * 0 when no rule of the group applies. */
static __always_inline int mb_proxy_ids(const __u32 *ids, __u32 n, __u32 id, int in_redirect,
                                        int lo_return)
{
#pragma unroll
    for (int i = 0; i < MB_MAX_IDS; i++) {
        if (i < n) {
            if (ids[i] == id)
                return in_redirect ? MB_CAPTURE_INBOUND : MB_IDS_PROXY;
            if (lo_return)
                return MB_IDS_BYPASS;
        }
    }
    return 0;
}

/* The outbound decision shared by connect4/6 (TCP, and UDP DNS on a connect()) and
 * sendmsg4/6 (UDP DNS), rule for rule in the order of Istio's nat ISTIO_OUTPUT
 * (meshbpf/iptables/rules.py):
 *   outbound_ports_exclude (tcp and udp)       -> leave
 *   -o lo -s 127.0.0.6 (::6)                    -> leave
 *   per proxy uid, then per proxy gid, U:
 *     -o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 [! 53 with DNS, uids only] owner U
 *                                               -> inbound listener
 *     -o lo [-p tcp ! --dport 53 with DNS] ! owner U   (absent if an include range is a
 *                                                loopback address)  -> leave
 *     owner U                                   -> leave
 *   owner groups include / exclude              -> leave
 *   ISTIO_OUTPUT_DNS: port 53 to a captured server (tcp and udp) -> DNS listener
 *   -d 127.0.0.1 (::1), excluded ranges         -> leave
 *   outbound_ports_include, included ranges     -> outbound listener (tcp only)
 * `nc` the socket's netns cookie, `ip` v4-mapped for IPv4, `port` network order, `src` the
 * socket's bound source (v4-mapped, or zeros), `udp` for a datagram socket. Returns 0
 * (leave it), MB_CAPTURE_PROXY, MB_CAPTURE_DNS or MB_CAPTURE_INBOUND; `*why` the MB_WHY_*
 * rule that decided (for the trace only: the verdict never depends on it). */
static __always_inline int mb_should_capture(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                             __u16 port, const __u32 *src, int udp, int *why)
{
    __u64 ug = bpf_get_current_uid_gid();
    __u32 uid = (__u32)ug, gid = (__u32)(ug >> 32);
    struct port_key pk = {};
    pk.pod_index = pc->pod_index;
    pk.port = port;
    __u32 *pa = port_rules.lookup(&pk);
    *why = MB_WHY_EXCLUDED_PORT;
    if (pa && *pa == RULE_EXCLUDE)
        goto bypass;
    int local = mb_is_local(nc, ip);
    /* An unbound IPv6 socket dialling a local address gets that address as its source
     * (RFC 6724 rule 1), so dialling ::6 is "from ::6"; IPv4 takes the route's 127.0.0.1
     * or pod IP. */
    int unbound = !(src[0] | src[1] | src[2] | src[3]) ||
                  (mb_is_mapped(src) && !src[3]);
    if (local && (mb_is_passthrough(src) ||
                  (unbound && !mb_is_mapped(ip) && mb_is_passthrough(ip)))) {
        *why = MB_WHY_PASSTHROUGH;
        goto bypass;
    }
    int dns53 = (pc->flags & POD_F_DNS) && port == MB_DNS_PORT_BE;
    int in_redirect = local && !udp && !mb_is_host_loopback(ip) && port != pc->tunnel_port;
    int lo_return = local && !(pc->flags & POD_F_LOOPBACK_INCLUDED) &&
                    !((pc->flags & POD_F_DNS) && (udp || port == MB_DNS_PORT_BE));
    /* TPROXY inbound: Istio's mangle OUTPUT marks every TCP connect of a proxy uid or gid
     * over lo (but to 127.0.0.1 / ::1), and PREROUTING's ISTIO_INBOUND hands it to the
     * inbound listener when its port is captured, whatever the nat rules below decided. */
    *why = MB_WHY_TPROXY_INBOUND;
    if ((pc->flags & POD_F_TPROXY) && in_redirect && mb_tproxy_inbound(pc, nc, ip, port, uid, gid))
        return MB_CAPTURE_INBOUND;
    /* the uid rules' inbound redirect spares DNS (`! --dport 53`), the gid rules' does not */
    int ids = mb_proxy_ids(pc->uids, pc->n_uids, uid, in_redirect && !dns53, lo_return);
    if (!ids)
        ids = mb_proxy_ids(pc->gids, pc->n_gids, gid, in_redirect, lo_return);
    *why = MB_WHY_PROXY_TO_POD;
    if (ids == MB_CAPTURE_INBOUND)
        return MB_CAPTURE_INBOUND;
    *why = MB_WHY_PROXY_ID;
    if (ids == MB_IDS_PROXY)
        goto proxy;
    *why = MB_WHY_LO_OTHER_ID;
    if (ids == MB_IDS_BYPASS)
        goto bypass;
    *why = MB_WHY_OWNER_GROUP;
    if ((pc->flags & POD_F_OWNER_INCLUDE) && !mb_id_in(gid, pc->owner_gids, pc->n_owner_gids))
        goto bypass;
    if ((pc->flags & POD_F_OWNER_EXCLUDE) && mb_id_in(gid, pc->owner_gids, pc->n_owner_gids))
        goto bypass;
    *why = MB_WHY_DNS;
    if (port == MB_DNS_PORT_BE && mb_dns_target(pc, ip))
        return MB_CAPTURE_DNS;
    *why = udp ? MB_WHY_UDP : MB_WHY_LOOPBACK_DST;
    if (udp || mb_is_host_loopback(ip))
        goto bypass;
    struct cidr_key ck = {};
    ck.prefixlen = 32 + 128;
    ck.pod_index = mb_cidr_scope(pc->pod_index, ip);
    __builtin_memcpy(ck.ip, ip, 16);
    __u32 *ca = cidr_rules.lookup(&ck);
    __u32 crule = ca ? *ca : 0;
    *why = MB_WHY_EXCLUDED_CIDR;
    if (crule == RULE_EXCLUDE)
        goto bypass;
    *why = MB_WHY_INCLUDED_PORT;
    if (pa && *pa == RULE_INCLUDE)
        return MB_CAPTURE_PROXY;
    *why = crule == RULE_INCLUDE ? MB_WHY_INCLUDED_CIDR : MB_WHY_INCLUDE_ALL;
    if (crule == RULE_INCLUDE || (pc->flags & POD_F_OUTBOUND_ALL))
        return MB_CAPTURE_PROXY;
    *why = MB_WHY_NOT_INCLUDED;
bypass:
    mb_count(COUNTER_BYPASS_RULE, 1);
    return 0;
proxy:
    mb_count(COUNTER_BYPASS_PROXY, 1);
    return 0;
}

/* The listener a verdict sends the connect to (network order). */
static __always_inline __u16 mb_capture_port(struct pod_config *pc, int verdict)
{
    if (verdict == MB_CAPTURE_DNS)
        return pc->dns_port;
    if (verdict == MB_CAPTURE_INBOUND)
        return pc->inbound_port;
    return pc->proxy_port;
}

#endif /* MESHBPF_LIB_POLICY_H */
