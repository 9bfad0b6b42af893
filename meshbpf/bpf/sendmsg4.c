/* cgroup/sendmsg4: a meshed pod's UDP DNS query (port 53) to a captured server, sent on an
 * unconnected socket, goes to the sidecar's DNS listener, 127.0.0.1:<dns_port> (Istio's
 * redirect_dns; every server with capture_all_dns, else only dns_servers_v4), decided by
 * the same rules as connect4 (port excludes, the proxy's ids, owner groups, in Istio's
 * order). Connected sockets are connect4's. The server the app asked is kept in dns_orig
 * (by socket cookie) for recvmsg4. */
#include "meshbpf.h"

int mb_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != MB_SOCK_DGRAM || (__u16)ctx->user_port != MB_DNS_PORT_BE)
        return 1;
    __u64 nc = bpf_get_netns_cookie(ctx);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || !(pc->flags & POD_F_DNS))
        return 1;
    __u32 ip[4];
    mb_map4(ip, ctx->user_ip4);
    __u32 src[4];
    struct bpf_sock *sk = ctx->sk;
    mb_map4(src, sk ? sk->src_ip4 : 0);
    if (mb_should_capture(pc, nc, ip, MB_DNS_PORT_BE, src, 1) != MB_CAPTURE_DNS)
        return 1;
    if (mb_remember_dns(ctx, nc, ip, MB_AF_INET, 0))
        return 0;                /* no room to record it: refuse (EPERM), never redirect */
    /* An unbound socket's query leaves from the source it has under iptables (the pod
     * address), so the DNS listener sees the app where Istio's does; the reply to it is
     * accepted (unbound socket), and recvmsg4 shows the server as its source. */
    __u32 from[4];
    if (!src[3] && mb_redirect_source(nc, ip, from))
        ctx->msg_src_ip4 = from[3];
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = (__u32)pc->dns_port;
    mb_count(COUNTER_DNS_REDIRECT, 1);
    return 1;
}
