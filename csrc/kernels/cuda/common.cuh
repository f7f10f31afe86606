// Device-side building blocks of the CUDA backend: system-scope flags, bounded waits with a
// timeout report, the layout of the control region, and the bulk-copy (TMA) pipeline that moves
// rows into peer memory.
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

struct MsgSlot {  // X -> Y: "X is in op m (round k)" plus three payload words
  unsigned long long epoch;
  int a;
  int b;
  int c;
  int pad;
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
                                    int warps2, int chunk, long long capacity, long long window) {
  for (int i = 0; i < G; ++i) slot->count[i] = count_to(i);
  slot->n_tokens = n_tokens;
  slot->warps2 = warps2;
  slot->chunk = chunk;
  slot->capacity = capacity;
  slot->window = window;
}
__device__ inline void copy_layout(LayoutSlot* to, const volatile LayoutSlot* from, int G) {
  store_layout(
      to, G, [&](int i) { return from->count[i]; }, from->n_tokens, from->warps2, from->chunk,
      from->capacity, from->window);
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
// timeout (reported) or an abort elsewhere.
template <typename Done>
__device__ inline bool wait_until(const unsigned long long* flag, Done&& done, const WaitCtx& ctx,
                                  int phase, int peer) {
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

// ---------------------------------------------------------------------------------------------
// Copies. Rows are 16-byte multiples at 16-byte aligned addresses (checked on the host).
__device__ __forceinline__ int4 ld_cg(const int4* p) { return __ldcg(p); }

// Whole warp copies `bytes` (multiple of 16): coherent loads (data written by peers), plain
// stores. U 16-byte loads in flight per lane (8 by default; 16 doubles the bytes in flight of a
// latency-bound copy, at the cost of 32 more registers).
template <int U = 8>
__device__ inline void warp_copy_cg(void* dst, const void* src, size_t bytes, int lane) {
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  const size_t n = bytes / 16;
  size_t i = lane;
  for (; i + (U - 1) * 32 < n; i += U * 32) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = ld_cg(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) d[i + u * 32] = v[u];
  }
  for (; i < n; i += 32) d[i] = ld_cg(s + i);
}

// Whole warp copies `bytes` (multiple of 16) from src to dst_base + pos_b * dst_stride for every
// lane b in `mask` (pos held by lane b; mask warp-uniform): each piece of the row is loaded once
// (coherent loads) and stored to every destination, so a row that goes to M places costs one
// read and M writes, and a warp has M x the stores in flight per load round trip.
__device__ inline void warp_copy_fanout_cg(uint8_t* dst_base, size_t dst_stride, long long pos,
                                           unsigned mask, const void* src, size_t bytes, int lane) {
  constexpr int U = 8;
  const int4* s = reinterpret_cast<const int4*>(src);
  const size_t n = bytes / 16;
  for (size_t base = 0; base < n; base += U * 32) {  // warp-uniform: the shuffles below
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t i = base + u * 32 + lane;
      if (i < n) v[u] = ld_cg(s + i);
    }
    for (unsigned m = mask; m; m &= m - 1) {
      const long long at = __shfl_sync(0xffffffffu, pos, __ffs(m) - 1);
      int4* d = reinterpret_cast<int4*>(dst_base + static_cast<size_t>(at) * dst_stride);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const size_t i = base + u * 32 + lane;
        if (i < n) d[i] = v[u];
      }
    }
  }
}

// A row's first kHeadPieces x 32 16-byte pieces, loaded ahead by the whole warp (lane l holds
// pieces l, l + 32, ...), so that their latency overlaps the work before the copy (HybridEP: the
// item's routing header). Read-only path: sources that do not change during the kernel.
constexpr int kHeadPieces = 8;
struct RowHead {
  int4 v[kHeadPieces];
};
__device__ __forceinline__ void warp_load_head(RowHead& head, const void* src, size_t bytes,
                                               int lane) {
  const int4* s = reinterpret_cast<const int4*>(src);
  const size_t n = bytes / 16;
#pragma unroll
  for (int u = 0; u < kHeadPieces; ++u) {
    const size_t i = static_cast<size_t>(u) * 32 + lane;
    if (i < n) head.v[u] = __ldg(s + i);
  }
}

// Whole warp copies `bytes` (multiple of 16) from a source that does not change during the kernel
// (inputs): read-only path.
__device__ inline void warp_copy_ro(void* dst, const void* src, size_t bytes, int lane) {
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  const size_t n = bytes / 16;
  size_t i = lane;
  constexpr int U = 8;
  for (; i + (U - 1) * 32 < n; i += U * 32) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldg(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) d[i + u * 32] = v[u];
  }
  for (; i < n; i += 32) d[i] = __ldg(s + i);
}

// warp_copy_ro of a row whose head (warp_load_head of the same src and bytes) is already loaded:
// the head is stored, the rest copied as before.
__device__ inline void warp_copy_ro_after_head(void* dst, const void* src, size_t bytes,
                                               const RowHead& head, int lane) {
  const size_t n = bytes / 16, done = min(n, static_cast<size_t>(kHeadPieces) * 32);
  int4* d = reinterpret_cast<int4*>(dst);
#pragma unroll
  for (int u = 0; u < kHeadPieces; ++u) {
    const size_t i = static_cast<size_t>(u) * 32 + lane;
    if (i < n) d[i] = head.v[u];
  }
  if (n > done) warp_copy_ro(d + done, static_cast<const int4*>(src) + done, (n - done) * 16, lane);
}

__device__ inline void warp_zero(void* dst, size_t bytes, int lane) {
  int4* d = reinterpret_cast<int4*>(dst);
  const size_t n = bytes / 16;
  for (size_t i = lane; i < n; i += 32) d[i] = make_int4(0, 0, 0, 0);
}

// ---------------------------------------------------------------------------------------------
// Hopper bulk async copies (cp.async.bulk): global -> shared (completes on an mbarrier), then
// shared -> global (local or a peer's memory), tracked by bulk groups.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async;" ::: "memory");
}

__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

__device__ __forceinline__ void bulk_load(void* smem_dst, const void* gsrc, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_u32(smem_dst)),
      "l"(gsrc), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ void bulk_store(void* gdst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gdst),
               "r"(smem_u32(smem_src)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// bulk_wait_read<N> (kRead) or bulk_wait<N> for a run-time N (0..14; larger waits for every
// group, which is stricter, never looser).
template <bool kRead, int N>
__device__ __forceinline__ void bulk_wait_n() {
  if constexpr (kRead) {
    bulk_wait_read<N>();
  } else {
    bulk_wait<N>();
  }
}
template <bool kRead>
__device__ __forceinline__ void bulk_wait_upto_n(uint32_t n) {
  switch (n) {
      // clang-format off
    case 1: bulk_wait_n<kRead, 1>(); break;   case 2: bulk_wait_n<kRead, 2>(); break;
    case 3: bulk_wait_n<kRead, 3>(); break;   case 4: bulk_wait_n<kRead, 4>(); break;
    case 5: bulk_wait_n<kRead, 5>(); break;   case 6: bulk_wait_n<kRead, 6>(); break;
    case 7: bulk_wait_n<kRead, 7>(); break;   case 8: bulk_wait_n<kRead, 8>(); break;
    case 9: bulk_wait_n<kRead, 9>(); break;   case 10: bulk_wait_n<kRead, 10>(); break;
    case 11: bulk_wait_n<kRead, 11>(); break; case 12: bulk_wait_n<kRead, 12>(); break;
    case 13: bulk_wait_n<kRead, 13>(); break; case 14: bulk_wait_n<kRead, 14>(); break;
    // clang-format on
    default:
      bulk_wait_n<kRead, 0>();
  }
}
__device__ __forceinline__ void bulk_wait_read_upto(uint32_t n) { bulk_wait_upto_n<true>(n); }
__device__ __forceinline__ void bulk_wait_upto(uint32_t n) { bulk_wait_upto_n<false>(n); }

// Item idx of a round's rows x cols rectangle of (chunk, peer column) items, chunk-major (the
// columns innermost: every peer's chunk c before any chunk c + 1) or column-major. Each warp
// visits only its own items (benchmarks/NOTES.md, session 5): idx = warp, warp + warps, ..., or
// the numbers it claims (next_item). Host-callable for tests/cuda_host/rect_items_check.cu.
struct RectItem {
  long long chunk;
  int col;
};
__host__ __device__ __forceinline__ RectItem rect_item(long long idx, long long rows, int cols,
                                                       bool col_major) {
  if (col_major) return RectItem{idx % rows, static_cast<int>(idx / rows)};
  return RectItem{idx / cols, static_cast<int>(idx % cols)};
}

constexpr int kMaxStages = 16;
constexpr int kMaxThreads = 512;  // threads of a communication block (send + receive warps)
constexpr uint32_t kFlagLag = 4;  // store groups issued after a chunk before its flag is released

// One warp's ring of S shared-memory stages; only lane 0 calls its methods. Piece n is loaded
// into stage n % S; its store is issued when piece n + A is pushed (A loads ahead, 1 <= A <= S - 2;
// default S - 2), so A loads and up to S - A stores are in flight. Requires S >= 3. The store
// bytes in flight bound a warp's NVLink rate: 2 x 14 KB for bf16 rows at H = 7168 (S = 3), but
// only 2 x 7 KB for FP8 rows (S = 7) unless A is lowered (FUSED_A2A_CUDA_LOADS_AHEAD).
// Staged stores (metadata the warp wrote to shared memory) are separate bulk groups issued at
// once, without waiting for the loads in flight, so a chunk end never drains the ring.
// A finished chunk's flag is released kFlagLag store groups after the chunk's last group (once
// those groups' writes are complete); drain() releases it at once.
// Shared memory of one ring of S stages of sb bytes (TmaPipe::init's layout): the stages, then
// S mbarriers, S destinations, S lengths.
__host__ __device__ constexpr size_t tma_pipe_bytes(size_t sb, size_t S) { return S * (sb + 20); }

struct TmaPipe {
  uint8_t* smem;   // S * stage_bytes
  uint64_t* bars;  // S mbarriers
  uint8_t** dsts;  // S destinations (shared memory)
  uint32_t* lens;  // S lengths (shared memory)
  uint32_t stage_bytes;
  uint32_t stages;
  uint32_t lead;                  // loads ahead of the stores (A)
  uint32_t n;                     // pieces pushed (loads issued)
  uint32_t stored;                // pieces whose store was issued
  uint32_t groups;                // bulk store groups committed (piece stores and staged stores)
  uint32_t phase;                 // bit s: parity of the next completion of stage s's mbarrier
  unsigned long long* pend_flag;  // chunk flag waiting for its writes to complete
  unsigned long long pend_value;
  uint32_t pend_pieces;  // the chunk's pieces are [0, pend_pieces)
  uint32_t pend_groups;  // once they are all stored: its groups are [0, pend_groups); else 0
  bool sys_fence;        // a fence.sc.sys before each flag (FUSED_A2A_CUDA_FLAG_FENCE=sc)

  // base: tma_pipe_bytes(sb, S) bytes of shared memory, 128-byte aligned (sb a multiple of 16).
  // loads_ahead: A (0 or out of range: S - 2).
  __device__ void init(uint8_t* base, uint32_t sb, uint32_t S, bool fence_sc, int loads_ahead) {
    const size_t data = static_cast<size_t>(S) * sb;
    smem = base;
    bars = reinterpret_cast<uint64_t*>(base + data);
    dsts = reinterpret_cast<uint8_t**>(base + data + 8 * S);
    lens = reinterpret_cast<uint32_t*>(base + data + 16 * S);
    stage_bytes = sb;
    stages = S;
    lead = loads_ahead >= 1 && static_cast<uint32_t>(loads_ahead) <= S - 2 ? loads_ahead : S - 2;
    n = 0;
    stored = 0;
    groups = 0;
    phase = 0;
    pend_flag = nullptr;
    pend_value = 0;
    pend_pieces = 0;
    pend_groups = 0;
    sys_fence = fence_sc;
    for (uint32_t i = 0; i < S; ++i) mbar_init(&bars[i], 1);
    fence_mbar_init();
  }

  // The chunk's bulk writes are complete (bulk_wait); the proxy fence orders them before the
  // generic-proxy release of the flag, which a peer acquires.
  __device__ __forceinline__ void release_pending() {
    fence_proxy_async();
    if (sys_fence) __threadfence_system();
    st_release_sys(pend_flag, pend_value);
    pend_flag = nullptr;
  }

  // After a commit: note where the pending chunk's groups end; release its flag kFlagLag
  // groups later.
  __device__ __forceinline__ void committed() {
    ++groups;
    if (!pend_flag) return;
    if (pend_groups == 0 && stored >= pend_pieces) pend_groups = groups;
    if (pend_groups != 0 && groups >= pend_groups + kFlagLag) {
      bulk_wait<kFlagLag>();  // every group but the newest kFlagLag is complete
      release_pending();
    }
  }

  __device__ __forceinline__ void store_one() {
    const uint32_t m = stored;
    const uint32_t s = m % stages;
    mbar_wait(&bars[s], (phase >> s) & 1u);
    phase ^= 1u << s;
    bulk_store(dsts[s], smem + static_cast<size_t>(s) * stage_bytes, lens[s]);
    bulk_commit();
    ++stored;
    committed();
  }

  __device__ __forceinline__ void push(void* dst, const void* src, uint32_t bytes) {
    const uint32_t s = n % stages;
    if (n >= stages) {
      // Stage s held piece n - S, stored at push(n - S + A) or earlier; the S - A - 1 pieces
      // after it up to n - A - 1 were stored after it: only groups newer than those may still
      // read shared memory when piece n - S's has.
      while (stored + stages <= n) store_one();
      bulk_wait_read_upto(stages - lead - 1);
    }
    dsts[s] = reinterpret_cast<uint8_t*>(dst);
    lens[s] = bytes;
    mbar_expect_tx(&bars[s], bytes);
    bulk_load(smem + static_cast<size_t>(s) * stage_bytes, src, bytes, &bars[s]);
    ++n;
    while (stored + lead < n) store_one();
  }

  // Pushes a contiguous span as pieces of at most stage_bytes.
  __device__ __forceinline__ void push_span(void* dst, const void* src, size_t bytes) {
    uint8_t* d = reinterpret_cast<uint8_t*>(dst);
    const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
    while (bytes > 0) {
      const uint32_t piece = bytes > stage_bytes ? stage_bytes : static_cast<uint32_t>(bytes);
      push(d, s, piece);
      d += piece;
      s += piece;
      bytes -= piece;
    }
  }

  // Store `bytes` (multiple of 16) that the warp staged in shared memory (after a
  // fence.proxy.async.shared::cta and __syncwarp), as its own group, issued now. The caller
  // keeps that shared memory unchanged until a later bulk_wait_read covers the group.
  __device__ __forceinline__ void store_staged(void* dst, const void* smem_src, uint32_t bytes) {
    bulk_store(dst, smem_src, bytes);
    bulk_commit();
    committed();
  }

  // Issue every pending store, wait for all writes, release a pending flag.
  __device__ __forceinline__ void drain() {
    while (stored < n) store_one();
    bulk_wait<0>();
    if (pend_flag) release_pending();
  }

  // The pieces pushed and the staged stores issued so far complete a chunk: release `flag` =
  // value once they are written. The caller has made the warp's other stores visible first
  // (fence + __syncwarp).
  // kLean (FUSED_A2A_CUDA_CHUNK_END=lean, a kernel instantiation of its own: the branch costs the
  // dispatch kernel ~50 bytes of spills): a pending earlier chunk whose pieces are all stored is
  // released once its own groups are complete, while the newer groups may still be in flight.
  // With few pieces a chunk (decode: ~2 rows) the drain waits for the new chunk's writes too
  // before the old chunk's flag goes up.
  template <bool kLean = false>
  __device__ __forceinline__ void end_chunk(unsigned long long* flag, unsigned long long value) {
    if (kLean && pend_flag && pend_groups != 0) {  // its pieces are all stored
      bulk_wait_upto(groups - pend_groups);        // every group but the newer ones is complete
      release_pending();
    }
    if (pend_flag) drain();
    pend_flag = flag;
    pend_value = value;
    pend_pieces = n;
    pend_groups = stored >= n ? groups : 0;
  }
};

// A sender warp's next item number after q (items are a round's chunks, each round's numbered
// after the previous round's; start from q = first - stride, first the warp's dealt item). Claimed:
// lane 0 takes the next number from a per-rank counter (LocalState::items_claimed, reset by the
// op's last block) and broadcasts it, so a warp that drew small or local items takes more of them.
// Dealt: q + stride, which with stride a multiple of the columns pins a warp to one column. The
// numbers grow along each warp's walk, so every item of round k is taken before any of round k + 1.
__device__ __forceinline__ long long next_item(bool claim, unsigned int* counter, long long q,
                                               int stride, int lane) {
  if (!claim) return q + stride;
  unsigned int v = 0;
  if (lane == 0) v = atomicAdd(counter, 1u);
  return static_cast<long long>(__shfl_sync(0xffffffffu, v, 0));
}

// Publish a chunk copied by the whole warp with plain stores: every lane's stores become visible
// system-wide before the flag.
__device__ __forceinline__ void warp_release_flag(unsigned long long* flag, unsigned long long v,
                                                  int lane) {
  __threadfence_system();
  __syncwarp();
  if (lane == 0) st_release_sys(flag, v);
  __syncwarp();
}

// Receiver warps of all blocks finished round k (each adds 1 to *counter per round): the warp
// that completes the count runs `last`; then every warp waits until the count is complete, so
// that no warp counts round k + 1 before round k is complete everywhere. Lane 0 only.
template <typename F>
__device__ inline bool round_barrier(unsigned int* counter, unsigned int total, const WaitCtx& ctx,
                                     F last) {
  __threadfence();
  const unsigned int done = atomicAdd(counter, 1u) + 1u;
  if (done == total) last();
  unsigned long long start = 0;
  for (unsigned int it = 0; *reinterpret_cast<volatile unsigned int*>(counter) < total; ++it) {
    if (it > 64) __nanosleep(128);
    if ((it & 255u) == 255u) {
      if (aborted(ctx)) return false;
      if (start == 0) start = globaltimer();
      if (globaltimer() - start > ctx.timeout_ns) {
        report_timeout(ctx, kPhaseRound, ctx.rank);
        return false;
      }
    }
  }
  __threadfence();
  return true;
}

// End of round k for one of the nw receiving warps of the grid (every warp calls it once per
// round): the round barrier over them, whose last arrival tells every peer that this rank's
// window is free for round k + 1 (message `kind`'s slot of this rank, epoch of round k + 1).
// ctrl: this rank's control region (peers[r]). Whole warp; false on a timeout or abort.
__device__ __forceinline__ bool warp_next_round(const WaitCtx& ctx, uint8_t* ctrl,
                                                uint8_t* const* peers, int G, int r, int kind,
                                                unsigned long long seq, long long k, int nw,
                                                int lane) {
  __syncwarp();
  int good = 1;
  if (lane == 0) {
    const int parity = static_cast<int>(seq & 1ull);
    good =
        round_barrier(&local_state(ctrl)->round_done, static_cast<unsigned int>((k + 1) * nw), ctx,
                      [&] {
                        __threadfence_system();
                        for (int s = 0; s < G; ++s)
                          if (s != r)
                            st_release_sys(&msg_slot(peers[s], kind, parity, r)->epoch,
                                           epoch_of(seq, static_cast<int>(k + 1)));
                      })
            ? 1
            : 0;
  }
  return __shfl_sync(0xffffffffu, good, 0) != 0;
}

// Warp-wide bounded wait: lane 0 spins, then every lane acquires the flag itself so that its
// own later accesses are ordered after the peer's release.
__device__ inline bool warp_wait_flag(const unsigned long long* flag, unsigned long long target,
                                      const WaitCtx& ctx, int phase, int peer, int lane) {
  int ok = 1;
  if (lane == 0) ok = wait_flag(flag, target, ctx, phase, peer) ? 1 : 0;
  ok = __shfl_sync(0xffffffffu, ok, 0);
  if (ok) {
    (void)ld_acquire_sys(flag);
    fence_proxy_async();
  }
  return ok != 0;
}

// Rank of expert e, or -1 for "no expert" (-1 and, defensively, anything out of range). 32-bit
// division: e < num_experts fits an int, and a 64-bit division is a long subroutine (it ran once
// per metadata word in the dispatch's senders).
__device__ __forceinline__ int owner_of(long long e, int num_experts, int lpr) {
  return (e >= 0 && e < num_experts) ? static_cast<int>(e) / lpr : -1;
}

// Index loads (int32 or int64 topk_idx).
__device__ __forceinline__ long long load_idx(const void* p, bool idx64, long long i) {
  return idx64 ? __ldg(reinterpret_cast<const long long*>(p) + i)
               : static_cast<long long>(__ldg(reinterpret_cast<const int*>(p) + i));
}

}  // namespace fa2a::cuda
