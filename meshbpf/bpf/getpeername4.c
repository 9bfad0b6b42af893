/* cgroup/getpeername4: an app whose connect was redirected sees the peer it dialled (TCP,
 * or the DNS server of a connect()ed UDP socket). */
#include "lib/conn.h"

int mb_getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = mb_dialled(ck);
    if (!o || !mb_is_mapped(o->ip))
        return 1;
    ctx->user_ip4 = o->ip[3];
    ctx->user_port = (__u32)o->port;
    mb_count(COUNTER_PEERNAME, 1);
    return 1;
}
