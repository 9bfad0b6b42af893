/* cgroup/sock_release: when any socket of the node's meshed cgroups is released, drop its
 * orig_dst entry (keyed by socket cookie). sockops already deletes it on TCP_CLOSE; this
 * catches the sockets that never reach a TCP state callback (a connect that failed before
 * the SYN left, a socket closed while connecting). Optional: kernels before 5.9 lack the
 * hook and then rely on sockops alone. */
#include "meshbpf.h"

int mb_sock_release(struct bpf_sock *sk)
{
    __u64 ck = mb_socket_cookie(sk);
    orig_dst.delete(&ck);
    return 1;
}
