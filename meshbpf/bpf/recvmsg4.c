/* cgroup/recvmsg4: a DNS reply from the sidecar (<dns_port> on 127.0.0.1 or one of the
 * pod's own addresses) to a socket whose query sendmsg4 redirected shows the server the
 * app asked as its source. */
#include "lib/conn.h"
#include "lib/netns.h"

int mb_recvmsg4(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = dns_orig.lookup(&ck);
    if (!o || !mb_is_mapped(o->ip))
        return 1;
    /* From the listener: 127.0.0.1, or (a wildcard listener answering the pod address
     * sendmsg4 sent the query from) the address the route picks, one of the pod's own. */
    __u64 nc = bpf_get_netns_cookie(ctx);
    __u32 src[4];
    mb_map4(src, ctx->user_ip4);
    if (!mb_is_local(nc, src))
        return 1;
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || (__u16)ctx->user_port != pc->dns_port)
        return 1;
    ctx->user_ip4 = o->ip[3];
    ctx->user_port = (__u32)o->port;
    mb_count(COUNTER_DNS_REPLY, 1);
    return 1;
}
