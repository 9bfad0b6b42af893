/* splice.h — backpressure for same-node splicing (sk_msg.c, sockops.c).
 *
 * Why: sk_msg's BPF_F_INGRESS redirect queues bytes on the peer socket without holding
 * them to its receive buffer, and no BPF hook sees the reader consume them: a writer that
 * outpaces its reader would never block. So a direction is spliced only while it is
 * provably short of a budget: at most node_cfg.splice_limit bytes go into the peer's
 * queue, then the direction leaves the splice and its bytes take the normal TCP path,
 * where the window and the writer's sndbuf block the writer as TCP always does.
 * tcp_bpf_recvmsg reads the spliced queue before the TCP queue, so leaving keeps the byte
 * order. Coming back is safe only once the reader has read every byte the TCP path carried
 * (hence every spliced byte before them): the reader publishes its tcp_sock.copied_seq
 * whenever it sends anything (its sk_msg, or the sockops header-option callback for ACKs
 * and window updates), and the writer re-enters when that equals its own
 * tcp_sock.write_seq. Both fields are read through bpf_skc_to_tcp_sock at offsets taken
 * from the running kernel's BTF (MB_TCP_*_OFF, passed by the loader), since the headers bcc
 * compiles with may be another kernel's. State per direction: struct splice_dir (types.h)
 * in splice_dirs. docs/splice.md has the whole argument and the kernels it holds on.
 */
#ifndef MESHBPF_LIB_SPLICE_H
#define MESHBPF_LIB_SPLICE_H

#include "maps.h"

/* bcc 0.26's helper table may lack it; BPF_FUNC_skc_to_tcp_sock is 137 (Linux 5.9). */
static void *(*mb_skc_to_tcp_sock)(void *sk) = (void *)137;

/* A u32 field of a struct tcp_sock at a BTF-derived constant offset; 0 for no tcp_sock.
 * (A macro: the verifier needs the offset constant to match it against BTF.) */
#define mb_tcp_u32(sk, off) ({                                          \
    char *__tp = mb_skc_to_tcp_sock(sk);                                \
    __tp ? *(volatile __u32 *)(__tp + (off)) : 0; })

#ifdef MB_TCP_COPIED_SEQ_OFF
/* Socket `sk`, the reader of the direction keyed `reader` (its own tuple): publish how far
 * it has read, for a writer waiting on the TCP path to be drained before it splices again.
 * (Only with splicing, which brings the BTF offsets.) */
static __always_inline void mb_splice_publish(struct sock_key *reader, struct bpf_sock *sk)
{
    struct splice_dir *d = splice_dirs.lookup(reader);
    if (d && d->mode == MB_SPLICE_TCP && sk)
        d->copied_seq = mb_tcp_u32(sk, MB_TCP_COPIED_SEQ_OFF);
}
#endif

#endif /* MESHBPF_LIB_SPLICE_H */
