/* cgroup/getsockname4: an app whose connect was redirected to 127.0.0.1 sees the local
 * address it has under iptables, where REDIRECT rewrites the destination only after the
 * kernel chose the source for the original one: its pod address (or, for one of its own
 * addresses, that address). The port is the socket's own in both modes. connect4 binds an
 * unbound socket to that address already; this is for one the app bound to a port on the
 * wildcard address (connect then picks 127.0.0.1, a bpf_bind is refused), and UDP DNS. */
#include "lib/conn.h"
#include "lib/netns.h"

int mb_getsockname4(struct bpf_sock_addr *ctx)
{
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *o = mb_dialled(ck);
    if (!o || !mb_is_mapped(o->ip))
        return 1;
    if (ctx->user_ip4 != bpf_htonl(0x7f000001))
        return 1;                /* bound elsewhere by the app: already what it asked for */
    __u32 src[4];
    if (!mb_redirect_source(bpf_get_netns_cookie(ctx), o->ip, src))
        return 1;
    ctx->user_ip4 = src[3];
    return 1;
}
