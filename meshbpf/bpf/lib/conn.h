/* conn.h — what a redirected socket dialled, remembered by socket cookie until it closes,
 * and each pod's share of that memory.
 *
 * Why: after the redirect only these records know the original destination (orig_dst for
 * TCP, dns_orig for UDP DNS): sockops copies it for the sidecar's SO_ORIGINAL_DST,
 * getpeername/getsockname/recvmsg give it back to the app. Full maps fail closed and never
 * answer wrong. A connect (or DNS send) whose original destination cannot be recorded is
 * refused (the cgroup hook returns 0: connect() and sendmsg() fail with EPERM) and counted
 * (COUNTER_CONN_REFUSED): redirecting it without an entry would make the sidecar read its
 * own 127.0.0.1:15001 as the original destination. One pod cannot starve the others: each
 * pod (netns cookie) may hold at most node_cfg.pod_conn_limit entries of orig_dst +
 * dns_orig (0: MB_MAX_CONNS / 2), counted in pod_conns, up at record time, down when the
 * entry is deleted on close. orig_dst, pairs and dns_orig are plain hashes (no LRU: an
 * evicted entry is a wrong answer), emptied explicitly by sockops STATE_CB (TCP_CLOSE) and
 * cgroup/sock_release.
 */
#ifndef MESHBPF_LIB_CONN_H
#define MESHBPF_LIB_CONN_H

#include "maps.h"
#include "counters.h"
#include "addr.h"

#define MB_POD_CONN_LIMIT_DEFAULT (MB_MAX_CONNS / 2)

/* bcc 0.26 declares bpf_get_socket_cookie as returning u32, which truncates the cookie. */
static __u64 (*mb_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#ifdef MB_NO_NC_SOCKOPS
/* bpf_skc_to_tcp_sock (137, Linux 5.9; sock_ops and sk_msg may call it from 5.10). */
static void *(*mb_tcp_sk_of)(void *sk) = (void *)137;

/* The netns cookie of a TCP socket, for kernels whose sock_ops and sk_msg cannot call
 * bpf_get_netns_cookie (before 5.15): its struct net through the kernel's BTF (offsets
 * from the running kernel, loader.netns_defines), whose inode number netns_ino maps to the
 * cookie Python enrolled the pod with. 0 (no pod, no netns in keys) for a socket that is
 * not a full TCP socket or whose netns is not enrolled: such a socket is nothing meshbpf
 * keeps state for, and the cgroup hooks, which do have the cookie, never key by 0. */
static __always_inline __u64 mb_sk_netns(void *sk)
{
    char *tp = sk ? mb_tcp_sk_of(sk) : 0;
    if (!tp)
        return 0;
    char *net = *(char *volatile *)(tp + MB_SK_NET_OFF);
    if (!net)
        return 0;
    __u32 ino = *(volatile __u32 *)(net + MB_NET_INUM_OFF);
    __u64 *nc = netns_ino.lookup(&ino);
    return nc ? *nc : 0;
}
#define mb_ops_netns(skops) mb_sk_netns((skops)->sk)
#define mb_msg_netns(msg) mb_sk_netns((msg)->sk)
#else
#define mb_ops_netns(skops) bpf_get_netns_cookie(skops)
#define mb_msg_netns(msg) bpf_get_netns_cookie(msg)
#endif

/* The pod's entry in pod_conns if it may record one more connection (or DNS socket), else
 * NULL (its share is used up). Concurrent connects of one pod may overshoot the limit by
 * the number of CPUs at most: it is a share, not an exact quota. */
static __always_inline __u64 *mb_share(__u64 *nc)
{
    __u32 zero = 0;
    struct node_config *ncfg = node_cfg.lookup(&zero);
    __u64 limit = ncfg && ncfg->pod_conn_limit ? ncfg->pod_conn_limit
                                               : MB_POD_CONN_LIMIT_DEFAULT;
    __u64 init = 0;
    pod_conns.insert(nc, &init);
    __u64 *cnt = pod_conns.lookup(nc);
    if (!cnt || *cnt >= limit)
        return 0;
    return cnt;
}

/* Give back the pod's share of a deleted entry (only the deleter that found it does). */
static __always_inline void mb_uncharge(__u64 *nc)
{
    __u64 *cnt = pod_conns.lookup(nc);
    if (cnt && *cnt)
        __sync_fetch_and_add(cnt, -1);
}

/* Delete the socket's orig_dst entry (on close) and give back its share. */
static __always_inline void mb_forget(__u64 *ck, __u64 *nc)
{
    if (orig_dst.delete(ck) == 0)
        mb_uncharge(nc);
}

/* Record what the socket dialled (`ip`, `port`, `family`, ORIG_F_* `flags`) under its
 * cookie, in dns_orig (`dns`) or orig_dst, charged to the pod's share once per socket; -1
 * if there is no room: the connect or send must then be refused, not redirected. `dns` is
 * a constant at each caller. */
static __always_inline int mb_record(void *ctx, __u64 nc, const __u32 *ip, __u16 port,
                                     __u16 family, __u32 flags, int dns)
{
    struct orig_dst od = {};
    mb_copy_ip(od.ip, ip);
    od.port = port;
    od.family = family;
    od.flags = flags;
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *prev = dns ? dns_orig.lookup(&ck) : orig_dst.lookup(&ck);
    if (prev) {
        /* the same socket again (a new query, or a connect after a failed attempt):
         * already charged */
        __builtin_memcpy(prev, &od, sizeof(od));
        return 0;
    }
    __u64 *cnt = mb_share(&nc);
    if (!cnt || (dns ? dns_orig.insert(&ck, &od) : orig_dst.insert(&ck, &od)) != 0) {
        mb_count(COUNTER_CONN_REFUSED, 1);
        return -1;
    }
    __sync_fetch_and_add(cnt, 1);
    return 0;
}

/* What a TCP socket dialled, for sockops (SO_ORIGINAL_DST) and getpeername. */
static __always_inline int mb_remember(void *ctx, __u64 nc, const __u32 *ip, __u16 port,
                                       __u16 family)
{
    return mb_record(ctx, nc, ip, port, family, 0, 0);
}

/* A UDP DNS redirect: recvmsg4/6 give the replies the server's address (conntrack un-NATs
 * them under iptables). `flags` ORIG_F_CONNECTED for a connect()ed socket
 * (getpeername/getsockname then answer from it too). UDP keeps no orig_dst entry. */
static __always_inline int mb_remember_dns(void *ctx, __u64 nc, const __u32 *ip, __u16 family,
                                           __u32 flags)
{
    return mb_record(ctx, nc, ip, MB_DNS_PORT_BE, family, flags, 1);
}

/* A UDP socket connected elsewhere: forget its DNS redirect and give back its share. */
static __always_inline void mb_forget_dns(void *ctx, __u64 nc)
{
    __u64 ck = mb_socket_cookie(ctx);
    if (dns_orig.delete(&ck) == 0)
        mb_uncharge(&nc);
}

/* What a redirected socket dialled: orig_dst (TCP), else the DNS server a connect()ed UDP
 * socket was redirected from. */
static __always_inline struct orig_dst *mb_dialled(__u64 ck)
{
    struct orig_dst *o = orig_dst.lookup(&ck);
    if (o)
        return o;
    o = dns_orig.lookup(&ck);
    if (o && (o->flags & ORIG_F_CONNECTED))
        return o;
    return NULL;
}

#endif /* MESHBPF_LIB_CONN_H */
