/* maps.h — every node-wide map (the per-CPU `counters` array is in counters.h, with its
 * index).
 *
 * Why one header: bcc compiles all programs as ONE module (meshbpf/ebpf/loader.py inlines
 * each header once), so every map is shared by every program and pinned once per node under
 * <pin prefix>/maps/<name>. Names, key and value types and sizes are part of the pins: the
 * loader, Python's map access (meshbpf/ebpf/maps.py) and an already running node depend on
 * them. Layouts are in types.h.
 *
 * Who uses what:
 *   pods          connect4/6 (membership, proxy port, uids), sockops (meshed?),
 *                 getsockopt (meshed? -> answer the local address) — written by Python
 *   cidr_rules    connect4/6 (outbound CIDR include/exclude)   — written by Python
 *   port_rules    connect4/6 (outbound port include/exclude)   — written by Python
 *   local_ips     sockops (is the peer on this node? => splice) — written by Python
 *   netns_addrs   connect4/6, sendmsg4/6, getsockname4/6 (is an address one of the socket's
 *                 netns's own, i.e. reached over `lo`?) — written by Python
 *   netns_src     connect4/6, getsockname4/6 (the address the kernel picks as source) — Python
 *   pod_cgroups   connect4/6, sendmsg4/6 (is the caller in a host workload's cgroup?) — Python
 *   netns_ino     sockops, sk_msg on kernels without their netns cookie (conn.h) — Python
 *   sk_orig       sockops write, getsockopt read (only MB_NO_NC_SOCKOPT; not pinned)
 *   node_cfg      sockops (splice on/off)                      — written by Python
 *   orig_dst      connect4/6 write, getpeername4/6 read, sockops copy + delete,
 *                 sock_release delete
 *   dns_orig      sendmsg4/6 and connect4/6 (connected UDP) write, recvmsg4/6 read,
 *                 getpeername4/6 and getsockname4/6 read (connected UDP), sock_release
 *                 and connect4/6 (connected elsewhere) delete (by cookie; LRU only on
 *                 kernels without sock_release, see MB_NO_SOCK_RELEASE)
 *   pairs         sockops write/delete, getsockopt read
 *   pod_conns     connect4/6 + sendmsg4/6 count up, sockops/sock_release count down
 *                 (the per-pod share of orig_dst and dns_orig; see conn.h)
 *   sock_hash     sockops insert, sk_msg redirect
 *   splice_dirs   sk_msg, sockops (splice.h)
 *   inbound_pods, inbound_ports, inbound_ifaces   tc_inbound, sk_lookup (inbound.h)
 *   inbound_tw, inbound_netns, capture_listeners  tc_inbound, sk_lookup, sockops (inbound.h)
 */
#ifndef MESHBPF_LIB_MAPS_H
#define MESHBPF_LIB_MAPS_H

#include "types.h"

BPF_HASH(pods, __u64, struct pod_config, MB_MAX_PODS);
BPF_LPM_TRIE(cidr_rules, struct cidr_key, __u32, 65536);
BPF_HASH(port_rules, struct port_key, __u32, 65536);
BPF_HASH(local_ips, struct ip_key, __u32, 65536);
BPF_ARRAY(node_cfg, struct node_config, 1);
/* orig_dst, pairs and dns_orig are plain hashes (no LRU: an evicted entry is a wrong
 * answer), emptied explicitly on close; full, they refuse new connections (conn.h). */
BPF_HASH(orig_dst, __u64, struct orig_dst, MB_MAX_CONNS);
/* pairs entries can outlive orig_dst's (until the sidecar's end closes): room for both */
BPF_HASH(pairs, struct sock_key, struct orig_dst, MB_MAX_CONNS * 2);
/* BPF_SOCKHASH spelled out: bcc before 0.21 or so (Debian 11's 0.18) has only the
 * two-argument form, with a u32 key. */
struct sock_hash_table_t {
    struct sock_key key;
    int leaf;
    int (*update)(struct sock_key *, int *);
    int (*delete)(struct sock_key *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct sock_hash_table_t sock_hash = { .max_entries = MB_MAX_CONNS * 2 };
BPF_ANNOTATE_KV_PAIR(sock_hash, struct sock_key, int);
#ifdef MB_NO_SOCK_RELEASE
/* No cgroup/sock_release (Linux < 5.9): nothing deletes a closed UDP socket's entry, so
 * LRU is the only way entries ever go. An evicted entry makes recvmsg leave the reply's
 * source as the sidecar's, which resolvers drop: a retry, never a wrong server. */
BPF_TABLE("lru_hash", __u64, struct orig_dst, dns_orig, MB_MAX_CONNS);
#else
BPF_HASH(dns_orig, __u64, struct orig_dst, MB_MAX_CONNS);
#endif
/* netns cookie -> entries of orig_dst + dns_orig the pod holds (its share, conn.h) */
BPF_HASH(pod_conns, __u64, __u64, MB_MAX_PODS);
BPF_HASH(netns_addrs, struct netns_addr_key, __u32, 65536);
BPF_HASH(netns_src, __u64, struct netns_src, MB_MAX_PODS);
/* netns cookie -> the host workload's cgroup (types.h); one host netns per node */
BPF_HASH(pod_cgroups, __u64, struct pod_cgroup, 64);
/* netns inode number -> netns cookie of each enrolled pod (Python). sock_ops and sk_msg read
 * it where the kernel has no bpf_get_netns_cookie for them (MB_NO_NC_SOCKOPS, conn.h). */
BPF_HASH(netns_ino, __u32, __u64, MB_MAX_PODS);
#ifdef MB_NO_NC_SOCKOPT
/* The sidecar's accepted end of a redirected loopback connection -> what the app dialled,
 * where getsockopt cannot tell pods' equal loopback 4-tuples apart (no netns cookie there
 * before 5.15): sockops puts it on the socket itself at accept; it goes with the socket. */
BPF_SK_STORAGE(sk_orig, struct orig_dst);
#endif

BPF_HASH(splice_dirs, struct sock_key, struct splice_dir, MB_MAX_CONNS);

BPF_HASH(inbound_pods, struct inbound_pod_key, struct inbound_pod_val, MB_MAX_PODS);
BPF_HASH(inbound_ports, struct inbound_port_key, __u32, 65536);
BPF_HASH(inbound_ifaces, __u32, struct inbound_iface_val, MB_MAX_PODS);
/* tc_inbound marks (value: bpf_ktime_get_ns()), mb_sk_lookup consumes (deletes) the mark in
 * the same softirq; LRU only for marks whose SYN the TIME_WAIT rejected (it then ACKs). */
BPF_TABLE("lru_hash", struct inbound_tw_key, __u64, inbound_tw, 4096);
/* pod IP -> its netns cookie (key of capture_listeners), written by inbound.py */
BPF_HASH(inbound_netns, struct inbound_pod_key, __u64, MB_MAX_PODS);
/* A SOCKHASH as BPF_SOCKHASH declares it, plus `lookup` (bcc 0.26's BPF_SOCKHASH has none;
 * sk_lookup.c looks listeners up, which yields a referenced socket to bpf_sk_release). */
struct capture_listeners_table_t {
    struct capture_listener_key key;
    int leaf;
    int *(*lookup)(struct capture_listener_key *);
    int (*update)(struct capture_listener_key *, int *);
    int (*delete)(struct capture_listener_key *);
    int (*sock_hash_update)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct capture_listeners_table_t capture_listeners = { .max_entries = MB_MAX_PODS * 4 };
BPF_ANNOTATE_KV_PAIR(capture_listeners, struct capture_listener_key, int);

#endif /* MESHBPF_LIB_MAPS_H */
