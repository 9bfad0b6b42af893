/* types.h — every layout stored in a map, and the constants and flags inside them.
 *
 * Why one header: these layouts are an interface, not an implementation detail. Python
 * writes and reads them (meshbpf/ebpf/structs.py mirrors them in ctypes and
 * meshbpf/ebpf/inbound.py packs the inbound ones; tests/unit/test_ebpf_structs.py parses
 * this file and checks the mirror), and pinned maps outlive the process that made them, so
 * a field moved here is a node that reads garbage. Change a struct here and its mirror
 * together; never reorder, resize or reuse a field or flag bit.
 *
 * Conventions (every map, every program):
 *  - IP addresses are 16 bytes, IPv4 in v4-mapped form (::ffff:a.b.c.d), network order
 *    (addr.h converts).
 *  - Ports stored in maps are in NETWORK byte order (__u16).
 *  - A key that contains a loopback address (127/8, ::1, ::ffff:127/104) also carries the
 *    socket's netns cookie, because loopback 4-tuples repeat in every pod; pod IPs are
 *    node-unique, so keys of pod-IP-only sockets carry netns 0 (both ends of a connection
 *    between two pods then compute the same key).
 */
#ifndef MESHBPF_LIB_TYPES_H
#define MESHBPF_LIB_TYPES_H

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

/* pod_config.flags. Bit 4 stays unused: pods written by an earlier meshbpf may carry it. */
#define POD_F_OUTBOUND_ALL   (1u << 0)  /* outbound_ip_ranges_include == '*'            */
#define POD_F_IPV6           (1u << 1)  /* enable_ipv6: capture IPv6 destinations too   */
#define POD_F_OWNER_INCLUDE  (1u << 2)  /* capture only gids in owner_gids              */
#define POD_F_OWNER_EXCLUDE  (1u << 3)  /* never capture gids in owner_gids             */
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
    __u32 splice_limit;          /* bytes a splice direction may queue unread (splice.h) */
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

/* ---- counters: index into the per-CPU `counters` array (counters.h) --------------------- */
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

/* ---- splice backpressure (the argument is in splice.h) ---------------------------------- */
#define MB_SPLICE_ON 0
#define MB_SPLICE_TCP 1
struct splice_dir {              /* one direction of a spliced pair, keyed by the READER's
                                    sock_key (its own tuple: local = reader) */
    __u32 copied_seq;            /* reader's tcp_sock.copied_seq, as it last published    */
    __u32 spliced;               /* bytes queued into the reader since it was last drained */
    __u32 mode;                  /* MB_SPLICE_ON / MB_SPLICE_TCP                           */
    __u32 pad;
};

/* ---- inbound policy (inbound.h), keyed by pod IP ----------------------------------------
 * Written by meshbpf/ebpf/inbound.py (policy_entries). Pod IPs are node-unique, so no netns
 * cookie is needed and tc, which has no netns cookie helper, can build the key. */
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
#define INBOUND_POD_SK_LOOKUP 4  /* mb_sk_lookup is linked in this pod IP's netns           */
struct inbound_port_key {
    __u32 ip[4];                 /* as inbound_pod_key */
    __u16 port;                  /* destination port, network order */
    __u16 pad;
};
#define INBOUND_PORT_CAPTURE 1   /* steer to capture_port */
#define INBOUND_PORT_BYPASS 2    /* deliver as addressed  */

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

/* The TIME_WAIT path (inbound.h, sk_lookup.c). */
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

#endif /* MESHBPF_LIB_TYPES_H */
