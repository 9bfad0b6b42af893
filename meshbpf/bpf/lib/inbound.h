/* inbound.h — the inbound capture policy: does a pod's policy steer a destination port
 * into its sidecar, and how tc_inbound, sk_lookup and the outbound TPROXY case agree on it.
 *
 * Why steering and not a port rewrite: tc_inbound steers with bpf_sk_assign() (socket-level
 * TPROXY). The SYN for pod_ip:8080 is handed to the 15006 listener unchanged, so the
 * sidecar's accepted socket's LOCAL address is pod_ip:8080:
 *   - getsockname() on it is the original destination; a proxy whose SO_ORIGINAL_DST
 *     fails falls back to it (Envoy's original_dst filter and HAProxy both do), and
 *     getsockopt may answer SO_ORIGINAL_DST for a socket with no `pairs` entry with the
 *     socket's own local address (ctx->sk->src_ip4/src_ip6, src_port);
 *   - replies carry the original source port because the socket is bound to it;
 *   - sockops sees the real 4-tuple, mirror of the peer's: register the socket as usual,
 *     no inbound_nat lookup, nothing to delete on close.
 * So there is no per-connection inbound state. The policy maps (inbound_pods,
 * inbound_ports, inbound_ifaces) are keyed by pod IP; layouts in types.h.
 *
 * The TIME_WAIT path (sk_lookup.c). A SYN whose 4-tuple is held by a TIME_WAIT socket must
 * not be bpf_sk_assign()ed by tc: the listener would then build a request socket that
 * inet_ehash_insert() drops as a duplicate of the TIME_WAIT, silently, on every retransmit
 * until the TIME_WAIT expires (60 s). tc instead marks the 4-tuple in `inbound_tw` and
 * leaves the SYN to the kernel, whose TIME_WAIT handling (TCP_TW_SYN) deschedules the
 * TIME_WAIT and asks the netns's sk_lookup programs for a listener: mb_sk_lookup consumes
 * the mark and picks the pod's capture listener. Only lookups tc marked are touched (the
 * pod's own traffic to itself, e.g. the sidecar's inbound passthrough, never is). Only for
 * pods whose inbound_pods entry has INBOUND_POD_SK_LOOKUP (mb_sk_lookup is linked in the
 * pod's netns): without it the kernel would pick the app's own listener.
 */
#ifndef MESHBPF_LIB_INBOUND_H
#define MESHBPF_LIB_INBOUND_H

#include "maps.h"

/* Which rule decided an inbound connection, for `meshbpf trace` (trace.h's events; the
 * outbound codes 1..17 are policy.h's, and a number never changes meaning: structs.py
 * TRACE_RULES mirrors them). */
#define MB_WHY_IN_INCLUDED_PORT 18 /* inbound_ports_include lists the port              */
#define MB_WHY_IN_INCLUDE_ALL 19   /* inbound_ports_include '*'                          */
#define MB_WHY_IN_EXCLUDED_PORT 20 /* inbound_ports_exclude (or a port Istio never takes) */
#define MB_WHY_IN_NOT_INCLUDED 21  /* not in inbound_ports_include                       */
#define MB_WHY_NOT_MESHED 22       /* the destination is no enrolled pod's               */
#define MB_WHY_NO_LISTENER 23      /* captured, but no capture listener: SYN dropped     */

/* 1 and *capture_port, *pod_flags if the pod's policy steers `dport`; -1 if the destination
 * is an enrolled pod IP whose policy leaves the port alone; 0 if it is no enrolled pod IP.
 * Ports in network order. (tc_inbound.c, sk_lookup.c, and policy.h's TPROXY case) */
static __always_inline int mbi_policy(struct inbound_pod_key *pk, __be16 dport,
                                      __be16 *capture_port, __u16 *pod_flags)
{
    struct inbound_pod_val *pod = inbound_pods.lookup(pk);
    if (!pod)
        return 0;
    struct inbound_port_key k = {};
    __builtin_memcpy(k.ip, pk->ip, sizeof(k.ip));
    k.port = dport;
    __u32 *action = inbound_ports.lookup(&k);
    if (action) {
        if (*action != INBOUND_PORT_CAPTURE)
            return -1;
    } else if (!(pod->flags & INBOUND_POD_WILDCARD)) {
        return -1;
    }
    *capture_port = pod->capture_port;
    *pod_flags = pod->flags;
    return 1;
}

/* The MB_WHY_IN_* / MB_WHY_NOT_MESHED that mbi_policy's answer for (`pk`, `dport`) came
 * from. Separate from mbi_policy so that only a traced decision pays its lookups again. */
static __always_inline int mbi_why(struct inbound_pod_key *pk, __be16 dport)
{
    struct inbound_pod_val *pod = inbound_pods.lookup(pk);
    if (!pod)
        return MB_WHY_NOT_MESHED;
    struct inbound_port_key k = {};
    __builtin_memcpy(k.ip, pk->ip, sizeof(k.ip));
    k.port = dport;
    __u32 *action = inbound_ports.lookup(&k);
    if (action)
        return *action == INBOUND_PORT_CAPTURE ? MB_WHY_IN_INCLUDED_PORT
                                               : MB_WHY_IN_EXCLUDED_PORT;
    return (pod->flags & INBOUND_POD_WILDCARD) ? MB_WHY_IN_INCLUDE_ALL : MB_WHY_IN_NOT_INCLUDED;
}

#endif /* MESHBPF_LIB_INBOUND_H */
