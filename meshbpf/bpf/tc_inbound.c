/* tc_inbound.c: steer a meshed pod's inbound TCP into its sidecar's inbound listener.
 *
 * Hook: tc clsact INGRESS (direct-action) on each of the pod's interfaces, inside the
 * pod's network namespace. Program: tc_inbound_ingress (BPF_PROG_TYPE_SCHED_CLS).
 *
 * What it does, per TCP packet to any address the interface delivers (an enrolled pod IP
 * in `inbound_pods`, else one of the interface's pod: mbi_policy_key), on a port that
 * pod's policy captures (`inbound_ports` entry, else the pod's wildcard flag):
 *
 *   1. If the packet belongs to a connection that already has a socket (established,
 *      SYN_RECV request socket, or TIME_WAIT for a non-SYN) it is left alone: the kernel's
 *      normal lookup delivers it. Connections that existed before the pod was attached
 *      therefore keep working, untouched. A SYN that meets a TIME_WAIT is marked in
 *      `inbound_tw` and left to the kernel's TIME_WAIT path when mb_sk_lookup is linked
 *      in the pod's netns (INBOUND_POD_SK_LOOKUP): that path asks sk_lookup, which picks
 *      the capture listener (see sk_lookup.c and lib/inbound.h).
 *   2. Otherwise the sidecar's inbound listener (pod IP or wildcard address, port
 *      `capture_port`, normally 15006) is looked up in the pod's netns and the packet is
 *      assigned to it with bpf_sk_assign(), the socket-level equivalent of TPROXY.
 *      Nothing in the packet is rewritten: the accepted socket's local address IS the
 *      original destination (pod_ip:8080), so getsockname()/SO_ORIGINAL_DST answer with
 *      it and every reply carries the original source port by construction. No
 *      per-connection map, no checksum update, no egress program: CHECKSUM_PARTIAL and
 *      GSO/GRO packets (usual on veth) are handled because no byte changes.
 *      When bpf_sk_assign refuses the listener (a SO_REUSEPORT one before Linux 6.5, Envoy's
 *      default), or node_cfg says NODE_F_INBOUND_SK_LOOKUP, the 4-tuple is marked in
 *      `inbound_tw` and the packet continues: the kernel's listener lookup runs sk_lookup,
 *      which assigns the capture listener, reuseport group included (sk_lookup.c).
 *   3. No listener on the capture port (the sidecar is not up yet): the packet is
 *      dropped, never delivered to the app behind the sidecar's back; the client's SYN
 *      retransmission connects once the sidecar listens.
 *
 * Counters (the node's per-CPU `counters`, lib/counters.h):
 *   COUNTER_REDIRECT_IN          SYN steered to the sidecar's inbound listener (or handed
 *                                to the TIME_WAIT path, where sk_lookup steers it);
 *   COUNTER_INBOUND_BYPASS       SYN to an enrolled pod IP on a port its policy leaves alone;
 *   COUNTER_INBOUND_NO_LISTENER  SYN dropped because nothing listens on the capture port;
 *   COUNTER_INBOUND_UNSTEERABLE  TCP fragment / over-long IPv6 header chain to a captured
 *                                pod, dropped (see mbi_unsteerable).
 *
 * IPv4 options and IPv6 extension headers (hop-by-hop, routing, destination options, AH;
 * up to MBI_MAX_EXTHDRS) are skipped. Interfaces must carry Ethernet framing
 * (meshbpf/ebpf/inbound.py only hooks ARPHRD_ETHER links).
 *
 * Maps (lib/maps.h): inbound_pods, inbound_ports, inbound_ifaces, inbound_tw; the policy
 * lookup mbi_policy() is lib/inbound.h's, shared with sk_lookup.c.
 *
 * `meshbpf trace`: each SYN decided here (steered, left alone, dropped) is one event
 * (mb_trace_in, lib/trace.h), at the cost of one array lookup while nobody follows.
 */

#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/addr.h"
#include "lib/inbound.h"
#include "lib/trace.h"

#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#endif
#ifndef TC_ACT_SHOT
#define TC_ACT_SHOT 2
#endif

#define MBI_ETH_HLEN 14
#define MBI_ETH_P_IP 0x0800
#define MBI_ETH_P_IPV6 0x86DD
#define MBI_IPPROTO_TCP 6
#define MBI_TCP_SYN 0x02
#define MBI_TCP_ACK 0x10
#define MBI_NEXTHDR_HOP 0
#define MBI_NEXTHDR_ROUTING 43
#define MBI_NEXTHDR_FRAGMENT 44
#define MBI_NEXTHDR_AUTH 51
#define MBI_NEXTHDR_DEST 60
#define MBI_MAX_EXTHDRS 6

/* A TCP packet to a pod IP whose inbound traffic is captured, which this program cannot
 * steer: an IP fragment (the kernel reassembles after tc, so the reassembled SYN would
 * reach the app around the sidecar) or an IPv6 header chain longer than it walks. TCP
 * never needs either (it sizes segments to the path MTU), so such packets are dropped;
 * anything not addressed to a captured pod passes. */
/* Leave the packet to the kernel's listener lookup, where mb_sk_lookup (linked in the pod's
 * netns) consumes the mark and picks the capture listener: the TIME_WAIT path, and the
 * path for SO_REUSEPORT capture listeners that bpf_sk_assign refuses before Linux 6.5
 * (sk_lookup's assignment is reuseport-aware since 5.9). */
static __always_inline int mbi_to_sk_lookup(struct inbound_tw_key *tk)
{
    __u64 now = bpf_ktime_get_ns();
    inbound_tw.update(tk, &now);
    return TC_ACT_OK;
}

static __always_inline int mbi_unsteerable(struct inbound_pod_key *pk)
{
    struct inbound_pod_val *pod = inbound_pods.lookup(pk);
    if (!pod || !(pod->flags & INBOUND_POD_CAPTURES))
        return TC_ACT_OK;
    mb_count(COUNTER_INBOUND_UNSTEERABLE, 1);
    return TC_ACT_SHOT;
}

/* The key whose policy decides for destination `pk`: `pk` itself if it is an enrolled pod
 * IP, else the pod this filter was attached for (the filter's classid, see inbound_ifaces),
 * so that every address the interface delivers is captured. Returns 1 in the second case. */
static __always_inline int mbi_policy_key(struct __sk_buff *skb, struct inbound_pod_key *pk,
                                          struct inbound_pod_key *polk)
{
    __builtin_memcpy(polk->ip, pk->ip, sizeof(polk->ip));
    if (inbound_pods.lookup(pk))
        return 0;
    __u32 id = skb->tc_classid & 0xffff;
    if (!id)
        return 0;                /* a filter attached without a classid */
    struct inbound_iface_val *v = inbound_ifaces.lookup(&id);
    if (!v)
        return 0;
    __builtin_memcpy(polk->ip, v->ip, sizeof(polk->ip));
    return 1;
}

int tc_inbound_ingress(struct __sk_buff *skb)
{
    struct bpf_sock_tuple tuple = {};
    struct inbound_pod_key pk = {};      /* the destination address */
    struct inbound_pod_key polk = {};    /* whose policy decides (mbi_policy_key) */
    int via_iface = 0;
    __u32 tuple_len;
    __u32 l4off;
    __be16 capture_port = 0;
    __u16 pod_flags = 0;
    __u8 tcpflags = 0;

    if (skb->protocol == bpf_htons(MBI_ETH_P_IP)) {
        struct iphdr iph;
        if (bpf_skb_load_bytes(skb, MBI_ETH_HLEN, &iph, sizeof(iph)) < 0)
            return TC_ACT_OK;
        if (iph.version != 4 || iph.ihl < 5 || iph.protocol != MBI_IPPROTO_TCP)
            return TC_ACT_OK;
        l4off = MBI_ETH_HLEN + iph.ihl * 4;
        tuple.ipv4.saddr = iph.saddr;
        tuple.ipv4.daddr = iph.daddr;
        tuple_len = sizeof(tuple.ipv4);
        pk.ip[2] = bpf_htonl(0x0000ffff);
        pk.ip[3] = iph.daddr;
        via_iface = mbi_policy_key(skb, &pk, &polk);
        if (iph.frag_off & bpf_htons(0x3fff))   /* MF or a fragment offset */
            return mbi_unsteerable(&polk);
    } else if (skb->protocol == bpf_htons(MBI_ETH_P_IPV6)) {
        struct ipv6hdr ip6h;
        if (bpf_skb_load_bytes(skb, MBI_ETH_HLEN, &ip6h, sizeof(ip6h)) < 0)
            return TC_ACT_OK;
        __builtin_memcpy(tuple.ipv6.saddr, &ip6h.saddr, 16);
        __builtin_memcpy(tuple.ipv6.daddr, &ip6h.daddr, 16);
        tuple_len = sizeof(tuple.ipv6);
        __builtin_memcpy(pk.ip, &ip6h.daddr, 16);
        if (mb_is_mapped(pk.ip))                 /* never a real IPv6 destination */
            return TC_ACT_OK;
        via_iface = mbi_policy_key(skb, &pk, &polk);
        l4off = MBI_ETH_HLEN + sizeof(ip6h);
        __u8 nexthdr = ip6h.nexthdr;
        /* Skip extension headers to find TCP. A fragment, or a chain too long to walk,
         * cannot be steered (see mbi_unsteerable). */
#pragma unroll
        for (int i = 0; i < MBI_MAX_EXTHDRS; i++) {
            if (nexthdr != MBI_NEXTHDR_HOP && nexthdr != MBI_NEXTHDR_ROUTING &&
                nexthdr != MBI_NEXTHDR_DEST && nexthdr != MBI_NEXTHDR_AUTH)
                break;
            __u8 h[2];
            if (bpf_skb_load_bytes(skb, l4off, h, sizeof(h)) < 0)
                return mbi_unsteerable(&polk);
            l4off += nexthdr == MBI_NEXTHDR_AUTH ? (h[1] + 2) * 4 : (h[1] + 1) * 8;
            nexthdr = h[0];
        }
        if (nexthdr == MBI_NEXTHDR_FRAGMENT) {
            __u8 fh;
            if (bpf_skb_load_bytes(skb, l4off, &fh, 1) < 0 || fh == MBI_IPPROTO_TCP ||
                fh == MBI_NEXTHDR_HOP || fh == MBI_NEXTHDR_ROUTING ||
                fh == MBI_NEXTHDR_DEST || fh == MBI_NEXTHDR_AUTH)
                return mbi_unsteerable(&polk);
            return TC_ACT_OK;                    /* a fragmented UDP/ICMPv6/... packet */
        }
        if (nexthdr == MBI_NEXTHDR_HOP || nexthdr == MBI_NEXTHDR_ROUTING ||
            nexthdr == MBI_NEXTHDR_DEST || nexthdr == MBI_NEXTHDR_AUTH)
            return mbi_unsteerable(&polk);         /* more headers than we walk */
        if (nexthdr != MBI_IPPROTO_TCP)
            return TC_ACT_OK;
    } else {
        return TC_ACT_OK;
    }

    __be16 ports[2];
    if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0)
        return TC_ACT_OK;
    if (bpf_skb_load_bytes(skb, l4off + 13, &tcpflags, 1) < 0)
        return TC_ACT_OK;

    int syn = (tcpflags & (MBI_TCP_SYN | MBI_TCP_ACK)) == MBI_TCP_SYN;
    int verdict = mbi_policy(&polk, ports[1], &capture_port, &pod_flags);
    if (via_iface)      /* sk_lookup keys its policy by the destination: not for this one */
        pod_flags &= ~INBOUND_POD_SK_LOOKUP;
    if (verdict <= 0) {
        if (syn) {
            if (verdict < 0)
                mb_count(COUNTER_INBOUND_BYPASS, 1);
            mb_trace_in(&pk, &polk, ports[1], skb->tc_classid & 0xffff, MB_TRACE_BYPASSED,
                        0, 0);
        }
        return TC_ACT_OK;
    }
    if (tuple_len == sizeof(tuple.ipv4)) {
        tuple.ipv4.sport = ports[0];
        tuple.ipv4.dport = ports[1];
    } else {
        tuple.ipv6.sport = ports[0];
        tuple.ipv6.dport = ports[1];
    }
    struct inbound_tw_key tk = {};           /* the 4-tuple as mb_sk_lookup sees it */
    __builtin_memcpy(tk.local_ip, pk.ip, sizeof(tk.local_ip));
    if (tuple_len == sizeof(tuple.ipv4))
        mb_map4(tk.remote_ip, tuple.ipv4.saddr);
    else
        __builtin_memcpy(tk.remote_ip, tuple.ipv6.saddr, sizeof(tk.remote_ip));
    tk.local_port = ports[1];
    tk.remote_port = ports[0];

    /* 1. A socket already owns this 4-tuple: let the normal lookup deliver it. */
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        __u32 state = sk->state;
        bpf_sk_release(sk);
        if (syn && state == BPF_TCP_TIME_WAIT) {
            /* A new SYN meeting a TIME_WAIT (the sidecar closed first): assigning it to the
             * listener would stall (its request socket duplicates the TIME_WAIT and is
             * dropped). Mark the 4-tuple and let the kernel's TIME_WAIT path take it: it
             * asks sk_lookup, which sees the mark and picks the capture listener
             * (sk_lookup.c). Without sk_lookup in the pod's netns that path would pick the
             * app's listener: assign then (old behaviour, the connection waits for the
             * TIME_WAIT to expire). */
            if (pod_flags & INBOUND_POD_SK_LOOKUP) {
                mb_count(COUNTER_REDIRECT_IN, 1);
                mb_trace_in(&pk, &polk, ports[1], 0, MB_TRACE_REDIRECTED, 0, capture_port);
                return mbi_to_sk_lookup(&tk);
            }
        } else if (state != BPF_TCP_LISTEN) {
            return TC_ACT_OK;
        }
    }

    /* 2. Hand the packet to the sidecar's inbound listener. */
    if (tuple_len == sizeof(tuple.ipv4))
        tuple.ipv4.dport = capture_port;
    else
        tuple.ipv6.dport = capture_port;
    sk = bpf_skc_lookup_tcp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
    if (sk && sk->state != BPF_TCP_LISTEN) {
        /* The client's 4-tuple on the capture port is still owned by an older socket (a
         * TIME_WAIT of a connection that was REDIRECTed to 15006 under iptables mode, or
         * dialled to 15006 directly). With no source in the tuple only listeners match;
         * the real source is tried first so a SO_REUSEPORT group still spreads the load. */
        bpf_sk_release(sk);
        if (tuple_len == sizeof(tuple.ipv4)) {
            tuple.ipv4.saddr = 0;
            tuple.ipv4.sport = 0;
        } else {
            __builtin_memset(tuple.ipv6.saddr, 0, sizeof(tuple.ipv6.saddr));
            tuple.ipv6.sport = 0;
        }
        sk = bpf_skc_lookup_tcp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
    }
    if (!sk)
        goto no_listener;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        goto no_listener;
    }
    __u32 zero = 0;
    struct node_config *ncfg = node_cfg.lookup(&zero);
    int forced = ncfg && (ncfg->flags & NODE_F_INBOUND_SK_LOOKUP);
    long err = forced ? -1 : bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        /* bpf_sk_assign refuses SO_REUSEPORT listeners before Linux 6.5 (Envoy's default):
         * hand the SYN (or a syncookie ACK) to sk_lookup, which can (mbi_to_sk_lookup). */
        if (!(pod_flags & INBOUND_POD_SK_LOOKUP))
            goto no_listener;
        if (syn) {
            mb_count(COUNTER_REDIRECT_IN, 1);
            mb_count(COUNTER_INBOUND_SK_LOOKUP, 1);
            mb_trace_in(&pk, &polk, ports[1], 0, MB_TRACE_REDIRECTED, 0, capture_port);
        }
        return mbi_to_sk_lookup(&tk);
    }
    if (syn) {
        mb_count(COUNTER_REDIRECT_IN, 1);
        mb_trace_in(&pk, &polk, ports[1], 0, MB_TRACE_REDIRECTED, 0, capture_port);
    }
    return TC_ACT_OK;

no_listener:
    /* 3. Never let a captured port reach the app around the sidecar. */
    if (syn) {
        mb_count(COUNTER_INBOUND_NO_LISTENER, 1);
        mb_trace_in(&pk, &polk, ports[1], 0, MB_TRACE_DROPPED, MB_WHY_NO_LISTENER, 0);
    }
    return TC_ACT_SHOT;
}
