/* cgroup/sendmsg6: sendmsg4 for AF_INET6 UDP sockets; a v4-mapped server follows the IPv4
 * rules (to ::ffff:127.0.0.1), an IPv6 one (pods capturing IPv6) goes to [::1]. */
#include "lib/outbound.h"

int mb_sendmsg6(struct bpf_sock_addr *ctx)
{
    return mb_sendmsg(ctx, 1);
}
