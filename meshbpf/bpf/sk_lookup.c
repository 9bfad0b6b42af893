/* sk_lookup.c: the capture listener for a SYN that tc_inbound left to the TIME_WAIT path.
 *
 * Hook: BPF_PROG_TYPE_SK_LOOKUP (attach type BPF_SK_LOOKUP), one bpf_link per meshed pod's
 * network namespace (meshbpf/ebpf/inbound.py, pinned as <pin prefix>/links/sk_lookup-<netns
 * inode>). Program: mb_sk_lookup. The kernel runs it whenever it looks for a listener in
 * that netns (no established/half-open socket owns the packet), before the listening hash.
 *
 * Why: tc_inbound hands new connections to the capture listener with bpf_sk_assign(), but a
 * SYN whose 4-tuple still has a TIME_WAIT socket (the sidecar's accepted socket closed
 * first) cannot be handled that way: the listener's request socket duplicates the TIME_WAIT
 * in the established hash and inet_ehash_insert() drops it, on every retransmit, until the
 * TIME_WAIT expires (60 s). tc marks such a SYN's 4-tuple in `inbound_tw` and lets it pass;
 * tcp_v4_rcv/tcp_v6_rcv (TCP_TW_SYN) deschedule the TIME_WAIT and look up a listener, which
 * runs this program. tc marks a SYN the same way when bpf_sk_assign refuses the capture
 * listener because it is in a SO_REUSEPORT group (Linux < 6.5; Envoy listens so by default)
 * or node_cfg forces this path (NODE_F_INBOUND_SK_LOOKUP): the kernel's ordinary listener
 * lookup then runs this program, whose assignment is reuseport-aware.
 *
 * What it does: a TCP lookup whose 4-tuple tc marked (within INBOUND_TW_MAX_AGE_NS) consumes
 * the mark and gets the pod's capture listener: `capture_listeners` keyed by the pod's netns
 * cookie (`inbound_netns`, by pod IP), the capture port (the pod's policy, mbi_policy) and
 * the family; an IPv4 lookup may use a dual-stack AF_INET6 listener (the kernel refuses an
 * ipv6only one). It is selected with bpf_sk_assign(); SO_REUSEPORT groups are balanced by
 * the kernel as usual. No usable capture listener: SK_DROP, never the app's listener; the
 * kernel then answers with the TIME_WAIT's ACK, the client resets it and its retransmitted
 * SYN goes through tc. Every other lookup (unmarked: new connections tc already assigned,
 * the pod's own traffic to itself such as the sidecar's inbound passthrough, ports the
 * policy leaves alone, other protocols) passes untouched.
 */
#include "lib/maps.h"
#include "lib/addr.h"
#include "lib/inbound.h"

#define MBS_SK_DROP 0
#define MBS_SK_PASS 1
#define MBS_IPPROTO_TCP 6

static __always_inline struct bpf_sock *mbs_listener(__u64 netns, __be16 port, __u16 family)
{
    struct capture_listener_key lk = {};
    lk.netns = netns;
    lk.port = port;
    lk.family = family;
    return (struct bpf_sock *)capture_listeners.lookup(&lk);
}

int mb_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != MBS_IPPROTO_TCP)
        return MBS_SK_PASS;
    __u32 family = ctx->family;
    struct inbound_tw_key tk = {};
    if (mb_addr(family, &ctx->local_ip4, ctx->local_ip6, tk.local_ip) < 0)
        return MBS_SK_PASS;
    mb_addr(family, &ctx->remote_ip4, ctx->remote_ip6, tk.remote_ip);
    tk.local_port = bpf_htons((__u16)ctx->local_port);
    tk.remote_port = (__u16)ctx->remote_port;    /* network order */
    __u64 *marked = inbound_tw.lookup(&tk);
    if (!marked)
        return MBS_SK_PASS;                      /* not a SYN tc left to the TIME_WAIT path */
    __u64 age = bpf_ktime_get_ns() - *marked;
    inbound_tw.delete(&tk);
    if (age > INBOUND_TW_MAX_AGE_NS)
        return MBS_SK_PASS;                      /* a stale mark: the TIME_WAIT had ACKed */

    struct inbound_pod_key pk = {};
    __builtin_memcpy(pk.ip, tk.local_ip, sizeof(pk.ip));
    __be16 capture_port = 0;
    __u16 pod_flags = 0;
    if (mbi_policy(&pk, tk.local_port, &capture_port, &pod_flags) <= 0)
        return MBS_SK_PASS;                      /* the policy changed meanwhile */
    __u64 *netns = inbound_netns.lookup(&pk);
    if (!netns)
        return MBS_SK_DROP;

    long err = -1;
    struct bpf_sock *sk = mbs_listener(*netns, capture_port, family);
    if (sk) {
        err = bpf_sk_assign(ctx, sk, 0);
        bpf_sk_release(sk);
    }
    if (err && family == MB_AF_INET) {
        sk = mbs_listener(*netns, capture_port, MB_AF_INET6);   /* dual-stack [::] */
        if (sk) {
            err = bpf_sk_assign(ctx, sk, 0);
            bpf_sk_release(sk);
        }
    }
    return err ? MBS_SK_DROP : MBS_SK_PASS;
}
