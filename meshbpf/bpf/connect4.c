/* cgroup/connect4: rewrite a meshed pod's outbound TCP connect to 127.0.0.1:<proxy_port>
 * (TCP DNS to a captured server: to <dns_port>; the proxy dialling its own pod's IP: to
 * <inbound_port>, Istio's ISTIO_IN_REDIRECT). A UDP connect to port 53 that the pod's DNS
 * capture takes goes to 127.0.0.1:<dns_port> too: glibc's resolver and Go connect() their
 * UDP socket and then send(), which sendmsg4 never sees.
 * A redirected TCP socket keeps its loopback source: binding it first to the source it has
 * under iptables (mb_bind_source, as connected UDP is) would show the sidecar the app's pod
 * address as Istio does, but cut new connections per second to a quarter here
 * (docs/differences.md); getsockname4 gives the app its iptables source.
 * The original destination is kept in orig_dst (by socket cookie) for sockops/getpeername;
 * a UDP socket's in dns_orig for recvmsg4 and getpeername4. A connect that cannot be
 * recorded fails with EPERM (meshbpf.h, "Full maps"). */
#include "meshbpf.h"

int mb_connect4(struct bpf_sock_addr *ctx)
{
    int udp = ctx->type == MB_SOCK_DGRAM;
    if (ctx->type != MB_SOCK_STREAM && !udp)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc)
        return 1;
    if (udp && (__u16)ctx->user_port != MB_DNS_PORT_BE)
        goto udp_direct;         /* the only UDP Istio's rules redirect is DNS */
    __u32 ip[4];
    mb_map4(ip, ctx->user_ip4);
    __u16 port = (__u16)ctx->user_port;
    __u32 src[4];
    struct bpf_sock *sk = ctx->sk;
    mb_map4(src, sk ? sk->src_ip4 : 0);
    int verdict = mb_should_capture(pc, nc, ip, port, src, udp);
    if (!verdict)
        goto udp_direct;
    if (udp) {
        if (mb_remember_dns(ctx, nc, ip, MB_AF_INET, ORIG_F_CONNECTED))
            return 0;            /* no room to record it: refuse (EPERM), never redirect */
        mb_bind_source(ctx, nc, ip, 0);
        mb_count(COUNTER_DNS_REDIRECT, 1);
    } else if (mb_remember(ctx, nc, ip, port, MB_AF_INET, verdict)) {
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    }
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = (__u32)mb_capture_port(pc, verdict);
    return 1;
udp_direct:
    if (udp)                     /* connected elsewhere: forget an earlier DNS redirect */
        mb_forget_dns(ctx, nc);
    return 1;
}
