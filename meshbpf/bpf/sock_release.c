/* cgroup/sock_release: when any socket of the node's meshed cgroups is released, drop its
 * orig_dst and dns_orig entries (keyed by socket cookie). sockops already deletes orig_dst
 * on TCP_CLOSE; this also catches UDP sockets (DNS) and sockets that never reach a TCP
 * state callback (a connect that failed before the SYN left). Optional: kernels before
 * 5.9 lack the hook and then rely on sockops (and dns_orig's LRU) alone. */
#include "lib/conn.h"

int mb_sock_release(struct bpf_sock *sk)
{
    __u64 ck = mb_socket_cookie(sk);
    __u64 nc = bpf_get_netns_cookie(sk);
    mb_forget(&ck, &nc);
    if (dns_orig.delete(&ck) == 0)
        mb_uncharge(&nc);
    return 1;
}
