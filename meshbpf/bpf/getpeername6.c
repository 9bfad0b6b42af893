/* cgroup/getpeername6: the same for AF_INET6 sockets (v4-mapped or IPv6 destinations). */
#include "lib/conn.h"

int mb_getpeername6(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = mb_dialled(ck);
    if (!o)
        return 1;
    mb_set_ctx_ip6(ctx, o->ip);
    ctx->user_port = (__u32)o->port;
    mb_count(COUNTER_PEERNAME, 1);
    return 1;
}
