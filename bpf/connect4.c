/* cgroup/connect4: rewrite a meshed pod's outbound TCP connect to 127.0.0.1:<proxy_port>
 * (TCP DNS to a captured server: to <dns_port>; the proxy dialling its own pod's IP: to
 * <inbound_port>, Istio's ISTIO_IN_REDIRECT).
 * The original destination is kept in orig_dst (by socket cookie) for sockops/getpeername;
 * a connect that cannot be recorded fails with EPERM (meshbpf.h, "Full maps"). */
#include "meshbpf.h"

int mb_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != MB_SOCK_STREAM)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc)
        return 1;
    __u32 ip[4];
    mb_map4(ip, ctx->user_ip4);
    __u16 port = (__u16)ctx->user_port;
    __u32 src[4];
    struct bpf_sock *sk = ctx->sk;
    mb_map4(src, sk ? sk->src_ip4 : 0);
    int verdict = mb_should_capture(pc, ip, port, src);
    if (!verdict)
        return 1;
    if (mb_remember(ctx, nc, ip, port, MB_AF_INET, verdict))
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = (__u32)mb_capture_port(pc, verdict);
    return 1;
}
