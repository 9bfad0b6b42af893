/* cgroup/connect6: like connect4 for AF_INET6 sockets. A v4-mapped destination follows the
 * IPv4 rules and goes to ::ffff:127.0.0.1; a real IPv6 one (only when the pod captures
 * IPv6, Istio's enable_ipv6) goes to [::1]:<proxy_port>. UDP: DNS only, as in connect4. */
#include "lib/outbound.h"

int mb_connect6(struct bpf_sock_addr *ctx)
{
    return mb_connect(ctx, 1);
}
