/* cgroup/getsockopt: answer SO_ORIGINAL_DST (SOL_IP, 80) and IP6T_SO_ORIGINAL_DST
 * (SOL_IPV6, 80) on the sidecar's accepted socket, as conntrack would, so unmodified
 * Envoy/HAProxy work. Outbound: the app socket's entry in `pairs` (its key is this
 * socket's tuple reversed). Otherwise, in a meshed pod: the socket's own local address,
 * as conntrack answers for a connection nobody NATed (inbound: tc_inbound assigns the
 * SYN to the 15006 listener unrewritten). Every other getsockopt is left untouched. */
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/addr.h"

#define MB_PAGE_SIZE 4096

/* Every path that leaves a getsockopt to the kernel's own answer ends here (and only the
 * answered one does not: tests/unit check the source). Before Linux 6.5 the kernel gives
 * the program at most a page of optval and fails the call with EFAULT when the program
 * returns with a longer optlen than that; optlen 0 means "keep the kernel's own buffer".
 * Without this, a large getsockopt (iptables-legacy's IPT_SO_GET_ENTRIES) fails for every
 * process below the attach point. Harmless on 6.5+. */
static __always_inline int mb_pass(struct bpf_sockopt *ctx)
{
    if (ctx->optlen > MB_PAGE_SIZE) {
        volatile struct bpf_sockopt *vctx = ctx;   /* one 4-byte ctx store, as in mb_answer */
        vctx->optlen = 0;
    }
    return 1;
}

static __always_inline int mb_answer(struct bpf_sockopt *ctx, const __u32 *ip, __u16 port)
{
    void *optval = ctx->optval;
    void *end = ctx->optval_end;
    volatile struct bpf_sockopt *vctx = ctx;   /* keep the two 4-byte ctx stores apart */
    int level = ctx->level;

    if (level == MB_SOL_IP) {
        /* IPv4 option: a plain sockaddr_in, even on an AF_INET6 socket (Envoy ipv4_compat) */
        if (!mb_is_mapped(ip))
            return 0;
        struct sockaddr_in *sa = optval;
        if ((void *)(sa + 1) > end)
            return 0;
        sa->sin_family = MB_AF_INET;
        sa->sin_port = port;
        sa->sin_addr.s_addr = ip[3];
        __builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
        vctx->optlen = sizeof(*sa);
        vctx->retval = 0;
        return 1;
    }
    struct sockaddr_in6 *sa6 = optval;
    if ((void *)(sa6 + 1) > end)
        return 0;
    sa6->sin6_family = MB_AF_INET6;
    sa6->sin6_port = port;
    sa6->sin6_flowinfo = 0;
    mb_copy_ip(sa6->sin6_addr.in6_u.u6_addr32, ip);
    sa6->sin6_scope_id = 0;
    vctx->optlen = sizeof(*sa6);
    vctx->retval = 0;
    return 1;
}

int mb_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != MB_SO_ORIGINAL_DST)
        return mb_pass(ctx);
    int level = ctx->level;
    if (level != MB_SOL_IP && level != MB_SOL_IPV6)
        return mb_pass(ctx);
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return mb_pass(ctx);

    /* The app's key: local = our remote, remote = our local. */
    struct sock_key k = {};
    __u32 family = sk->family;
    if (mb_addr(family, &sk->dst_ip4, sk->dst_ip6, k.local_ip) < 0)
        return mb_pass(ctx);
    mb_addr(family, &sk->src_ip4, sk->src_ip6, k.remote_ip);
    k.local_port = (__u16)sk->dst_port;
    k.remote_port = bpf_htons((__u16)sk->src_port);
    if (mb_is_loopback(k.local_ip) || mb_is_loopback(k.remote_ip))
#ifdef MB_NO_NC_SOCKOPT
        k.netns = 1;             /* only "loopback": no pod can be told apart here */
#else
        k.netns = bpf_get_netns_cookie(ctx);
#endif

    __u32 ip[4];
    __u16 port;
#ifdef MB_NO_NC_SOCKOPT
    /* A loopback tuple says nothing about the pod here: its entry is on the socket. */
    struct orig_dst *o = k.netns ? sk_orig.sk_storage_get(sk, 0, 0) : pairs.lookup(&k);
#else
    struct orig_dst *o = pairs.lookup(&k);
#endif
    if (o) {
        mb_copy_ip(ip, o->ip);
        port = o->port;
        o->flags |= ORIG_F_ANSWERED;
    } else {
        /* No redirected app behind this socket: answer like conntrack does for a
         * connection nobody NATed, with the socket's own local address. That is the
         * inbound case: tc_inbound hands pod_ip:8080's SYN to the 15006 listener with
         * bpf_sk_assign, so the accepted socket's local address IS the original one.
         * Only for sockets in a meshed pod; anything else is left untouched. */
#ifdef MB_NO_NC_SOCKOPT
        /* Which pod this is is unknown here: answer the local address of a non-loopback
         * socket (conntrack's answer for any connection nobody NATed, meshed pod or not)
         * and nothing on loopback, where a missing entry may be a redirected connection. */
        if (mb_is_loopback(k.remote_ip)) {
            mb_count(COUNTER_ORIG_DST_MISS, 1);
            return mb_pass(ctx);
        }
#else
        __u64 nc = bpf_get_netns_cookie(ctx);
        struct pod_config *pc = pods.lookup(&nc);
        /* On loopback at a capture port it is a redirected connection whose pairs entry
         * could not be recorded (pairs full): its own address would send the sidecar to
         * itself, no answer is the safe one. (Any other socket: as conntrack answers.) */
        __u16 lport = k.remote_port;
        if (!pc || (mb_is_loopback(k.remote_ip) &&
                    (lport == pc->proxy_port || lport == pc->inbound_port ||
                     lport == pc->dns_port))) {
            mb_count(COUNTER_ORIG_DST_MISS, 1);
            return mb_pass(ctx);
        }
#endif
        mb_copy_ip(ip, k.remote_ip);
        port = k.remote_port;
    }
    if (mb_answer(ctx, ip, port)) {
        mb_count(COUNTER_ORIG_DST_ANSWERED, 1);
        return 1;
    }
    mb_count(COUNTER_ORIG_DST_MISS, 1);
    return mb_pass(ctx);
}
