/* addr.h — the 16-byte address form every map uses, and the accessors that read and write
 * it from each kind of context.
 *
 * Why: IPv4 and IPv6 share one code path everywhere (one key layout, one policy lookup)
 * only if every address enters and leaves in the same form: v4-mapped for IPv4
 * (::ffff:a.b.c.d), network order, four __u32. Program contexts only allow 4-byte (or
 * narrower) access to their address fields, so an address is always copied word by word
 * (mb_copy_ip), never with a wider load or a memcpy the compiler may widen.
 */
#ifndef MESHBPF_LIB_ADDR_H
#define MESHBPF_LIB_ADDR_H

#include "types.h"

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

/* The one IPv6 (16-byte) address copy: from or to a context field, a map value or the
 * stack. */
static __always_inline void mb_copy_ip(__u32 *dst, const __u32 *src)
{
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
}

/* A context's address of socket family `family` in the 16-byte form: its IPv4 field
 * (`ip4`, read only for AF_INET) v4-mapped, or its IPv6 field as is. -1 for any other
 * family. Each context type names its fields its own way, so the caller passes both. */
static __always_inline int mb_addr(__u32 family, const __u32 *ip4, const __u32 *ip6,
                                   __u32 *dst)
{
    if (family == MB_AF_INET) {
        mb_map4(dst, *ip4);
        return 0;
    }
    if (family == MB_AF_INET6) {
        mb_copy_ip(dst, ip6);
        return 0;
    }
    return -1;
}

/* 127/8, ::1 — and the unspecified address (0.0.0.0, ::), which connect() treats as local */
static __always_inline int mb_is_loopback(const __u32 *ip)
{
    if (mb_is_mapped(ip))
        return (bpf_ntohl(ip[3]) >> 24) == 127 || ip[3] == 0;
    return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == bpf_htonl(1) || ip[3] == 0);
}

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

/* An AF_INET6 sock_addr context's address (v4-mapped or IPv6) as our 16-byte form. */
static __always_inline void mb_ctx_ip6(struct bpf_sock_addr *ctx, __u32 *ip)
{
    mb_copy_ip(ip, ctx->user_ip6);
}

/* Set an AF_INET6 sock_addr context's address. */
static __always_inline void mb_set_ctx_ip6(struct bpf_sock_addr *ctx, const __u32 *ip)
{
    mb_copy_ip(ctx->user_ip6, ip);
}

/* Loopback as an AF_INET6 socket must dial it: ::ffff:127.0.0.1 for a v4-mapped peer
 * (the socket stays IPv4 on the wire), ::1 for a real IPv6 one. */
static __always_inline void mb_set_ctx_loopback6(struct bpf_sock_addr *ctx, int v4)
{
    __u32 lo[4] = {0, 0, v4 ? bpf_htonl(0x0000ffff) : 0,
                   v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1)};
    mb_set_ctx_ip6(ctx, lo);
}

/* The same connection as its other end keys it: `pairs` and `splice_dirs` are looked up
 * from both ends of a connection. */
static __always_inline void mb_key_reverse(struct sock_key *dst, const struct sock_key *src)
{
    dst->netns = src->netns;
    mb_copy_ip(dst->local_ip, src->remote_ip);
    mb_copy_ip(dst->remote_ip, src->local_ip);
    dst->local_port = src->remote_port;
    dst->remote_port = src->local_port;
}

#endif /* MESHBPF_LIB_ADDR_H */
