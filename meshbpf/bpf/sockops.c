/* sockops: per-connection bookkeeping and same-node splicing.
 *  - TCP_CONNECT of a redirected app socket: ask for state callbacks (so a refused connect
 *    still cleans up its orig_dst entry).
 *  - ESTABLISHED (active/passive) in a meshed pod: copy orig_dst to `pairs` under the app
 *    socket's tuple (getsockopt finds it from the sidecar's end); if splicing is on and
 *    the peer is on this node (loopback, or a pod IP in local_ips), put the socket in
 *    sock_hash. (Inbound sockets need nothing special: tc_inbound assigns the SYN to the
 *    15006 listener unrewritten, so the accepted socket's tuple mirrors the peer's.)
 *  - STATE_CB -> TCP_CLOSE: delete orig_dst and the pair entry.
 *  - TCP_LISTEN_CB on a meshed pod's capture port: register the listener in
 *    capture_listeners (inbound: sk_lookup.c's TIME_WAIT path).
 *  - HDR_OPT_LEN_CB (every segment a spliced socket sends, ACKs and window updates
 *    included): publish how far it has read (splice backpressure, lib/splice.h). */
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/addr.h"
#include "lib/conn.h"
#include "lib/splice.h"

static __always_inline int mb_ops_key(struct bpf_sock_ops *skops, struct sock_key *k, __u64 nc)
{
    __u32 family = skops->family;
    if (mb_addr(family, &skops->local_ip4, skops->local_ip6, k->local_ip) < 0)
        return -1;
    mb_addr(family, &skops->remote_ip4, skops->remote_ip6, k->remote_ip);
    k->local_port = bpf_htons((__u16)skops->local_port);
    k->remote_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
    if (mb_is_loopback(k->local_ip) || mb_is_loopback(k->remote_ip))
        k->netns = nc;
    return 0;
}

static __always_inline void mb_want_cb(struct bpf_sock_ops *skops, int flags)
{
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | flags);
}
#define mb_want_state_cb(skops) mb_want_cb(skops, BPF_SOCK_OPS_STATE_CB_FLAG)

#ifdef MB_NO_NC_SOCKOPT
/* getsockopt cannot tell pods apart (no bpf_get_netns_cookie there before 5.15), and two
 * pods' loopback connections may have the same 4-tuple: at the sidecar's accept (`k`: its
 * own tuple, loopback, with the netns) the app's entry moves onto the accepted socket
 * itself (sk_orig), where getsockopt finds it without any key. */
static __always_inline void mb_pair_to_sockopt(struct bpf_sock_ops *skops, struct sock_key *k)
{
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    struct sock_key app = {};
    mb_key_reverse(&app, k);
    struct orig_dst *o = pairs.lookup(&app);
    if (!o)
        return;
    struct orig_dst *so = sk_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!so) {
        mb_count(COUNTER_PAIRS_FULL, 1);   /* getsockopt answers nothing, not 15001 */
        return;
    }
    mb_copy_ip(so->ip, o->ip);
    so->port = o->port;
    so->family = o->family;
    so->flags = 0;
    pairs.delete(&app);
}
#endif

static __always_inline void mb_established(struct bpf_sock_ops *skops)
{
    __u64 nc = mb_ops_netns(skops);
    struct pod_config *pc = pods.lookup(&nc);
    __u64 ck = mb_socket_cookie(skops);
    struct orig_dst *o = orig_dst.lookup(&ck);
    struct sock_key k = {};
    if (mb_ops_key(skops, &k, nc) < 0)
        return;
#ifdef MB_NO_NC_SOCKOPT
    if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && k.netns)
        mb_pair_to_sockopt(skops, &k);
#endif
    if (o) {
        struct orig_dst copy = {};
        mb_copy_ip(copy.ip, o->ip);
        copy.port = o->port;
        copy.family = o->family;
        if (pairs.update(&k, &copy) != 0)
            mb_count(COUNTER_PAIRS_FULL, 1);   /* getsockopt answers nothing, not 15001 */
        mb_want_state_cb(skops);
    }
    if (!pc)
        return;              /* not a meshed pod's socket */
    mb_want_state_cb(skops);

    __u32 zero = 0;
    struct node_config *ncfg = node_cfg.lookup(&zero);
    if (!ncfg || !(ncfg->flags & NODE_F_SPLICE))
        return;
    if (!k.netns) {
        struct ip_key rk = {};
        mb_copy_ip(rk.ip, k.remote_ip);
        if (!local_ips.lookup(&rk))
            return;              /* remote peer: normal path */
        /* Pod-IP keys carry no netns, so only the registered owner of the local address
         * may put one in (a pod using an address another pod is enrolled with, e.g. an
         * overlapping address on an isolated secondary network, is not spliced). */
        struct ip_key lk = {};
        mb_copy_ip(lk.ip, k.local_ip);
        __u32 *owner = local_ips.lookup(&lk);
        if (!owner || *owner != pc->pod_index)
            return;
    }
    /* bcc rewrites map.sock_hash_update(...) into a statement ending in ';' */
    long err = sock_hash.sock_hash_update(skops, &k, BPF_ANY);
    if (err == 0) {
        mb_count(COUNTER_SOCKHASH_ADD, 1);
        /* segments of a spliced socket are rare (handshake, FIN) until a direction leaves
         * the splice; then its ACKs are how the writer learns the reader caught up */
        mb_want_cb(skops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
    }
}

/* This socket as a reader of a direction that left the splice: publish copied_seq.
 * (Compiled only with splicing, which brings the BTF offsets.) */
static __always_inline void mb_ops_publish_copied(struct bpf_sock_ops *skops)
{
#ifdef MB_TCP_COPIED_SEQ_OFF
    struct bpf_sock *sk = skops->sk;
    if (!skops->is_fullsock || !sk)
        return;
    struct sock_key k = {};
    if (mb_ops_key(skops, &k, mb_ops_netns(skops)) < 0)
        return;
    mb_splice_publish(&k, sk);
#endif
}

static __always_inline void mb_closed(struct bpf_sock_ops *skops)
{
    __u64 ck = mb_socket_cookie(skops);
    __u64 nc = mb_ops_netns(skops);
    mb_forget(&ck, &nc);
    struct sock_key k = {};
    if (mb_ops_key(skops, &k, nc) < 0)
        return;
    /* As the app: our entry goes once the sidecar has read it (else the sidecar's end
     * removes it when it closes, so a short-lived client cannot race the proxy's accept). */
    struct orig_dst *o = pairs.lookup(&k);
    if (o && (o->flags & ORIG_F_ANSWERED))
        pairs.delete(&k);
    /* As the sidecar's accepted end: the app's entry is keyed by our tuple reversed. */
    struct sock_key sw = {};
    mb_key_reverse(&sw, &k);
    pairs.delete(&sw);
    splice_dirs.delete(&k);
    splice_dirs.delete(&sw);
    mb_count(COUNTER_CLOSED, 1);
}

/* LISTEN_CB (fires for every listen(), no cb flags needed): a socket that starts listening
 * on a meshed pod's inbound capture port (pods[netns].inbound_port), on the wildcard or a
 * non-loopback address, becomes the pod's capture listener for sk_lookup (lib/inbound.h).
 * The entry goes when the socket closes; a restarted sidecar's new listener replaces it
 * here. */
static __always_inline void mb_listen(struct bpf_sock_ops *skops)
{
    __u64 nc = mb_ops_netns(skops);
    struct pod_config *pc = pods.lookup(&nc);
    if (!pc || bpf_htons((__u16)skops->local_port) != pc->inbound_port)
        return;
    __u32 family = skops->family;
    __u32 ip[4] = {};
    if (mb_addr(family, &skops->local_ip4, skops->local_ip6, ip) < 0)
        return;
    int any = ip[0] == 0 && ip[1] == 0 && ip[3] == 0 &&
              (ip[2] == 0 || ip[2] == bpf_htonl(0x0000ffff));   /* 0.0.0.0 or :: */
    if (!any && mb_is_loopback(ip))
        return;                  /* 127/8 or ::1: not reachable from the pod's interfaces */
    struct capture_listener_key lk = {};
    lk.netns = nc;
    lk.port = pc->inbound_port;
    lk.family = family;
    /* bcc rewrites map.sock_hash_update(...) into a statement ending in ';' */
    long err = capture_listeners.sock_hash_update(skops, &lk, BPF_ANY);
    (void)err;
}

int mb_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        __u64 ck = mb_socket_cookie(skops);
        if (orig_dst.lookup(&ck))
            mb_want_state_cb(skops);
    } else if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
               op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        mb_established(skops);
    } else if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] == MB_TCP_CLOSE)
            mb_closed(skops);
    } else if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
        mb_listen(skops);
    } else if (op == BPF_SOCK_OPS_HDR_OPT_LEN_CB) {
        mb_ops_publish_copied(skops);
    }
    return 1;
}
