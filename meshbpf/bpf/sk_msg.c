/* sk_msg (attached to sock_hash): bytes a spliced socket sends go straight into its
 * same-node peer's receive queue (BPF_F_INGRESS), skipping TCP/IP, while the direction is
 * within its budget (lib/splice.h); otherwise SK_PASS, the normal TCP path, whose window
 * blocks a writer that runs ahead. The peer's key is this socket's tuple reversed. No peer
 * in the map -> SK_PASS. */
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/addr.h"
#include "lib/conn.h"
#include "lib/splice.h"

int mb_sk_msg(struct sk_msg_md *msg)
{
    struct sock_key k = {};      /* the peer (reader) */
    struct sock_key own = {};
    __u32 family = msg->family;
    if (mb_addr(family, &msg->remote_ip4, msg->remote_ip6, k.local_ip) < 0)
        return SK_PASS;
    mb_addr(family, &msg->local_ip4, msg->local_ip6, k.remote_ip);
    k.local_port = bpf_htons((__u16)bpf_ntohl(msg->remote_port));
    k.remote_port = bpf_htons((__u16)msg->local_port);
    if (mb_is_loopback(k.local_ip) || mb_is_loopback(k.remote_ip))
        k.netns = mb_msg_netns(msg);
    mb_key_reverse(&own, &k);
    mb_splice_publish(&own, msg->sk);   /* this socket is the reader of the other direction */

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
    /* Not sock_hash.msg_redirect_hash(): bcc < 0.25 cannot rewrite it. The helper gets a
     * placeholder map fd the loader replaces with sock_hash's (loader.patch_map_fd). */
    long r = bpf_msg_redirect_hash(msg, (void *)bpf_pseudo_fd(1, MB_SOCKHASH_FD), &k,
                                   BPF_F_INGRESS);
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
