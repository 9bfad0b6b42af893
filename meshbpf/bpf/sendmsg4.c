/* cgroup/sendmsg4: a meshed pod's UDP DNS query (port 53) to a captured server, sent on an
 * unconnected socket, goes to the sidecar's DNS listener, 127.0.0.1:<dns_port> (Istio's
 * redirect_dns; every server with capture_all_dns, else only dns_servers_v4), decided by
 * the same rules as connect4 (port excludes, the proxy's ids, owner groups, in Istio's
 * order). Connected sockets are connect4's. The server the app asked is kept in dns_orig
 * (by socket cookie) for recvmsg4. */
#include "lib/outbound.h"

int mb_sendmsg4(struct bpf_sock_addr *ctx)
{
    return mb_sendmsg(ctx, 0);
}
