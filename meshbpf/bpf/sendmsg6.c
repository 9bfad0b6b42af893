/* cgroup/sendmsg6: sendmsg4 for AF_INET6 UDP sockets; a v4-mapped server follows the IPv4
 * rules (to ::ffff:127.0.0.1), an IPv6 one (pods capturing IPv6) goes to [::1]. */
#include "meshbpf.h"

int mb_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != MB_SOCK_DGRAM || (__u16)ctx->user_port != MB_DNS_PORT_BE)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || !(pc->flags & POD_F_DNS))
        return 1;
    __u32 ip[4];
    mb_ctx_ip6(ctx, ip);
    int v4 = mb_is_mapped(ip);
    if (!v4 && !(pc->flags & POD_F_IPV6))
        return 1;
    __u32 src[4] = {};
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        src[0] = sk->src_ip6[0];
        src[1] = sk->src_ip6[1];
        src[2] = sk->src_ip6[2];
        src[3] = sk->src_ip6[3];
    }
    if (mb_should_capture(pc, nc, ip, MB_DNS_PORT_BE, src, 1) != MB_CAPTURE_DNS)
        return 1;
    if (mb_remember_dns(ctx, nc, ip, v4 ? MB_AF_INET : MB_AF_INET6, 0))
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    /* As sendmsg4: an unbound socket's query leaves from its iptables source. */
    __u32 from[4];
    if (!v4 && !(src[0] | src[1] | src[2] | src[3]) && mb_redirect_source(nc, ip, from)) {
        ctx->msg_src_ip6[0] = from[0];
        ctx->msg_src_ip6[1] = from[1];
        ctx->msg_src_ip6[2] = from[2];
        ctx->msg_src_ip6[3] = from[3];
    }
    mb_set_ctx_loopback6(ctx, v4);
    ctx->user_port = (__u32)pc->dns_port;
    mb_count(COUNTER_DNS_REDIRECT, 1);
    return 1;
}
