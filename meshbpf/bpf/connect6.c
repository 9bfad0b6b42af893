/* cgroup/connect6: like connect4 for AF_INET6 sockets. A v4-mapped destination follows the
 * IPv4 rules and goes to ::ffff:127.0.0.1; a real IPv6 one (only when the pod captures
 * IPv6, Istio's enable_ipv6) goes to [::1]:<proxy_port>. UDP: DNS only, as in connect4. */
#include "meshbpf.h"

int mb_connect6(struct bpf_sock_addr *ctx)
{
    int udp = ctx->type == MB_SOCK_DGRAM;
    if (ctx->type != MB_SOCK_STREAM && !udp)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc)
        return 1;
    if (udp && (__u16)ctx->user_port != MB_DNS_PORT_BE)
        goto udp_direct;
    __u32 ip[4];
    mb_ctx_ip6(ctx, ip);
    int v4 = mb_is_mapped(ip);
    if (!v4 && !(pc->flags & POD_F_IPV6))
        return 1;
    __u16 port = (__u16)ctx->user_port;
    __u32 src[4] = {};
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        src[0] = sk->src_ip6[0];
        src[1] = sk->src_ip6[1];
        src[2] = sk->src_ip6[2];
        src[3] = sk->src_ip6[3];
    }
    int verdict = mb_should_capture(pc, nc, ip, port, src, udp);
    if (!verdict)
        goto udp_direct;
    if (udp) {
        if (mb_remember_dns(ctx, nc, ip, v4 ? MB_AF_INET : MB_AF_INET6, ORIG_F_CONNECTED))
            return 0;            /* no room to record it: refuse (EPERM), never redirect */
        mb_bind_source(ctx, nc, ip, 1);
        mb_count(COUNTER_DNS_REDIRECT, 1);
    } else if (mb_remember(ctx, nc, ip, port, v4 ? MB_AF_INET : MB_AF_INET6, verdict)) {
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    }
    mb_set_ctx_loopback6(ctx, v4);
    ctx->user_port = (__u32)mb_capture_port(pc, verdict);
    return 1;
udp_direct:
    if (udp)                     /* connected elsewhere: forget an earlier DNS redirect */
        mb_forget_dns(ctx, nc);
    return 1;
}
