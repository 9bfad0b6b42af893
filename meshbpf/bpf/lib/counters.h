/* counters.h — the node's event counters: one per-CPU slot per enum mb_counter (types.h).
 *
 * Why per-CPU and by index: every hook counts on its fast path, so a count must never
 * contend across CPUs or cost a hash lookup; Python (`meshbpf status`) sums the slots and
 * names them from the same enum (structs.COUNTERS), so an index never changes meaning.
 */
#ifndef MESHBPF_LIB_COUNTERS_H
#define MESHBPF_LIB_COUNTERS_H

#include "types.h"

BPF_PERCPU_ARRAY(counters, __u64, COUNTER_MAX);

static __always_inline void mb_count(int idx, __u64 n)
{
    __u32 k = idx;
    __u64 *v = counters.lookup(&k);
    if (v)
        *v += n;
}

#endif /* MESHBPF_LIB_COUNTERS_H */
