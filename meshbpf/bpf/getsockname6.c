/* cgroup/getsockname6: getsockname4 for AF_INET6 sockets (v4-mapped or IPv6 destinations:
 * the socket was redirected to ::ffff:127.0.0.1 or ::1). */
#include "lib/conn.h"
#include "lib/netns.h"

int mb_getsockname6(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = mb_dialled(ck);
    if (!o)
        return 1;
    __u32 cur[4];
    mb_ctx_ip6(ctx, cur);
    if (cur[0] || cur[1] || (mb_is_mapped(cur) ? cur[3] != bpf_htonl(0x7f000001)
                                               : (cur[2] || cur[3] != bpf_htonl(1))))
        return 1;                /* not the loopback address the redirect gave it */
    __u32 src[4];
    if (!mb_redirect_source(bpf_get_netns_cookie(ctx), o->ip, src))
        return 1;
    mb_set_ctx_ip6(ctx, src);
    return 1;
}
