// Device-side control of the CUDA backend: the layout of the control region (flags, count
// exchange and layout slots in every rank's buffer), the host-mapped error report, and
// system-scope flags with bounded waits that report a timeout instead of hanging.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fused_a2a/config.h"

namespace fa2a::cuda {

// ---------------------------------------------------------------------------------------------
// Control region (kControlBytes = 64 KiB at the start of every rank's buffer), CUDA backend.
// Local words are touched only by this rank; slots are written by peers (indexed by the writer).
// Slots used by consecutive ops alternate by the parity of the op sequence number, so a late
// reader of op m never sees op m+1's payload (see NOTES in dispatch.cu).
struct LocalState {
  unsigned long long seq;         // ops completed on this buffer (same on every rank)
  unsigned int blocks_done;       // last-block detection at kernel end
  unsigned int round_done;        // receiver warps done, counted over rounds
  unsigned int abort;             // set on a timeout: later waits and kernels bail out
  unsigned int error_phase;       // first timeout: phase code
  unsigned long long error_mask;  // ranks waited for when timing out
  unsigned int items_claimed;     // sender items claimed by the running op (next_item)
  unsigned int recv_claimed;      // dispatch receiver items claimed (FUSED_A2A_CUDA_RECV_ITEMS)
  unsigned int scan_done;         // blocks past the route scan's second pass (fused_scan)
};

struct NotifySlot {  // sender s -> receiver r, dispatch count exchange
  unsigned long long flag;
  int count;     // tokens of s routed to r
  int n_tokens;  // N of s
};

struct MsgSlot {  // X -> Y: "X is in op m (round k)" plus payload words
  unsigned long long epoch;
  int a;
  int b;
  int c;
  int d;
  unsigned long long wide;  // a 64-bit word (the dispatch's direct-rows delta, dispatch.cu)
};

constexpr size_t kLocalOffset = 0;
constexpr size_t kNotifyOffset = 256;                                              // [2][kMaxRanks]
constexpr size_t kMsgOffset = kNotifyOffset + 2 * kMaxRanks * sizeof(NotifySlot);  // [2][2][64]
constexpr size_t kExpertOffset = 12288;  // [2][kMaxExpertsNotify]
constexpr int kMaxExpertsNotify = 2048;  // E limit of the count exchange (G * L ints per parity)
constexpr size_t kFlagOffset = 32768;
constexpr int kNumFlags = 4096;  // u64 chunk flags
static_assert(sizeof(LocalState) <= kNotifyOffset, "control layout (local state)");
static_assert(kMsgOffset + 4 * kMaxRanks * sizeof(MsgSlot) <= kExpertOffset, "control layout");
static_assert(kExpertOffset + 2 * kMaxExpertsNotify * sizeof(int) <= kFlagOffset, "control");
static_assert(kFlagOffset + kNumFlags * 8 <= 65536, "control layout");
// HybridEP (hybrid_*.cu): its own words in the gap between the expert counts and the chunk
// flags, never touched by the normal-mode kernels (see hybrid.cuh).
constexpr size_t kHybridOffset = kExpertOffset + 2 * kMaxExpertsNotify * sizeof(int);
constexpr size_t kHybridBytes = 64 + 2 * kMaxRanks * sizeof(unsigned long long);
static_assert(kHybridOffset + kHybridBytes <= kFlagOffset, "control layout (hybrid)");

// Static dispatch, G <= kLayoutMaxRanks (FUSED_A2A_CUDA_LAYOUT=ready turns it off): every rank
// writes its count row and its receive parameters to every rank, so a sender computes each
// receiver's placement of its rows itself and round 0 needs no ready message (one NVLink round
// trip less).
constexpr int kLayoutMaxRanks = 8;
struct LayoutSlot {  // source s -> every rank, [parity][s]
  unsigned long long flag;
  int count[kLayoutMaxRanks];  // tokens of s routed to each rank
  int n_tokens;                // N of s
  int warps2;                  // chunks_per_warp x s's sender warps (its chunk rows; dispatch.cu)
  int chunk;                   // s's largest chunk (rows)
  int pad;
  long long capacity;  // rows of s's recv_x
  long long window;    // rows of s's receive window
  // s's recv_x minus s's buffer base (a peer adds its mapping of that base), for senders to
  // write their rows straight into (the static dispatch's direct rows, FUSED_A2A_CUDA_DIRECT;
  // dispatch.cu), or 0: rows go to s's window
  unsigned long long direct_rows;
};
constexpr size_t kLayoutOffset = (kHybridOffset + kHybridBytes + 255) & ~size_t(255);
// FUSED_A2A_CUDA_LAYOUT=dynamic: dispatch_notify copies every source's LayoutSlot here (this
// rank's own copy, written and read by this rank only), for the dispatch_data after it. A peer may
// rewrite the LayoutSlot of that parity as soon as it starts the op after the data op.
constexpr size_t kLayoutStashOffset = kLayoutOffset + 2 * kLayoutMaxRanks * sizeof(LayoutSlot);
static_assert(kLayoutStashOffset + kLayoutMaxRanks * sizeof(LayoutSlot) <= kFlagOffset,
              "control layout (layout slots)");

enum MsgKind { kMsgDispatch = 0, kMsgCombine = 1 };

__host__ __device__ inline LocalState* local_state(uint8_t* ctrl) {
  return reinterpret_cast<LocalState*>(ctrl + kLocalOffset);
}
__host__ __device__ inline NotifySlot* notify_slot(uint8_t* ctrl, int parity, int src) {
  return reinterpret_cast<NotifySlot*>(ctrl + kNotifyOffset) + parity * kMaxRanks + src;
}
__host__ __device__ inline int* notify_experts(uint8_t* ctrl, int parity) {
  return reinterpret_cast<int*>(ctrl + kExpertOffset) + parity * kMaxExpertsNotify;
}
__host__ __device__ inline LayoutSlot* layout_slot(uint8_t* ctrl, int parity, int src) {
  return reinterpret_cast<LayoutSlot*>(ctrl + kLayoutOffset) + parity * kLayoutMaxRanks + src;
}
__host__ __device__ inline LayoutSlot* layout_stash(uint8_t* ctrl, int src) {
  return reinterpret_cast<LayoutSlot*>(ctrl + kLayoutStashOffset) + src;
}
// A LayoutSlot's payload (all but its flag): count[i] = count_to(i) for the G ranks.
template <typename CountTo>
__device__ inline void store_layout(LayoutSlot* slot, int G, CountTo count_to, int n_tokens,
                                    int warps2, int chunk, long long capacity, long long window,
                                    unsigned long long direct_rows = 0) {
  for (int i = 0; i < G; ++i) slot->count[i] = count_to(i);
  slot->n_tokens = n_tokens;
  slot->warps2 = warps2;
  slot->chunk = chunk;
  slot->capacity = capacity;
  slot->window = window;
  slot->direct_rows = direct_rows;
}
__device__ inline void copy_layout(LayoutSlot* to, const volatile LayoutSlot* from, int G) {
  store_layout(
      to, G, [&](int i) { return from->count[i]; }, from->n_tokens, from->warps2, from->chunk,
      from->capacity, from->window, from->direct_rows);
}
__host__ __device__ inline MsgSlot* msg_slot(uint8_t* ctrl, int kind, int parity, int src) {
  return reinterpret_cast<MsgSlot*>(ctrl + kMsgOffset) + (kind * 2 + parity) * kMaxRanks + src;
}
__host__ __device__ inline unsigned long long* chunk_flag(uint8_t* ctrl, int index) {
  return reinterpret_cast<unsigned long long*>(ctrl + kFlagOffset) + index;
}

// Epoch of (op sequence number, round): strictly increasing over a buffer's life, so flags only
// ever grow and waits compare with >=.
__host__ __device__ inline unsigned long long epoch_of(unsigned long long seq, int round) {
  return ((seq + 1ull) << 32) | static_cast<unsigned int>(round);
}

// ---------------------------------------------------------------------------------------------
// Error reporting: the first timeout is written to host-mapped memory that the host reads.
struct HostError {
  volatile int code;  // 0: none; 1: timeout
  volatile int op;
  volatile int phase;
  volatile int rank;
  volatile unsigned long long missing;  // bit i: rank i did not arrive
  volatile double seconds;
};

enum OpCode {
  kOpDispatch = 1,
  kOpNotify = 2,
  kOpDispatchData = 3,
  kOpCombine = 4,
  kOpHybridNotify = 5,
  kOpHybridDispatch = 6,
  kOpHybridCombine = 7
};
enum PhaseCode {
  kPhaseNotify = 1,  // waiting for a peer's token counts
  kPhaseReady = 2,   // waiting for a peer to start the op (free buffer, offsets)
  kPhaseData = 3,    // waiting for a peer's rows
  kPhaseRound = 4,   // waiting for a peer to drain the previous round
};

struct WaitCtx {
  LocalState* local;
  HostError* host_error;
  unsigned long long timeout_ns;
  int op;
  int rank;
  bool acquire_first = false;  // wait_until's first load (LaunchConfig::wait_acquire_first)
};

// Programmatic dependent launch (FUSED_A2A_CUDA_PDL=1, launch_kernel): a kernel launched with
// the attribute may start while the kernel before it in the stream still runs, and waits here
// for that kernel's completion and memory; the route scans let it start at once. Both are no-ops
// for kernels launched without the attribute.
__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Polling load: no ordering, so no L1 invalidation. An acquire (ld.acquire / fence) compiles to
// CCTL.IVALL, which drops the SM's whole L1 (spilled registers, __ldg data of every warp on the
// SM) at every spin. Polling relaxed and acquiring once made no measurable difference (session 5,
// run 16) but does the same with fewer invalidations.
__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// GPU scope: a flag that only the blocks of this rank's kernel read (the route scan's tiles).
__device__ __forceinline__ void st_release_gpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int ld_volatile_int(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}

// This rank's (token, local expert j) pairs from every source, summed over the G sources' rows
// of notify_experts(ctrl, parity) (the count exchange's per-expert counts), for j = `j`.
__device__ __forceinline__ int received_expert_pairs(uint8_t* ctrl, int parity, int G, int lpr,
                                                     int j) {
  const int* experts = notify_experts(ctrl, parity);
  int v = 0;
  for (int s = 0; s < G; ++s) v += ld_volatile_int(&experts[s * lpr + j]);
  return v;
}

// The count exchange's totals over the G sources (counts[s] rows from source s, n_tokens[s] its N):
// the rows this rank receives and the group's largest N.
struct ExchangeTotals {
  int rows;
  int max_tokens;
};
__device__ __forceinline__ ExchangeTotals exchange_totals(const int* counts, const int* n_tokens,
                                                          int G) {
  long long rows = 0;
  int max_tokens = 0;
  for (int s = 0; s < G; ++s) {
    rows += counts[s];
    max_tokens = max(max_tokens, n_tokens[s]);
  }
  return {static_cast<int>(rows), max_tokens};
}

// dispatch_notify's host counts [0, 3): rows received (the true count), 0 dropped, the group's
// largest N (ops.h, DispatchArgs::host_counts).
__device__ __forceinline__ void store_host_totals(int* host_counts, ExchangeTotals t) {
  host_counts[0] = t.rows;
  host_counts[1] = 0;
  host_counts[2] = t.max_tokens;
}

__device__ __forceinline__ bool aborted(const WaitCtx& ctx) {
  return *reinterpret_cast<volatile unsigned int*>(&ctx.local->abort) != 0;
}

__device__ inline void report_timeout(const WaitCtx& ctx, int phase, int peer) {
  atomicOr(&ctx.local->error_mask, 1ull << (peer & 63));
  unsigned int prev = atomicCAS(&ctx.local->abort, 0u, 1u);
  if (prev == 0u) {
    ctx.local->error_phase = phase;
    ctx.host_error->op = ctx.op;
    ctx.host_error->phase = phase;
    ctx.host_error->rank = ctx.rank;
    ctx.host_error->seconds = static_cast<double>(ctx.timeout_ns) * 1e-9;
  }
  __threadfence();
  ctx.host_error->missing = ctx.local->error_mask;
  __threadfence_system();
  ctx.host_error->code = 1;
  __threadfence_system();
}

// Spin until done(*flag), then acquire it once (the caller's later reads are ordered after the
// peer's release). The spin itself uses relaxed loads: see ld_relaxed_sys. Returns false on a
// timeout (reported) or an abort elsewhere. ctx.acquire_first: the first load is the acquire, so
// a flag that is already up costs one round trip instead of two (a combine reducer waits on a new
// chunk's flag at almost every token: its tokens are 288 apart at 24 SMs), at the price of one
// more L1 invalidation where it is not up yet.
template <typename Done>
__device__ inline bool wait_until(const unsigned long long* flag, Done&& done, const WaitCtx& ctx,
                                  int phase, int peer) {
  if (ctx.acquire_first && done(ld_acquire_sys(flag))) return true;
  if (!done(ld_relaxed_sys(flag))) {
    const unsigned long long start = globaltimer();
    for (unsigned int it = 1; !done(ld_relaxed_sys(flag)); ++it) {
      if (it > 64) __nanosleep(64);
      if ((it & 255u) == 0u) {
        if (aborted(ctx)) return false;
        if (globaltimer() - start > ctx.timeout_ns) {
          report_timeout(ctx, phase, peer);
          return false;
        }
      }
    }
  }
  (void)ld_acquire_sys(flag);
  return true;
}

// Spin until *flag >= target: a value >= target comes from the peer's release of target or a
// later release of its own.
__device__ inline bool wait_flag(const unsigned long long* flag, unsigned long long target,
                                 const WaitCtx& ctx, int phase, int peer) {
  return wait_until(flag, [target](unsigned long long v) { return v >= target; }, ctx, phase, peer);
}

// Spin until *flag == value (a tag: unlike a counter, a stale word may hold any value).
__device__ inline bool wait_equal(const unsigned long long* flag, unsigned long long value,
                                  const WaitCtx& ctx, int phase, int peer) {
  return wait_until(flag, [value](unsigned long long v) { return v == value; }, ctx, phase, peer);
}

}  // namespace fa2a::cuda
