// Device-side row copies of the CUDA backend: whole-warp copies with plain loads and stores, and
// Hopper bulk async copies (cp.async.bulk) with the per-warp staging ring (TmaPipe) that moves
// rows into peer memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "control.cuh"

namespace fa2a::cuda {

// ---------------------------------------------------------------------------------------------
// Copies. Rows are 16-byte multiples at 16-byte aligned addresses (checked on the host).
__device__ __forceinline__ int4 ld_cg(const int4* p) { return __ldcg(p); }

// Whole warp copies `bytes` (multiple of 16) with Load's 16-byte loads and plain stores, U loads in
// flight per lane.
struct LoadCoherent {  // data written by peers
  __device__ __forceinline__ int4 operator()(const int4* p) const { return ld_cg(p); }
};
struct LoadReadOnly {  // sources that do not change during the kernel
  __device__ __forceinline__ int4 operator()(const int4* p) const { return __ldg(p); }
};
template <typename Load, int U>
__device__ inline void warp_copy(void* dst, const void* src, size_t bytes, int lane) {
  const Load load;
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  const size_t n = bytes / 16;
  size_t i = lane;
  for (; i + (U - 1) * 32 < n; i += U * 32) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) d[i + u * 32] = v[u];
  }
  for (; i < n; i += 32) d[i] = load(s + i);
}

// Coherent loads (data written by peers). U 16-byte loads in flight per lane (8 by default; 16
// doubles the bytes in flight of a latency-bound copy, at the cost of 32 more registers).
template <int U = 8>
__device__ inline void warp_copy_cg(void* dst, const void* src, size_t bytes, int lane) {
  warp_copy<LoadCoherent, U>(dst, src, bytes, lane);
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

// Read-only path: a source that does not change during the kernel (inputs).
__device__ inline void warp_copy_ro(void* dst, const void* src, size_t bytes, int lane) {
  warp_copy<LoadReadOnly, 8>(dst, src, bytes, lane);
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

// An L2 prefetch of `bytes` (a multiple of 16) at a 16-byte aligned global address by the bulk
// copy unit (cp.async.bulk.prefetch): a hint, with no registers held and nothing to wait for.
__device__ __forceinline__ void bulk_prefetch_l2(const void* gsrc, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(gsrc), "r"(bytes) : "memory");
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

constexpr int kMaxStages = 16;
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

}  // namespace fa2a::cuda
