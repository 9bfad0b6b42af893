/* netns.h — what a pod's network namespace says about its own addresses: is an address
 * reached over `lo`, and which source address would the kernel give a socket.
 *
 * Why: iptables decides on facts that exist only after routing (`-o lo`, the source the
 * kernel chose before REDIRECT rewrote the destination). The cgroup hooks run before
 * routing, so Python records those facts per netns (netns_addrs, netns_src at attach) and
 * these functions answer from them, the same way for the outbound decision (policy.h),
 * the redirect itself (connect, sendmsg) and what the app reads back (getsockname,
 * recvmsg).
 */
#ifndef MESHBPF_LIB_NETNS_H
#define MESHBPF_LIB_NETNS_H

#include "maps.h"
#include "addr.h"

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
    mb_copy_ip(sa6.sin6_addr.in6_u.u6_addr32, src);
    bpf_bind(ctx, (struct sockaddr *)&sa6, sizeof(sa6));
}

#endif /* MESHBPF_LIB_NETNS_H */
