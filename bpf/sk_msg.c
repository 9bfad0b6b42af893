/* sk_msg (attached to sock_hash): bytes a spliced socket sends go straight into its
 * same-node peer's receive queue (BPF_F_INGRESS), skipping TCP/IP. The peer's key is this
 * socket's tuple reversed. No peer in the map -> SK_PASS, the normal path. */
#include "meshbpf.h"

int mb_sk_msg(struct sk_msg_md *msg)
{
    struct sock_key k = {};
    __u32 family = msg->family;
    if (family == MB_AF_INET) {
        mb_map4(k.local_ip, msg->remote_ip4);
        mb_map4(k.remote_ip, msg->local_ip4);
    } else if (family == MB_AF_INET6) {
        k.local_ip[0] = msg->remote_ip6[0];
        k.local_ip[1] = msg->remote_ip6[1];
        k.local_ip[2] = msg->remote_ip6[2];
        k.local_ip[3] = msg->remote_ip6[3];
        k.remote_ip[0] = msg->local_ip6[0];
        k.remote_ip[1] = msg->local_ip6[1];
        k.remote_ip[2] = msg->local_ip6[2];
        k.remote_ip[3] = msg->local_ip6[3];
    } else {
        return SK_PASS;
    }
    k.local_port = bpf_htons((__u16)bpf_ntohl(msg->remote_port));
    k.remote_port = bpf_htons((__u16)msg->local_port);
    if (mb_is_loopback(k.local_ip) || mb_is_loopback(k.remote_ip))
        k.netns = bpf_get_netns_cookie(msg);
    __u32 size = msg->size;
    long r = sock_hash.msg_redirect_hash(msg, &k, BPF_F_INGRESS);
    if (r == SK_PASS) {
        mb_count(COUNTER_SPLICE_MSGS, 1);
        mb_count(COUNTER_SPLICE_BYTES, size);
    } else {
        mb_count(COUNTER_SPLICE_MISS, 1);
    }
    return SK_PASS;
}
