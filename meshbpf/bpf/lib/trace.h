/* trace.h — interception decisions as events, for `meshbpf trace` (meshbpf/ebpf/trace.py).
 *
 * Why a ring buffer behind a gate: "why didn't this connection go through the sidecar?" is
 * answered by the decision itself (which rule of policy.h decided), but a node makes
 * decisions on every connect, and nobody reads them most of the time. `trace_on[0]` is set
 * by `meshbpf trace` while it runs and cleared when it exits, so a decision costs one array
 * lookup while nobody follows, and the ring buffer is only written while somebody reads.
 * A ring buffer (not a perf buffer) so user space can read the PINNED map by mmap without
 * bcc: one buffer for all CPUs, records in order.
 *
 * Inbound (mb_trace_in, from tc_inbound): one event per connection, not per packet: only a
 * SYN without ACK is traced, and only where tc decides it (a retransmitted SYN that the
 * kernel already holds a request socket for passes untraced; one that tc drops because no
 * capture listener is up yet is traced again: each is a failed attempt). tc runs in
 * softirq, on no task of the pod: the event has no uid/gid (0), and its netns is the owner
 * cookie recorded in the pod's inbound_pods entry, the cookie the cgroup hooks report.
 *
 * Kernels without BPF ring buffers (Linux < 5.8) get MB_NO_RINGBUF from the loader: the
 * maps and the event code compile out and the programs load as before.
 */
#ifndef MESHBPF_LIB_TRACE_H
#define MESHBPF_LIB_TRACE_H

#include "types.h"
#include "addr.h"
#include "maps.h"
#include "inbound.h"

#define MB_TRACE_OUT 1           /* trace_event.direction: a connect (outbound)        */
#define MB_TRACE_IN 2            /* an inbound connection (tc)                         */
#define MB_TRACE_REDIRECTED 1    /* trace_event.verdict: sent to a sidecar listener    */
#define MB_TRACE_BYPASSED 2      /* left to go where it was addressed                  */
#define MB_TRACE_REFUSED 3       /* refused (EPERM): could not be recorded             */
#define MB_TRACE_DROPPED 4       /* inbound SYN dropped (no capture listener yet)      */

/* One decision. `rule` is an MB_WHY_* (policy.h, inbound.h). Mirrored by structs.TraceEvent. */
struct trace_event {
    __u64 netns;                 /* netns cookie of the socket (the pod)               */
    __u64 time_ns;               /* bpf_ktime_get_ns()                                 */
    __u32 pod_index;
    __u32 uid;                   /* of the connecting task (initial user namespace)    */
    __u32 gid;
    __u32 ip[4];                 /* the original destination, v4-mapped if IPv4        */
    __u16 port;                  /* its port, network order                            */
    __u16 family;                /* MB_AF_INET or MB_AF_INET6 (of the address)         */
    __u16 to_port;               /* the listener it was sent to, network order, or 0   */
    __u8  direction;             /* MB_TRACE_OUT / MB_TRACE_IN                         */
    __u8  verdict;               /* MB_TRACE_*                                         */
    __u8  rule;                  /* MB_WHY_*                                           */
    __u8  proto;                 /* 6 tcp, 17 udp                                      */
    __u16 pad;
};

#ifndef MB_NO_RINGBUF
/* 64 pages: a burst of ~4,600 decisions between two reads of the follower */
BPF_RINGBUF_OUTPUT(trace_events, 64);
BPF_ARRAY(trace_on, __u32, 1);

static __always_inline void mb_trace_out(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                         __u16 port, int udp, int verdict, int rule,
                                         __u16 to_port)
{
    __u32 k = 0;
    __u32 *on = trace_on.lookup(&k);
    if (!on || !*on)
        return;
    struct trace_event ev = {};
    __u64 ug = bpf_get_current_uid_gid();
    ev.netns = nc;
    ev.time_ns = bpf_ktime_get_ns();
    ev.pod_index = pc->pod_index;
    ev.uid = (__u32)ug;
    ev.gid = (__u32)(ug >> 32);
    __builtin_memcpy(ev.ip, ip, 16);
    ev.port = port;
    ev.family = mb_is_mapped(ip) ? MB_AF_INET : MB_AF_INET6;
    ev.to_port = to_port;
    ev.direction = MB_TRACE_OUT;
    ev.verdict = verdict;
    ev.rule = rule;
    ev.proto = udp ? 17 : 6;
    /* a full ring drops the event (the follower is behind), never the connection */
    trace_events.ringbuf_output(&ev, sizeof(ev), 0);
}

/* An inbound connection's first SYN to `pk`:`dport` (the pod address and port the client
 * dialled; network order), decided by the policy of `polk` (tc_inbound's mbi_policy_key;
 * `iface`: the filter's inbound_ifaces id, for a destination no pod owns). `why` 0: the
 * policy's rule (mbi_why). Everything past the gate is paid only while somebody follows. */
static __always_inline void mb_trace_in(struct inbound_pod_key *pk, struct inbound_pod_key *polk,
                                        __u16 dport, __u32 iface, int verdict, int why,
                                        __u16 to_port)
{
    __u32 k = 0;
    __u32 *on = trace_on.lookup(&k);
    if (!on || !*on)
        return;
    struct trace_event ev = {};
    struct inbound_pod_val *pod = inbound_pods.lookup(polk);
    if (pod) {
        ev.netns = pod->owner;
    } else if (iface) {
        struct inbound_iface_val *v = inbound_ifaces.lookup(&iface);
        if (v)
            ev.netns = v->netns;
    }
    struct pod_config *pc = pods.lookup(&ev.netns);
    if (pc)
        ev.pod_index = pc->pod_index;
    ev.time_ns = bpf_ktime_get_ns();
    __builtin_memcpy(ev.ip, pk->ip, 16);
    ev.port = dport;
    ev.family = mb_is_mapped(pk->ip) ? MB_AF_INET : MB_AF_INET6;
    ev.to_port = to_port;
    ev.direction = MB_TRACE_IN;
    ev.verdict = verdict;
    ev.rule = why ? why : mbi_why(polk, dport);
    ev.proto = 6;
    trace_events.ringbuf_output(&ev, sizeof(ev), 0);
}
#else
static __always_inline void mb_trace_in(struct inbound_pod_key *pk, struct inbound_pod_key *polk,
                                        __u16 dport, __u32 iface, int verdict, int why,
                                        __u16 to_port)
{
}
static __always_inline void mb_trace_out(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                         __u16 port, int udp, int verdict, int rule,
                                         __u16 to_port)
{
}
#endif

#endif /* MESHBPF_LIB_TRACE_H */
