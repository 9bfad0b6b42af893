/* cgroup/recvmsg6: recvmsg4 for AF_INET6 UDP sockets (v4-mapped or IPv6 servers). */
#include "lib/conn.h"
#include "lib/netns.h"

int mb_recvmsg6(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = dns_orig.lookup(&ck);
    if (!o)
        return 1;
    __u32 src[4];
    mb_ctx_ip6(ctx, src);
    __u64 nc = bpf_get_netns_cookie(ctx);
    if (!mb_is_local(nc, src))   /* loopback or a pod address: see recvmsg4 */
        return 1;
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || (__u16)ctx->user_port != pc->dns_port)
        return 1;
    mb_set_ctx_ip6(ctx, o->ip);
    ctx->user_port = (__u32)o->port;
    mb_count(COUNTER_DNS_REPLY, 1);
    return 1;
}
