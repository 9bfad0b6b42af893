/* sk_msg (attached to sock_hash): bytes a spliced socket sends go straight into its
 * same-node peer's receive queue (BPF_F_INGRESS), skipping TCP/IP, while the direction is
 * within its budget (see "splice backpressure" in meshbpf.h); otherwise SK_PASS, the normal
 * TCP path, whose window blocks a writer that runs ahead. The peer's key is this socket's
 * tuple reversed. No peer in the map -> SK_PASS. */
#include "meshbpf.h"

/* This socket as a reader: publish how far it has read its TCP queue, for a peer that is
 * waiting on the TCP path to be drained before it splices again. */
static __always_inline void mb_msg_publish_copied(struct sk_msg_md *msg, struct sock_key *own)
{
    struct bpf_sock *sk = msg->sk;
    struct splice_dir *d = splice_dirs.lookup(own);
    if (d && d->mode == MB_SPLICE_TCP && sk)
        d->copied_seq = mb_tcp_u32(sk, MB_TCP_COPIED_SEQ_OFF);
}

int mb_sk_msg(struct sk_msg_md *msg)
{
    struct sock_key k = {};      /* the peer (reader) */
    struct sock_key own = {};
    __u32 family = msg->family;
    if (family == MB_AF_INET) {
        mb_map4(k.local_ip, msg->remote_ip4);
        mb_map4(k.remote_ip, msg->local_ip4);
    } else if (family == MB_AF_INET6) {
        mb_copy_ip(k.local_ip, (__u32 *)msg->remote_ip6);
        mb_copy_ip(k.remote_ip, (__u32 *)msg->local_ip6);
    } else {
        return SK_PASS;
    }
    k.local_port = bpf_htons((__u16)bpf_ntohl(msg->remote_port));
    k.remote_port = bpf_htons((__u16)msg->local_port);
    if (mb_is_loopback(k.local_ip) || mb_is_loopback(k.remote_ip))
        k.netns = bpf_get_netns_cookie(msg);
    own.netns = k.netns;
    mb_copy_ip(own.local_ip, k.remote_ip);
    mb_copy_ip(own.remote_ip, k.local_ip);
    own.local_port = k.remote_port;
    own.remote_port = k.local_port;
    mb_msg_publish_copied(msg, &own);

    __u32 size = msg->size;
    struct splice_dir *d = splice_dirs.lookup(&k);
    if (!d) {
        struct splice_dir fresh = {};
        splice_dirs.insert(&k, &fresh);
        d = splice_dirs.lookup(&k);
        if (!d) {                /* table full: never splice what we cannot account */
            mb_count(COUNTER_SPLICE_MISS, 1);
            return SK_PASS;
        }
    }
    if (d->mode == MB_SPLICE_TCP) {
        /* Every byte the TCP path carried has been read (so every spliced byte before them
         * too): the reader's queues are empty and splicing again cannot reorder. */
        struct bpf_sock *sk = msg->sk;
        if (!sk || mb_tcp_u32(sk, MB_TCP_WRITE_SEQ_OFF) != d->copied_seq) {
            mb_count(COUNTER_SPLICE_TCP_BYTES, size);
            return SK_PASS;
        }
        d->mode = MB_SPLICE_ON;
        d->spliced = 0;
        mb_count(COUNTER_SPLICE_REENTER, 1);
    }
    __u32 zero = 0;
    struct node_config *ncfg = node_cfg.lookup(&zero);
    __u32 limit = ncfg ? ncfg->splice_limit : 0;
    if (d->spliced + size > limit) {
        d->mode = MB_SPLICE_TCP;
        mb_count(COUNTER_SPLICE_EXIT, 1);
        mb_count(COUNTER_SPLICE_TCP_BYTES, size);
        return SK_PASS;
    }
    long r = sock_hash.msg_redirect_hash(msg, &k, BPF_F_INGRESS);
    if (r == SK_PASS) {
        d->spliced += size;
        mb_count(COUNTER_SPLICE_MSGS, 1);
        mb_count(COUNTER_SPLICE_BYTES, size);
    } else {
        /* No peer socket (yet): these bytes take TCP, so a later splice must wait for them. */
        d->mode = MB_SPLICE_TCP;
        mb_count(COUNTER_SPLICE_MISS, 1);
        mb_count(COUNTER_SPLICE_TCP_BYTES, size);
    }
    return SK_PASS;
}
