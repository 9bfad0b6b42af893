/* meshbpf.h — the ONE header shared by every meshbpf eBPF program: structs, maps, helpers.
 *
 * Owner: the eBPF core (connect4/6, getsockopt, getpeername4/6, sockops, sk_msg).
 * The section at the end marked "inbound (tc_inbound.c)" belongs to the inbound tc program.
 * meshbpf/ebpf/structs.py mirrors every struct and enum here in ctypes; change both together
 * (tests/unit/test_ebpf_structs.py parses this file and checks the mirror).
 *
 * bcc compiles all programs as ONE module (meshbpf/ebpf/loader.py concatenates this header
 * and the bpf/ C files, dropping their `#include "meshbpf.h"`), so every map below is shared.
 *
 * Conventions (every map, every program):
 *  - IP addresses are 16 bytes, IPv4 in v4-mapped form (::ffff:a.b.c.d), network order.
 *  - Ports stored in maps are in NETWORK byte order (__u16).
 *  - A key that contains a loopback address (127/8, ::1, ::ffff:127/104) also carries the
 *    socket's netns cookie, because loopback 4-tuples repeat in every pod; pod IPs are
 *    node-unique, so keys of pod-IP-only sockets carry netns 0 (both ends of a connection
 *    between two pods then compute the same key).
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
 *   node_cfg      sockops (splice on/off)                      — written by Python
 *   orig_dst      connect4/6 write, getpeername4/6 read, sockops copy + delete,
 *                 sock_release delete
 *   dns_orig      sendmsg4/6 and connect4/6 (connected UDP) write, recvmsg4/6 read,
 *                 getpeername4/6 and getsockname4/6 read (connected UDP), sock_release
 *                 and connect4/6 (connected elsewhere) delete (by cookie; LRU only on
 *                 kernels without sock_release, see MB_NO_SOCK_RELEASE)
 *   pairs         sockops write/delete, getsockopt read
 *   pod_conns     connect4/6 + sendmsg4/6 count up, sockops/sock_release count down
 *                 (the per-pod share of orig_dst and dns_orig; see "Full maps")
 *   sock_hash     sockops insert, sk_msg redirect
 *   inbound_pods, inbound_ports, inbound_ifaces   tc_inbound (see the inbound section)
 *   counters      everyone (index enum below)
 */
#ifndef MESHBPF_H
#define MESHBPF_H

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>

#define MB_MAX_IDS 8               /* proxy uids / gids / owner groups per pod */
#define MB_MAX_PODS 16384
/* Concurrent redirected connections (and captured DNS sockets) per node: 100,000 with
 * headroom. The loader may override it (-DMB_MAX_CONNS=n, MESHBPF_MAX_CONNS) so a test can
 * fill the maps in its own pin prefix. */
#ifndef MB_MAX_CONNS
#define MB_MAX_CONNS 131072
#endif

/* Full maps fail closed and never answer wrong. A connect (or DNS send) whose original
 * destination cannot be recorded is refused (the cgroup hook returns 0: connect() and
 * sendmsg() fail with EPERM) and counted (COUNTER_CONN_REFUSED): redirecting it without an
 * entry would make the sidecar read its own 127.0.0.1:15001 as the original destination.
 * One pod cannot starve the others: each pod (netns cookie) may hold at most
 * node_cfg.pod_conn_limit entries of orig_dst + dns_orig (0: MB_MAX_CONNS / 2), counted in
 * pod_conns, up at record time, down when the entry is deleted on close. orig_dst, pairs
 * and dns_orig are plain hashes (no LRU: an evicted entry is a wrong answer), emptied
 * explicitly by sockops STATE_CB (TCP_CLOSE) and cgroup/sock_release. */
#define MB_POD_CONN_LIMIT_DEFAULT (MB_MAX_CONNS / 2)

/* SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6) share the number 80. */
#define MB_SO_ORIGINAL_DST 80
#define MB_SOL_IP 0
#define MB_SOL_IPV6 41
#define MB_AF_INET 2
#define MB_AF_INET6 10
#define MB_SOCK_STREAM 1
#define MB_SOCK_DGRAM 2
#define MB_TCP_CLOSE 7

/* ---- pod membership -------------------------------------------------------------------- */

/* pod_config.flags */
#define POD_F_OUTBOUND_ALL   (1u << 0)  /* outbound_ip_ranges_include == '*'            */
#define POD_F_IPV6           (1u << 1)  /* enable_ipv6: capture IPv6 destinations too   */
#define POD_F_OWNER_INCLUDE  (1u << 2)  /* capture only gids in owner_gids              */
#define POD_F_OWNER_EXCLUDE  (1u << 3)  /* never capture gids in owner_gids             */
#define POD_F_INBOUND_ALL    (1u << 4)  /* inbound_ports_include == '*' (inbound's)     */
#define POD_F_DNS            (1u << 5)  /* redirect_dns: port 53 to the sidecar's DNS   */
#define POD_F_DNS_ALL        (1u << 6)  /* capture_all_dns: any server, not the listed  */
#define POD_F_LOOPBACK_INCLUDED (1u << 7) /* an include range is a loopback address: Istio
                                            then writes no `-o lo ! --uid-owner -j RETURN` */
#define POD_F_TPROXY         (1u << 8)  /* inbound_interception_mode TPROXY             */

/* cidr_rules scope of a pod's DNS servers (dns_servers_v4/v6): pod_index | MB_DNS_SCOPE */
#define MB_DNS_SCOPE 0x80000000u
/* IPv6 ranges live in their own scope (pod_index | MB_IPV6_SCOPE), IPv4 ranges in the
 * plain one: both use the 16-byte form, so without it `::/0` (any IPv6 prefix <= 96) would
 * also contain every v4-mapped IPv4 address. Istio writes the families to iptables and
 * ip6tables apart; an IPv4 destination (v4-mapped on an AF_INET6 socket too) only ever
 * meets IPv4 ranges. */
#define MB_IPV6_SCOPE 0x40000000u
#define MB_DNS_PORT_BE bpf_htons(53) /* port 53 as stored in maps and ctx (network order) */

struct pod_config {
    __u16 proxy_port;            /* outbound listener, network order (15001)           */
    __u16 inbound_port;          /* inbound capture listener, network order (15006)    */
    __u32 flags;                 /* POD_F_*                                            */
    __u32 pod_index;             /* scope of this pod's cidr_rules / port_rules keys   */
    __u32 n_uids;
    __u32 n_gids;
    __u32 n_owner_gids;
    __u32 uids[MB_MAX_IDS];      /* proxy uids: their connects are never rewritten     */
    __u32 gids[MB_MAX_IDS];      /* proxy gids: likewise                               */
    __u32 owner_gids[MB_MAX_IDS];/* owner_groups_include / _exclude                    */
    __u16 dns_port;              /* the sidecar's DNS listener, network order (15053)  */
    __u16 tunnel_port;           /* inbound_tunnel_port, network order (15008)         */
};

/* Outbound CIDR rules: LPM trie. prefixlen counts pod_index too: 32 + prefix length of
 * the 16-byte address (IPv4 /n is 96+n). Python resolves Istio's "exclude wins" before
 * writing: an include range inside an exclude range is stored as exclude. */
struct cidr_key {
    __u32 prefixlen;
    __u32 pod_index;             /* host order, | MB_IPV6_SCOPE for IPv6 ranges (and
                                    | MB_DNS_SCOPE); always fully matched (prefixlen >= 32) */
    __u8  ip[16];
};
#define RULE_INCLUDE 1           /* capture (redirect to the sidecar) */
#define RULE_EXCLUDE 2           /* bypass                              */

struct port_key {
    __u32 pod_index;
    __u16 port;                  /* network order */
    __u16 pad;
};

struct ip_key {
    __u32 ip[4];
};

/* One address of a pod's netns (any interface, link-local and `lo` included): connections
 * to it leave through `lo`, Istio's `-o lo`. Keyed by netns cookie because link-local and
 * secondary addresses repeat across pods. Value: the pod's pod_index. */
struct netns_addr_key {
    __u64 netns;
    __u32 ip[4];                 /* v4-mapped if IPv4, network order */
};

/* The source address the kernel gives a pod's socket for an off-pod destination (the pod
 * address of each family; zeros if it has none), and for an IPv4 link-local one (169.254/16:
 * the pod's own link-local address, whose connected route the kernel takes; zeros if none). */
struct netns_src {
    __u32 v4[4];                 /* v4-mapped */
    __u32 v6[4];
    __u32 ll4[4];                /* v4-mapped */
};

#define NODE_F_SPLICE (1u << 0)
/* tc_inbound hands every captured SYN to sk_lookup (as it does on its own when
 * bpf_sk_assign refuses a SO_REUSEPORT listener, Linux < 6.5): tests prove that path. */
#define NODE_F_INBOUND_SK_LOOKUP (1u << 1)
struct node_config {
    __u32 flags;
    __u32 splice_limit;          /* bytes a splice direction may queue unread (splice below) */
    __u32 pod_conn_limit;        /* per-pod share of orig_dst + dns_orig; 0: the default */
    __u32 pad;
};

/* ---- per-connection state -------------------------------------------------------------- */

struct orig_dst {
    __u32 ip[4];                 /* the destination the app dialled, v4-mapped if IPv4 */
    __u16 port;                  /* network order */
    __u16 family;                /* MB_AF_INET or MB_AF_INET6 (of the address)        */
    __u32 flags;                 /* ORIG_F_*                                           */
};
#define ORIG_F_ANSWERED 1        /* the sidecar has read it (getsockopt)               */
#define ORIG_F_CONNECTED 2       /* dns_orig: the UDP socket is connect()ed to it      */

/* A socket's identity: also the SOCKHASH key. */
struct sock_key {
    __u64 netns;                 /* netns cookie if either address is loopback, else 0 */
    __u32 local_ip[4];
    __u32 remote_ip[4];
    __u16 local_port;            /* network order */
    __u16 remote_port;           /* network order */
    __u32 pad;
};

/* ---- counters (PER-CPU array) ------------------------------------------------------------ */
enum mb_counter {
    COUNTER_REDIRECT_OUT = 0,    /* connects rewritten to the sidecar                  */
    COUNTER_REDIRECT_IN = 1,     /* inbound connections steered to 15006 (tc_inbound)  */
    COUNTER_ORIG_DST_ANSWERED = 2, /* SO_ORIGINAL_DST answers                          */
    COUNTER_ORIG_DST_MISS = 3,   /* SO_ORIGINAL_DST asked, nothing known               */
    COUNTER_PEERNAME = 4,        /* getpeername answers restored                       */
    COUNTER_SPLICE_MSGS = 5,     /* sk_msg messages redirected to the peer socket      */
    COUNTER_SPLICE_BYTES = 6,    /* bytes in those messages                            */
    COUNTER_SPLICE_MISS = 7,     /* sk_msg found no peer socket (normal path)          */
    COUNTER_SOCKHASH_ADD = 8,    /* sockets put in the sockhash                        */
    COUNTER_BYPASS_PROXY = 9,    /* connects by the proxy uid/gid, left alone          */
    COUNTER_BYPASS_RULE = 10,    /* connects left alone by include/exclude rules       */
    COUNTER_CLOSED = 11,         /* per-connection state removed on close              */
    COUNTER_INBOUND_NO_LISTENER = 12, /* tc_inbound: SYN dropped, no capture listener  */
    COUNTER_INBOUND_UNSTEERABLE = 13, /* tc_inbound: fragment etc. to a captured port dropped */
    COUNTER_INBOUND_BYPASS = 14, /* tc_inbound: packets to excluded ports              */
    COUNTER_DNS_REDIRECT = 15,   /* DNS queries (UDP sends, TCP connects) redirected   */
    COUNTER_DNS_REPLY = 16,      /* DNS replies given back their server's address      */
    COUNTER_REDIRECT_SELF = 17,  /* the proxy's connects to its own pod -> inbound port */
    COUNTER_CONN_REFUSED = 18,   /* connect/DNS send refused: no room to record it     */
    COUNTER_PAIRS_FULL = 19,     /* pairs full: the sidecar gets no answer, not a wrong one */
    COUNTER_INBOUND_SK_LOOKUP = 20, /* tc_inbound: SYN left to sk_lookup (reuseport)   */
    COUNTER_SPLICE_EXIT = 21,    /* a splice direction ran ahead of its reader: to TCP   */
    COUNTER_SPLICE_REENTER = 22, /* ... and came back once the reader had caught up      */
    COUNTER_SPLICE_TCP_BYTES = 23, /* bytes of spliced sockets sent over TCP meanwhile   */
    COUNTER_MAX = 32
};

/* ---- maps ---------------------------------------------------------------------------- */
BPF_HASH(pods, __u64, struct pod_config, MB_MAX_PODS);
BPF_LPM_TRIE(cidr_rules, struct cidr_key, __u32, 65536);
BPF_HASH(port_rules, struct port_key, __u32, 65536);
BPF_HASH(local_ips, struct ip_key, __u32, 65536);
BPF_ARRAY(node_cfg, struct node_config, 1);
BPF_HASH(orig_dst, __u64, struct orig_dst, MB_MAX_CONNS);
/* pairs entries can outlive orig_dst's (until the sidecar's end closes): room for both */
BPF_HASH(pairs, struct sock_key, struct orig_dst, MB_MAX_CONNS * 2);
BPF_SOCKHASH(sock_hash, struct sock_key, MB_MAX_CONNS * 2);
#ifdef MB_NO_SOCK_RELEASE
/* No cgroup/sock_release (Linux < 5.9): nothing deletes a closed UDP socket's entry, so
 * LRU is the only way entries ever go. An evicted entry makes recvmsg leave the reply's
 * source as the sidecar's, which resolvers drop: a retry, never a wrong server. */
BPF_TABLE("lru_hash", __u64, struct orig_dst, dns_orig, MB_MAX_CONNS);
#else
BPF_HASH(dns_orig, __u64, struct orig_dst, MB_MAX_CONNS);
#endif
/* netns cookie -> entries of orig_dst + dns_orig the pod holds (its share, see above) */
BPF_HASH(pod_conns, __u64, __u64, MB_MAX_PODS);
BPF_HASH(netns_addrs, struct netns_addr_key, __u32, 65536);
BPF_HASH(netns_src, __u64, struct netns_src, MB_MAX_PODS);
BPF_PERCPU_ARRAY(counters, __u64, COUNTER_MAX);

/* ---- splice backpressure (sk_msg.c, sockops.c) --------------------------------------------
 * sk_msg's BPF_F_INGRESS redirect queues bytes on the peer socket without holding them to its
 * receive buffer, and no BPF hook sees the reader consume them: a writer that outpaces its
 * reader would never block. So a direction is spliced only while it is provably short of a
 * budget: at most node_cfg.splice_limit bytes go into the peer's queue, then the direction
 * leaves the splice and its bytes take the normal TCP path, where the window and the
 * writer's sndbuf block the writer as TCP always does. tcp_bpf_recvmsg reads the spliced
 * queue before the TCP queue, so leaving keeps the byte order. Coming back is safe only
 * once the reader has read every byte the TCP path carried (hence every spliced byte
 * before them): the reader publishes its tcp_sock.copied_seq whenever it sends anything
 * (its sk_msg, or the sockops header-option callback for ACKs and window updates), and the
 * writer re-enters when that equals its own tcp_sock.write_seq. Both fields are read through
 * bpf_skc_to_tcp_sock at offsets taken from the running kernel's BTF (MB_TCP_*_OFF, passed
 * by the loader), since the headers bcc compiles with may be another kernel's.
 * docs/splice.md has the whole argument and the kernels it holds on. */
#define MB_SPLICE_ON 0
#define MB_SPLICE_TCP 1
struct splice_dir {              /* one direction of a spliced pair, keyed by the READER's
                                    sock_key (its own tuple: local = reader) */
    __u32 copied_seq;            /* reader's tcp_sock.copied_seq, as it last published    */
    __u32 spliced;               /* bytes queued into the reader since it was last drained */
    __u32 mode;                  /* MB_SPLICE_ON / MB_SPLICE_TCP                           */
    __u32 pad;
};
BPF_HASH(splice_dirs, struct sock_key, struct splice_dir, MB_MAX_CONNS);

/* bcc 0.26's helper table may lack it; BPF_FUNC_skc_to_tcp_sock is 137 (Linux 5.9). */
static void *(*mb_skc_to_tcp_sock)(void *sk) = (void *)137;

/* A u32 field of a struct tcp_sock at a BTF-derived constant offset; 0 for no tcp_sock.
 * (A macro: the verifier needs the offset constant to match it against BTF.) */
#define mb_tcp_u32(sk, off) ({                                          \
    char *__tp = mb_skc_to_tcp_sock(sk);                                \
    __tp ? *(volatile __u32 *)(__tp + (off)) : 0; })

/* ---- helpers --------------------------------------------------------------------------- */
/* bcc 0.26 declares bpf_get_socket_cookie as returning u32, which truncates the cookie. */
static __u64 (*mb_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline void mb_count(int idx, __u64 n)
{
    __u32 k = idx;
    __u64 *v = counters.lookup(&k);
    if (v)
        *v += n;
}

/* ::ffff:a.b.c.d from a network-order IPv4 address */
static __always_inline void mb_map4(__u32 *dst, __u32 ip4)
{
    dst[0] = 0;
    dst[1] = 0;
    dst[2] = bpf_htonl(0x0000ffff);
    dst[3] = ip4;
}

static __always_inline int mb_is_mapped(const __u32 *ip)
{
    return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

/* 127/8, ::1 — and the unspecified address (0.0.0.0, ::), which connect() treats as local */
static __always_inline int mb_is_loopback(const __u32 *ip)
{
    if (mb_is_mapped(ip))
        return (bpf_ntohl(ip[3]) >> 24) == 127 || ip[3] == 0;
    return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == bpf_htonl(1) || ip[3] == 0);
}

static __always_inline void mb_copy_ip(__u32 *dst, const __u32 *src)
{
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
}

/* An AF_INET6 sock_addr context's address (v4-mapped or IPv6) as our 16-byte form. */
static __always_inline void mb_ctx_ip6(struct bpf_sock_addr *ctx, __u32 *ip)
{
    ip[0] = ctx->user_ip6[0];
    ip[1] = ctx->user_ip6[1];
    ip[2] = ctx->user_ip6[2];
    ip[3] = ctx->user_ip6[3];
}

/* Set an AF_INET6 sock_addr context's address (the ctx only takes 4-byte stores). */
static __always_inline void mb_set_ctx_ip6(struct bpf_sock_addr *ctx, const __u32 *ip)
{
    ctx->user_ip6[0] = ip[0];
    ctx->user_ip6[1] = ip[1];
    ctx->user_ip6[2] = ip[2];
    ctx->user_ip6[3] = ip[3];
}

/* Loopback as an AF_INET6 socket must dial it: ::ffff:127.0.0.1 for a v4-mapped peer
 * (the socket stays IPv4 on the wire), ::1 for a real IPv6 one. */
static __always_inline void mb_set_ctx_loopback6(struct bpf_sock_addr *ctx, int v4)
{
    __u32 lo[4] = {0, 0, v4 ? bpf_htonl(0x0000ffff) : 0,
                   v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1)};
    mb_set_ctx_ip6(ctx, lo);
}

/* The cidr_rules scope an address is looked up in (see MB_IPV6_SCOPE). */
static __always_inline __u32 mb_cidr_scope(__u32 scope, const __u32 *ip)
{
    return mb_is_mapped(ip) ? scope : scope | MB_IPV6_SCOPE;
}

static __always_inline int mb_id_in(__u32 id, const __u32 *ids, __u32 n)
{
#pragma unroll
    for (int i = 0; i < MB_MAX_IDS; i++) {
        if (i < n && ids[i] == id)
            return 1;
    }
    return 0;
}

/* Is a port-53 destination one the pod's DNS capture takes (Istio's ISTIO_OUTPUT_DNS)? */
static __always_inline int mb_dns_target(struct pod_config *pc, const __u32 *ip)
{
    if (!(pc->flags & POD_F_DNS))
        return 0;
    if (pc->flags & POD_F_DNS_ALL)
        return 1;
    struct cidr_key ck = {};
    ck.prefixlen = 32 + 128;
    ck.pod_index = mb_cidr_scope(pc->pod_index | MB_DNS_SCOPE, ip);
    __builtin_memcpy(ck.ip, ip, 16);
    __u32 *r = cidr_rules.lookup(&ck);
    return r && *r == RULE_INCLUDE;
}

#define MB_CAPTURE_PROXY 1       /* redirect to the outbound listener (proxy_port)     */
#define MB_CAPTURE_DNS 2         /* redirect to the DNS listener (dns_port)            */
#define MB_CAPTURE_INBOUND 3     /* redirect to the inbound listener (inbound_port)    */

/* Istio's host loopback `-d 127.0.0.1/32` / `-d ::1/128`; the unspecified address too,
 * because connect() to it goes to the loopback address. */
static __always_inline int mb_is_host_loopback(const __u32 *ip)
{
    if (mb_is_mapped(ip))
        return ip[3] == bpf_htonl(0x7f000001) || ip[3] == 0;
    return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == bpf_htonl(1) || ip[3] == 0);
}

/* The sidecar's inbound passthrough source, 127.0.0.6 / ::6 (Istio's `-o lo -s ... RETURN`) */
static __always_inline int mb_is_passthrough(const __u32 *src)
{
    if (mb_is_mapped(src))
        return src[3] == bpf_htonl(0x7f000006);
    return src[0] == 0 && src[1] == 0 && src[2] == 0 && src[3] == bpf_htonl(6);
}

/* Would a packet to `ip` leave through `lo` of netns `nc` (iptables' `-o lo`)? The kernel
 * routes every address of the netns there, on any interface. Loopback is known here; the
 * netns's other addresses come from netns_addrs (attach and re-attach fill it: an address
 * added in between counts as remote until the next attach). */
static __always_inline int mb_is_local(__u64 nc, const __u32 *ip)
{
    if (mb_is_loopback(ip))
        return 1;
    struct netns_addr_key k = {};
    k.netns = nc;
    mb_copy_ip(k.ip, ip);
    return netns_addrs.lookup(&k) != NULL;
}

static __always_inline int mb_is_proxy(struct pod_config *pc)
{
    __u64 ug = bpf_get_current_uid_gid();
    __u32 uid = (__u32)ug, gid = (__u32)(ug >> 32);
    return mb_id_in(uid, pc->uids, pc->n_uids) || mb_id_in(gid, pc->gids, pc->n_gids);
}

/* The outbound decision shared by connect4/6 (TCP, and UDP DNS on a connect()) and
 * sendmsg4/6 (UDP DNS), rule for rule in the order of Istio's nat ISTIO_OUTPUT
 * (meshbpf/iptables/rules.py):
 *   outbound_ports_exclude (tcp and udp)       -> leave
 *   -o lo -s 127.0.0.6 (::6)                    -> leave
 *   per proxy uid, then per proxy gid, U:
 *     -o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 [! 53 with DNS, uids only] owner U
 *                                               -> inbound listener
 *     -o lo [-p tcp ! --dport 53 with DNS] ! owner U   (absent if an include range is a
 *                                                loopback address)  -> leave
 *     owner U                                   -> leave
 *   owner groups include / exclude              -> leave
 *   ISTIO_OUTPUT_DNS: port 53 to a captured server (tcp and udp) -> DNS listener
 *   -d 127.0.0.1 (::1), excluded ranges         -> leave
 *   outbound_ports_include, included ranges     -> outbound listener (tcp only)
 * `nc` the socket's netns cookie, `ip` v4-mapped for IPv4, `port` network order, `src` the
 * socket's bound source (v4-mapped, or zeros), `udp` for a datagram socket. Returns 0
 * (leave it), MB_CAPTURE_PROXY, MB_CAPTURE_DNS or MB_CAPTURE_INBOUND. */
static __always_inline int mb_tproxy_inbound(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                             __u16 port, __u32 uid, __u32 gid);

static __always_inline int mb_should_capture(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                             __u16 port, const __u32 *src, int udp)
{
    __u64 ug = bpf_get_current_uid_gid();
    __u32 uid = (__u32)ug, gid = (__u32)(ug >> 32);
    struct port_key pk = {};
    pk.pod_index = pc->pod_index;
    pk.port = port;
    __u32 *pa = port_rules.lookup(&pk);
    if (pa && *pa == RULE_EXCLUDE)
        goto bypass;
    int local = mb_is_local(nc, ip);
    /* An unbound IPv6 socket dialling a local address gets that address as its source
     * (RFC 6724 rule 1), so dialling ::6 is "from ::6"; IPv4 takes the route's 127.0.0.1
     * or pod IP. */
    int unbound = !(src[0] | src[1] | src[2] | src[3]) ||
                  (mb_is_mapped(src) && !src[3]);
    if (local && (mb_is_passthrough(src) ||
                  (unbound && !mb_is_mapped(ip) && mb_is_passthrough(ip))))
        goto bypass;
    int dns53 = (pc->flags & POD_F_DNS) && port == MB_DNS_PORT_BE;
    int in_redirect = local && !udp && !mb_is_host_loopback(ip) && port != pc->tunnel_port;
    int lo_return = local && !(pc->flags & POD_F_LOOPBACK_INCLUDED) &&
                    !((pc->flags & POD_F_DNS) && (udp || port == MB_DNS_PORT_BE));
    /* TPROXY inbound: Istio's mangle OUTPUT marks every TCP connect of a proxy uid or gid
     * over lo (but to 127.0.0.1 / ::1), and PREROUTING's ISTIO_INBOUND hands it to the
     * inbound listener when its port is captured, whatever the nat rules below decided. */
    if ((pc->flags & POD_F_TPROXY) && in_redirect && mb_tproxy_inbound(pc, nc, ip, port, uid, gid))
        return MB_CAPTURE_INBOUND;
#pragma unroll
    for (int i = 0; i < MB_MAX_IDS; i++) {
        if (i < pc->n_uids) {
            if (pc->uids[i] == uid) {
                if (in_redirect && !dns53)
                    return MB_CAPTURE_INBOUND;
                goto proxy;
            }
            if (lo_return)
                goto bypass;
        }
    }
#pragma unroll
    for (int i = 0; i < MB_MAX_IDS; i++) {
        if (i < pc->n_gids) {
            if (pc->gids[i] == gid) {
                if (in_redirect)
                    return MB_CAPTURE_INBOUND;
                goto proxy;
            }
            if (lo_return)
                goto bypass;
        }
    }
    if ((pc->flags & POD_F_OWNER_INCLUDE) && !mb_id_in(gid, pc->owner_gids, pc->n_owner_gids))
        goto bypass;
    if ((pc->flags & POD_F_OWNER_EXCLUDE) && mb_id_in(gid, pc->owner_gids, pc->n_owner_gids))
        goto bypass;
    if (port == MB_DNS_PORT_BE && mb_dns_target(pc, ip))
        return MB_CAPTURE_DNS;
    if (udp || mb_is_host_loopback(ip))
        goto bypass;
    struct cidr_key ck = {};
    ck.prefixlen = 32 + 128;
    ck.pod_index = mb_cidr_scope(pc->pod_index, ip);
    __builtin_memcpy(ck.ip, ip, 16);
    __u32 *ca = cidr_rules.lookup(&ck);
    __u32 crule = ca ? *ca : 0;
    if (crule == RULE_EXCLUDE)
        goto bypass;
    if (pa && *pa == RULE_INCLUDE)
        return MB_CAPTURE_PROXY;
    if (crule == RULE_INCLUDE || (pc->flags & POD_F_OUTBOUND_ALL))
        return MB_CAPTURE_PROXY;
bypass:
    mb_count(COUNTER_BYPASS_RULE, 1);
    return 0;
proxy:
    mb_count(COUNTER_BYPASS_PROXY, 1);
    return 0;
}

/* The listener a verdict sends the connect to (network order). */
static __always_inline __u16 mb_capture_port(struct pod_config *pc, int verdict)
{
    if (verdict == MB_CAPTURE_DNS)
        return pc->dns_port;
    if (verdict == MB_CAPTURE_INBOUND)
        return pc->inbound_port;
    return pc->proxy_port;
}

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

/* Remember what the app dialled (by socket cookie) and count the redirect; -1 if it
 * cannot be remembered (the connect must then be refused, not redirected). */
static __always_inline int mb_remember(void *ctx, __u64 nc, const __u32 *ip, __u16 port,
                                       __u16 family, int verdict)
{
    struct orig_dst od = {};
    mb_copy_ip(od.ip, ip);
    od.port = port;
    od.family = family;
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *prev = orig_dst.lookup(&ck);
    if (prev) {
        /* the same socket connecting again (after a failed attempt): already charged */
        __builtin_memcpy(prev, &od, sizeof(od));
    } else {
        __u64 *cnt = mb_share(&nc);
        if (!cnt || orig_dst.insert(&ck, &od) != 0) {
            mb_count(COUNTER_CONN_REFUSED, 1);
            return -1;
        }
        __sync_fetch_and_add(cnt, 1);
    }
    mb_count(verdict == MB_CAPTURE_DNS ? COUNTER_DNS_REDIRECT :
             verdict == MB_CAPTURE_INBOUND ? COUNTER_REDIRECT_SELF : COUNTER_REDIRECT_OUT, 1);
    return 0;
}

/* A UDP DNS redirect, by socket cookie: recvmsg4/6 give the replies the server's address
 * (conntrack un-NATs them under iptables). `flags` ORIG_F_CONNECTED for a connect()ed
 * socket (getpeername/getsockname then answer from it too). Charged to the pod's share
 * once per socket; -1 if there is no room: the send or connect must be refused, not
 * redirected. UDP keeps no orig_dst entry. */
static __always_inline int mb_remember_dns(void *ctx, __u64 nc, const __u32 *ip, __u16 family,
                                           __u32 flags)
{
    struct orig_dst od = {};
    mb_copy_ip(od.ip, ip);
    od.port = MB_DNS_PORT_BE;
    od.family = family;
    od.flags = flags;
    __u64 ck = mb_socket_cookie(ctx);
    struct orig_dst *prev = dns_orig.lookup(&ck);
    if (prev) {
        __builtin_memcpy(prev, &od, sizeof(od));
        return 0;
    }
    __u64 *cnt = mb_share(&nc);
    if (!cnt || dns_orig.insert(&ck, &od) != 0) {
        mb_count(COUNTER_CONN_REFUSED, 1);
        return -1;
    }
    __sync_fetch_and_add(cnt, 1);
    return 0;
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

/* The local address a redirected socket would have had under iptables, where REDIRECT
 * rewrites the destination after the kernel chose the source for the original one: that
 * destination itself if it is one of the netns's own non-loopback addresses (the kernel
 * then picks it), else the pod's address of that family (netns_src). 0 if the loopback
 * address the socket has is already right (a loopback destination) or nothing is known. */
static __always_inline int mb_redirect_source(__u64 nc, const __u32 *dst, __u32 *out)
{
    if (mb_is_loopback(dst))
        return 0;
    if (mb_is_local(nc, dst)) {
        mb_copy_ip(out, dst);
        return 1;
    }
    struct netns_src *s = netns_src.lookup(&nc);
    if (!s)
        return 0;
    /* 169.254/16: the kernel sources it from the pod's own link-local address, if it has
     * one. (IPv6 link-local is left to the pod address: binding fe80:: ties the socket to
     * one interface, which the redirect to ::1 cannot leave through.) */
    if (mb_is_mapped(dst) && (bpf_ntohl(dst[3]) >> 16) == 0xa9fe && s->ll4[3]) {
        mb_copy_ip(out, s->ll4);
        return 1;
    }
    if (mb_is_mapped(dst)) {
        if (!s->v4[3])
            return 0;
        mb_copy_ip(out, s->v4);
        return 1;
    }
    if (!(s->v6[0] | s->v6[1] | s->v6[2] | s->v6[3]))
        return 0;
    mb_copy_ip(out, s->v6);
    return 1;
}

/* Bind a socket whose connect() is redirected to a loopback listener to the source it has
 * under iptables (mb_redirect_source; REDIRECT rewrites only the destination, after the
 * kernel chose the source for the original one). TCP: the sidecar's accepted socket sees
 * the app at that address (Envoy's downstream remote address), and the app's getsockname
 * is right. UDP DNS: the listener's reply (sent to that address) is accepted, and a later
 * connect() of the same socket to another host works (with 127.0.0.1 as its source it
 * could not). Keys stay symmetric: one end is still loopback, so both carry the netns.
 * Port 0 lets connect() pick the port for the unique 4-tuple (IP_BIND_ADDRESS_NO_PORT).
 * Only an unbound socket: the kernel refuses (EINVAL) a socket the app bound, which keeps
 * its own. */
static __always_inline void mb_bind_source(struct bpf_sock_addr *ctx, __u64 nc,
                                           const __u32 *dst, int v6sock)
{
    __u32 src[4];
    if (!mb_redirect_source(nc, dst, src))
        return;
    if (!v6sock) {
        struct sockaddr_in sa = {};
        sa.sin_family = MB_AF_INET;
        sa.sin_addr.s_addr = src[3];
        bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
        return;
    }
    struct sockaddr_in6 sa6 = {};
    sa6.sin6_family = MB_AF_INET6;
    sa6.sin6_addr.in6_u.u6_addr32[0] = src[0];
    sa6.sin6_addr.in6_u.u6_addr32[1] = src[1];
    sa6.sin6_addr.in6_u.u6_addr32[2] = src[2];
    sa6.sin6_addr.in6_u.u6_addr32[3] = src[3];
    bpf_bind(ctx, (struct sockaddr *)&sa6, sizeof(sa6));
}

/* ---- inbound (tc_inbound.c) -------------------------------------------------------------
 * Owned by the inbound helper (bpf/tc_inbound.c, meshbpf/ebpf/inbound.py); everything
 * from here to "end of inbound section" is theirs. Keep it last, above the final #endif.
 *
 * DESIGN NOTE for the core programs: tc_inbound steers with bpf_sk_assign() (socket-level
 * TPROXY), NOT with a port rewrite. The SYN for pod_ip:8080 is handed to the 15006
 * listener unchanged, so the sidecar's accepted socket's LOCAL address is pod_ip:8080:
 *   - getsockname() on it is the original destination; a proxy whose SO_ORIGINAL_DST
 *     fails falls back to it (Envoy's original_dst filter and HAProxy both do), and
 *     getsockopt may answer SO_ORIGINAL_DST for a socket with no `pairs` entry with the
 *     socket's own local address (ctx->sk->src_ip4/src_ip6, src_port);
 *   - replies carry the original source port because the socket is bound to it;
 *   - sockops sees the real 4-tuple, mirror of the peer's: register the socket as usual,
 *     no inbound_nat lookup, nothing to delete on close.
 * So there is no inbound_nat map (the port-rewrite design's per-connection state).
 *
 * Inbound policy maps, written by meshbpf/ebpf/inbound.py (policy_entries), keyed by pod
 * IP (node-unique, so no netns cookie is needed and tc needs no netns helper): */
struct inbound_pod_key {         /* one pod IP */
    __u32 ip[4];                 /* v4-mapped if IPv4, network order */
};
struct inbound_pod_val {
    __u16 capture_port;          /* the sidecar's inbound listener (15006), network order */
    __u16 flags;                 /* INBOUND_POD_* */
    __u32 pad;
    __u64 owner;                 /* netns cookie of the pod that wrote it (inbound.py):
                                    only its owner deletes it and its inbound_ports */
};
#define INBOUND_POD_WILDCARD 1   /* ports with no inbound_ports entry are captured ('*') */
#define INBOUND_POD_CAPTURES 2   /* the policy captures at least one port (or '*')       */
struct inbound_port_key {
    __u32 ip[4];                 /* as inbound_pod_key */
    __u16 port;                  /* destination port, network order */
    __u16 pad;
};
#define INBOUND_PORT_CAPTURE 1   /* steer to capture_port */
#define INBOUND_PORT_BYPASS 2    /* deliver as addressed  */
BPF_HASH(inbound_pods, struct inbound_pod_key, struct inbound_pod_val, MB_MAX_PODS);
BPF_HASH(inbound_ports, struct inbound_port_key, __u32, 65536);

/* Every address the pod's interface delivers is the pod's, as for Istio's PREROUTING rule
 * (link-local ones, and addresses added after attach, which inbound_pods does not list).
 * Each pod's tc filter carries its own classid 4d42:<id>; cls_bpf stores its minor (the
 * 16-bit qdisc_skb_cb tc_classid) in skb->tc_classid before running the program, and
 * inbound_ifaces[id] names one of the pod's enrolled IPs, whose inbound_pods/inbound_ports
 * entries then decide. */
struct inbound_iface_val {
    __u32 ip[4];                 /* an inbound_pods key of the pod (its policy)    */
    __u64 netns;                 /* the pod's netns cookie (owner, for re-attach/detach) */
};
BPF_HASH(inbound_ifaces, __u32, struct inbound_iface_val, MB_MAX_PODS);

#define MBI_COUNTER_NO_LISTENER COUNTER_INBOUND_NO_LISTENER
#define MBI_COUNTER_UNSTEERABLE COUNTER_INBOUND_UNSTEERABLE

/* The TIME_WAIT path (sk_lookup.c). A SYN whose 4-tuple is held by a TIME_WAIT socket must
 * not be bpf_sk_assign()ed by tc: the listener would then build a request socket that
 * inet_ehash_insert() drops as a duplicate of the TIME_WAIT, silently, on every retransmit
 * until the TIME_WAIT expires (60 s). tc instead marks the 4-tuple in `inbound_tw` and
 * leaves the SYN to the kernel, whose TIME_WAIT handling (TCP_TW_SYN) deschedules the
 * TIME_WAIT and asks the netns's sk_lookup programs for a listener: mb_sk_lookup consumes
 * the mark and picks the pod's capture listener. Only lookups tc marked are touched (the
 * pod's own traffic to itself, e.g. the sidecar's inbound passthrough, never is). Only for
 * pods whose inbound_pods entry has INBOUND_POD_SK_LOOKUP (mb_sk_lookup is linked in the
 * pod's netns): without it the kernel would pick the app's own listener. */
#define INBOUND_POD_SK_LOOKUP 4  /* mb_sk_lookup is linked in this pod IP's netns           */
#define INBOUND_TW_MAX_AGE_NS 1000000000ULL  /* a mark older than this is stale (ignored) */
struct inbound_tw_key {          /* a SYN's 4-tuple, as the pod sees it */
    __u32 local_ip[4];           /* the pod IP, v4-mapped if IPv4, network order */
    __u32 remote_ip[4];
    __u16 local_port;            /* network order */
    __u16 remote_port;           /* network order */
};
struct capture_listener_key {    /* the pod's capture listener (sockops LISTEN_CB, or
                                    adopted at attach time by meshbpf/ebpf/inbound.py) */
    __u64 netns;                 /* netns cookie of the listening socket */
    __u16 port;                  /* its port (the capture port), network order */
    __u16 family;                /* MB_AF_INET or MB_AF_INET6 (of the socket) */
    __u32 pad;
};
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

/* 1 and *capture_port, *pod_flags if the pod's policy steers `dport`; -1 if the destination
 * is an enrolled pod IP whose policy leaves the port alone; 0 if it is no enrolled pod IP.
 * Ports in network order. (tc_inbound.c and sk_lookup.c) */
static __always_inline int mbi_policy(struct inbound_pod_key *pk, __be16 dport,
                                      __be16 *capture_port, __u16 *pod_flags)
{
    struct inbound_pod_val *pod = inbound_pods.lookup(pk);
    if (!pod)
        return 0;
    struct inbound_port_key k = {};
    __builtin_memcpy(k.ip, pk->ip, sizeof(k.ip));
    k.port = dport;
    __u32 *action = inbound_ports.lookup(&k);
    if (action) {
        if (*action != INBOUND_PORT_CAPTURE)
            return -1;
    } else if (!(pod->flags & INBOUND_POD_WILDCARD)) {
        return -1;
    }
    *capture_port = pod->capture_port;
    *pod_flags = pod->flags;
    return 1;
}

/* ---- end of inbound section ---- */

/* mb_should_capture's TPROXY case: a proxy id's connect over lo whose port the pod's
 * inbound policy captures (the policy is the same for every pod IP: look it up under the
 * pod address of the destination's family). */
static __always_inline int mb_tproxy_inbound(struct pod_config *pc, __u64 nc, const __u32 *ip,
                                             __u16 port, __u32 uid, __u32 gid)
{
    if (!mb_id_in(uid, pc->uids, pc->n_uids) && !mb_id_in(gid, pc->gids, pc->n_gids))
        return 0;
    struct netns_src *s = netns_src.lookup(&nc);
    if (!s)
        return 0;
    struct inbound_pod_key pk = {};
    if (mb_is_mapped(ip))
        mb_copy_ip(pk.ip, s->v4);
    else
        mb_copy_ip(pk.ip, s->v6);
    __be16 capture_port;
    __u16 pod_flags;
    return mbi_policy(&pk, port, &capture_port, &pod_flags) > 0;
}
#endif /* MESHBPF_H */
