/* outbound.h — the redirect itself, one body per hook kind for both socket families:
 * cgroup/connect4 and connect6 (mb_connect), cgroup/sendmsg4 and sendmsg6 (mb_sendmsg).
 *
 * Why shared: the IPv4 and IPv6 hooks differ only in where the sock_addr context keeps
 * the address (user_ip4 or user_ip6, msg_src_ip4 or msg_src_ip6) and which loopback they
 * dial; the decision (policy.h), the records (conn.h) and the source (netns.h) are the
 * same. `v6sock` is a constant at each hook, so the compiler keeps only that family's
 * context accesses in each program.
 */
#ifndef MESHBPF_LIB_OUTBOUND_H
#define MESHBPF_LIB_OUTBOUND_H

#include "maps.h"
#include "counters.h"
#include "addr.h"
#include "netns.h"
#include "policy.h"
#include "conn.h"
#include "trace.h"

/* The destination a sock_addr hook is asked for, in the 16-byte form. */
static __always_inline void mb_sa_dst(struct bpf_sock_addr *ctx, int v6sock, __u32 *ip)
{
    if (v6sock)
        mb_ctx_ip6(ctx, ip);
    else
        mb_map4(ip, ctx->user_ip4);
}

/* The socket's bound source in the 16-byte form (zeros if unbound or no socket). */
static __always_inline void mb_sa_src(struct bpf_sock_addr *ctx, int v6sock, __u32 *src)
{
    struct bpf_sock *sk = ctx->sk;
    if (!v6sock) {
        mb_map4(src, sk ? sk->src_ip4 : 0);
        return;
    }
    src[0] = src[1] = src[2] = src[3] = 0;
    if (sk)
        mb_copy_ip(src, sk->src_ip6);
}

/* Send the socket to the loopback listener on `port` (network order): 127.0.0.1, or on an
 * AF_INET6 socket ::ffff:127.0.0.1 (`v4`: a v4-mapped destination) or ::1. */
static __always_inline void mb_sa_to_loopback(struct bpf_sock_addr *ctx, int v6sock, int v4,
                                              __u16 port)
{
    if (v6sock)
        mb_set_ctx_loopback6(ctx, v4);
    else
        ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = (__u32)port;
}

/* Is the calling process part of the meshed workload? Always for a pod (its netns is its
 * own); for a host workload only when it runs in the workload's cgroup or below: the host
 * netns also holds the agent, sshd and everything else of the machine, which istio-iptables
 * in a VM captures too but meshbpf need not. sock_addr hooks run in the context of the task
 * calling connect()/sendmsg(), so "current" is that process. (The helper exists for these
 * hooks since Linux 5.7, as bpf_get_netns_cookie does.) */
static __always_inline int mb_in_workload(const struct pod_config *pc, __u64 nc)
{
    if (!(pc->flags & POD_F_CGROUP_SCOPED))
        return 1;
    struct pod_cgroup *cg = pod_cgroups.lookup(&nc);
    if (!cg)
        return 0;                /* written before the pods entry: a half-made enrollment */
    return bpf_get_current_ancestor_cgroup_id(cg->level) == cg->id;
}

/* cgroup/connect4, connect6: see connect4.c and connect6.c. */
static __always_inline int mb_connect(struct bpf_sock_addr *ctx, int v6sock)
{
    int udp = ctx->type == MB_SOCK_DGRAM;
    if (ctx->type != MB_SOCK_STREAM && !udp)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || !mb_in_workload(pc, nc))
        return 1;
    if (udp && (__u16)ctx->user_port != MB_DNS_PORT_BE)
        goto udp_direct;         /* the only UDP Istio's rules redirect is DNS */
    __u32 ip[4];
    mb_sa_dst(ctx, v6sock, ip);
    int v4 = mb_is_mapped(ip);
    __u16 port = (__u16)ctx->user_port;
    if (!v4 && !(pc->flags & POD_F_IPV6)) {
        mb_trace_out(pc, nc, ip, port, udp, MB_TRACE_BYPASSED, MB_WHY_IPV6_OFF, 0);
        return 1;                /* IPv6 is captured only with enable_ipv6 */
    }
    __u32 src[4];
    mb_sa_src(ctx, v6sock, src);
    int why = 0;
    int verdict = mb_should_capture(pc, nc, ip, port, src, udp, &why);
    if (!verdict) {
        mb_trace_out(pc, nc, ip, port, udp, MB_TRACE_BYPASSED, why, 0);
        goto udp_direct;
    }
    if (udp) {
        if (mb_remember_dns(ctx, nc, ip, v4 ? MB_AF_INET : MB_AF_INET6,
                            ORIG_F_CONNECTED)) {
            mb_trace_out(pc, nc, ip, port, udp, MB_TRACE_REFUSED, MB_WHY_MAP_FULL, 0);
            return 0;            /* no room to record it: refuse (EPERM), never redirect */
        }
        mb_bind_source(ctx, nc, ip, v6sock);
        mb_count(COUNTER_DNS_REDIRECT, 1);
    } else {
        if (mb_remember(ctx, nc, ip, port, v4 ? MB_AF_INET : MB_AF_INET6)) {
            mb_trace_out(pc, nc, ip, port, udp, MB_TRACE_REFUSED, MB_WHY_MAP_FULL, 0);
            return 0;            /* no room to record it: refuse (EPERM), never redirect */
        }
        mb_count(verdict == MB_CAPTURE_DNS ? COUNTER_DNS_REDIRECT :
                 verdict == MB_CAPTURE_INBOUND ? COUNTER_REDIRECT_SELF : COUNTER_REDIRECT_OUT, 1);
    }
    __u16 to = mb_capture_port(pc, verdict);
    mb_trace_out(pc, nc, ip, port, udp, MB_TRACE_REDIRECTED, why, to);
    mb_sa_to_loopback(ctx, v6sock, v4, to);
    return 1;
udp_direct:
    if (udp)                     /* connected elsewhere: forget an earlier DNS redirect */
        mb_forget_dns(ctx, nc);
    return 1;
}

/* cgroup/sendmsg4, sendmsg6: see sendmsg4.c and sendmsg6.c. */
static __always_inline int mb_sendmsg(struct bpf_sock_addr *ctx, int v6sock)
{
    if (ctx->type != MB_SOCK_DGRAM || (__u16)ctx->user_port != MB_DNS_PORT_BE)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || !(pc->flags & POD_F_DNS) || !mb_in_workload(pc, nc))
        return 1;
    __u32 ip[4];
    mb_sa_dst(ctx, v6sock, ip);
    int v4 = mb_is_mapped(ip);
    if (!v4 && !(pc->flags & POD_F_IPV6))
        return 1;
    __u32 src[4];
    mb_sa_src(ctx, v6sock, src);
    int why;                     /* per datagram: not traced (connect4/6 trace DNS sockets) */
    if (mb_should_capture(pc, nc, ip, MB_DNS_PORT_BE, src, 1, &why) != MB_CAPTURE_DNS)
        return 1;
    if (mb_remember_dns(ctx, nc, ip, v4 ? MB_AF_INET : MB_AF_INET6, 0))
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    /* An unbound socket's query leaves from the source it has under iptables (the pod
     * address), so the DNS listener sees the app where Istio's does; the reply to it is
     * accepted (unbound socket), and recvmsg shows the server as its source. (An AF_INET6
     * socket: for an IPv6 server only.) */
    __u32 from[4];
    if (!v6sock) {
        if (!src[3] && mb_redirect_source(nc, ip, from))
            ctx->msg_src_ip4 = from[3];
    } else if (!v4 && !(src[0] | src[1] | src[2] | src[3]) &&
               mb_redirect_source(nc, ip, from)) {
        mb_copy_ip(ctx->msg_src_ip6, from);
    }
    mb_sa_to_loopback(ctx, v6sock, v4, pc->dns_port);
    mb_count(COUNTER_DNS_REDIRECT, 1);
    return 1;
}

#endif /* MESHBPF_LIB_OUTBOUND_H */
