/* cgroup/connect4: rewrite a meshed pod's outbound TCP connect to 127.0.0.1:<proxy_port>
 * (TCP DNS to a captured server: to <dns_port>; the proxy dialling its own pod's IP: to
 * <inbound_port>, Istio's ISTIO_IN_REDIRECT). A UDP connect to port 53 that the pod's DNS
 * capture takes goes to 127.0.0.1:<dns_port> too: glibc's resolver and Go connect() their
 * UDP socket and then send(), which sendmsg4 never sees.
 * A redirected TCP socket keeps its loopback source: binding it first to the source it has
 * under iptables (mb_bind_source, as connected UDP is) would show the sidecar the app's pod
 * address as Istio does, but cut new connections per second to a quarter here
 * (docs/differences.md); getsockname4 gives the app its iptables source.
 * The original destination is kept in orig_dst (by socket cookie) for sockops/getpeername;
 * a UDP socket's in dns_orig for recvmsg4 and getpeername4. A connect that cannot be
 * recorded fails with EPERM (lib/conn.h). */
#include "lib/outbound.h"

int mb_connect4(struct bpf_sock_addr *ctx)
{
    return mb_connect(ctx, 0);
}
