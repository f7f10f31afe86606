// The route scan's passes inside the static dispatch / combine kernel (fused_scan, state.h:
// the default above 1024 tokens since session 14; FUSED_A2A_CUDA_SCAN=fused forces it at every
// N). The second pass always: route_mask_kernel (layout.cu) ran the first, so the kernel
// launch that ran the second (route_list_kernel, ~4.5 us at N = 4096, runs 51-66) is gone, and
// the handshake's round trip at the kernel's start overlaps this pass (the counts per
// destination come from the first pass's tile counts). The first pass too with
// FUSED_A2A_CUDA_SCAN_PASS1=fused (session 25): no route_mask_kernel before the kernel (4.4 us
// at N = 4096 in run 135's profile), each tile's counts published by a flag.
#pragma once

#include "common.cuh"
#include "state.h"

namespace fa2a::cuda {

// What the first pass writes when the kernel runs it (topk_idx set; null: route_mask_kernel ran
// it before the kernel).
struct ScanPass1 {
  const void* topk_idx = nullptr;  // [N][num_topk], int32 or int64 (idx64)
  bool idx64 = false;
  int num_topk = 0, num_experts = 0;
  unsigned long long* masks = nullptr;      // [N]
  int* tile_count = nullptr;                // [tiles][kMaxRanks]
  int* tile_ecount = nullptr;               // [tiles][num_experts], or null: not counted
  unsigned long long* tile_flag = nullptr;  // [kMaxScanTiles]: the op's epoch once tile j is out
};

// What the second pass reads and writes. tiles > 0 only when the kernel runs it.
struct ScanPass2 {
  int tiles = 0, per = 0;  // tiles of per x kScanThreads tokens (route_mask_kernel's grid)
  const unsigned long long* masks = nullptr;  // [N]: bit d = routed to rank d
  const int* tile_count = nullptr;            // [tiles][kMaxRanks]: tokens per rank
  int* cum = nullptr;        // [G][N + 1]: cum[d][N] always, cum[d][t] with write_cum
  int* send_list = nullptr;  // [G][N] or null
  bool write_cum = false;
  ScanPass1 pass1;  // the first pass, when the kernel runs it too
};

// Pass 1 of tile `tile` (tokens [tile, tile + 1) x per x kScanThreads) by the whole block: each
// token's destination mask (bit d: routed to rank d) into masks, the tile's tokens per
// destination into tile_count[tile][d], and with tile_ecount its (token, slot) pairs per expert
// into tile_ecount[tile][e] (s_ecount: num_experts ints of shared memory). The tokens of a step
// are consecutive across the block's threads, so its index loads are coalesced.
__device__ inline void route_mask_tile(const void* topk_idx, bool idx64, int num_tokens,
                                       int num_topk, int num_experts, int num_ranks, int per,
                                       int tile, unsigned long long* masks, int* tile_count,
                                       int* tile_ecount, int* s_ecount) {
  __shared__ int s_count[kMaxRanks];
  const int tid = threadIdx.x, lane = tid & 31;
  __syncthreads();  // an earlier tile's counts are written out
  if (tile_ecount)
    for (int e = tid; e < num_experts; e += blockDim.x) s_ecount[e] = 0;
  for (int d = tid; d < num_ranks; d += blockDim.x) s_count[d] = 0;
  __syncthreads();
  const int lpr = num_experts / num_ranks;
  const int tile_tokens = kScanThreads * per, t0 = tile * tile_tokens;
  for (int i0 = 0; i0 < tile_tokens; i0 += blockDim.x) {  // block-uniform trip count
    const int i = i0 + tid, t = t0 + i;
    unsigned long long mask = 0;
    if (i < tile_tokens && t < num_tokens) {
      for (int k = 0; k < num_topk; ++k) {
        const long long e = load_idx(topk_idx, idx64, static_cast<long long>(t) * num_topk + k);
        const int o = owner_of(e, num_experts, lpr);
        if (o >= 0) {
          mask |= 1ull << o;
          if (tile_ecount) atomicAdd(&s_ecount[static_cast<int>(e)], 1);
        }
      }
      masks[t] = mask;
    }
    for (int d = 0; d < num_ranks; ++d) {  // warp-aggregated counts per destination
      const int c = __popc(__ballot_sync(0xffffffffu, (mask >> d) & 1ull));
      if (lane == 0 && c) atomicAdd(&s_count[d], c);
    }
  }
  __syncthreads();
  for (int d = tid; d < num_ranks; d += blockDim.x) tile_count[tile * kMaxRanks + d] = s_count[d];
  if (tile_ecount)
    for (int e = tid; e < num_experts; e += blockDim.x)
      tile_ecount[static_cast<size_t>(tile) * num_experts + e] = s_ecount[e];
}

// The first pass in the kernel (a.pass1.topk_idx set; else nothing to do): this block's tiles
// (b, b + grid, ...), each published by its flag = e0 (the op's epoch, so a flag of an earlier op
// is below it), then every tile's flag awaited, so that every tile's counts and masks may be read.
// The blocks of a communication kernel are co-resident, and every block passes its own tiles
// before it waits. False on a timeout (reported) or an abort.
__device__ inline bool scan_pass1(const ScanPass2& a, int num_tokens, int num_ranks,
                                  unsigned long long e0, const WaitCtx& ctx, int* s_ecount) {
  const ScanPass1& q = a.pass1;
  if (!q.topk_idx) return true;
  for (int tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    route_mask_tile(q.topk_idx, q.idx64, num_tokens, q.num_topk, q.num_experts, num_ranks, a.per,
                    tile, q.masks, q.tile_count, q.tile_ecount, s_ecount);
    __threadfence();  // every thread's writes of the tile, as scan_barrier's arrivals
    __syncthreads();
    if (threadIdx.x == 0) st_release_gpu(&q.tile_flag[tile], e0);
  }
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  for (int j = threadIdx.x; j < a.tiles; j += blockDim.x)
    if (!wait_flag(&q.tile_flag[j], e0, ctx, kPhaseRound, ctx.rank)) s_ok = 0;
  __syncthreads();  // the waiting threads' acquires before every thread's reads
  return s_ok != 0;
}

// Exclusive prefix sum of v over the block (any multiple of 32 threads, at most 1024), in thread
// order; *total = the block's sum. s_warp: 33 T of shared memory. Ends with a barrier, so s_warp
// may be reused by the next call.
template <typename T>
__device__ inline T block_exclusive_sum(T v, T* s_warp, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  T incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < warps ? s_warp[lane] : T(0);
    T run = w;
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, run, o);
      if (lane >= o) run += y;
    }
    if (lane < warps) s_warp[lane] = run - w;  // warps before this one
    if (lane == 31) s_warp[32] = run;
  }
  __syncthreads();
  const T before = s_warp[warp] + incl - v;
  *total = s_warp[32];
  __syncthreads();
  return before;
}

// Tokens of tiles [0, tiles) routed to rank d (the first pass's tile counts).
__device__ __forceinline__ int tiles_count(const ScanPass2& a, int d, int tiles) {
  int n = 0;
  for (int j = 0; j < tiles; ++j) n += a.tile_count[j * kMaxRanks + d];
  return n;
}

// The second pass over this block's tiles (b, b + grid, ...), as route_list_kernel writes it:
// every destination's send list in token order, cum[d][t] (write_cum), cum[d][N] (last tile).
// Four destinations a block-wide scan: their routed flags packed in 16-bit fields of one 64-bit
// word (a scan step covers blockDim.x <= 1024 tokens, so no field carries into the next), one
// scan per step for EP <= 4 instead of one per destination (run 131: the pass and its grid
// barrier were the first 7.6 us of the 48-SM dispatch, 4 scans of 3 block barriers each).
constexpr int kScanPack = 4;
// A token's routed flags for destinations d0 .. d0 + kScanPack - 1 (mask: its destination bits
// shifted right by d0) as kScanPack 16-bit fields of one word, so one sum adds them all.
// Host-callable for tests/cuda_host/scan_pack_check.cu.
__host__ __device__ inline unsigned long long pack_routed(unsigned long long mask) {
  unsigned long long word = 0;
  for (int i = 0; i < kScanPack; ++i) word |= ((mask >> i) & 1ull) << (16 * i);
  return word;
}
// Field i of a sum of at most 65535 packed words: destination d0 + i's count.
__host__ __device__ inline int packed_field(unsigned long long word, int i) {
  return static_cast<int>((word >> (16 * i)) & 0xffffull);
}
__device__ inline void scan_pass2(const ScanPass2& a, int num_tokens, int num_ranks) {
  __shared__ unsigned long long s_warp[33];
  __shared__ int s_base[kMaxRanks];
  const int G = num_ranks, N = num_tokens, tid = threadIdx.x;
  const int tile_tokens = kScanThreads * a.per;
  for (int tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    for (int d = tid; d < G; d += blockDim.x) s_base[d] = tiles_count(a, d, tile);
    __syncthreads();
    const int t0 = tile * tile_tokens, t1 = min(N, t0 + tile_tokens);
    for (int d0 = 0; d0 < G; d0 += kScanPack) {
      int base[kScanPack];
#pragma unroll
      for (int i = 0; i < kScanPack; ++i) base[i] = d0 + i < G ? s_base[d0 + i] : 0;
      for (int r0 = t0; r0 < t1; r0 += blockDim.x) {  // block-uniform trip count
        const int t = r0 + tid;
        const unsigned long long mask = t < t1 ? a.masks[t] >> d0 : 0ull;
        unsigned long long total = 0;
        const unsigned long long before = block_exclusive_sum(pack_routed(mask), s_warp, &total);
#pragma unroll
        for (int i = 0; i < kScanPack; ++i) {
          const int d = d0 + i;
          if (d >= G) break;
          const int at = base[i] + packed_field(before, i);
          if (t < t1 && a.write_cum) a.cum[static_cast<size_t>(d) * (N + 1) + t] = at;
          if (((mask >> i) & 1ull) && a.send_list) a.send_list[static_cast<size_t>(d) * N + at] = t;
          base[i] += packed_field(total, i);
        }
      }
      if (t1 == N && tid == 0) {
#pragma unroll
        for (int i = 0; i < kScanPack; ++i)
          if (d0 + i < G) a.cum[static_cast<size_t>(d0 + i) * (N + 1) + N] = base[i];
      }
    }
    __syncthreads();  // s_base is rewritten for the next tile
  }
}

// The block that sends a fused-scan kernel's handshake (the dispatch's layouts and host counts,
// the combine's messages): one with no tile of the second pass where there is one (the last), so
// that its system fences hold up no tile and with them the pass's grid barrier (run 131: the
// barrier passed 7.6 us into the 48-SM dispatch, block 0 scanning a tile after its fences).
template <bool kFusedScan>
__device__ inline unsigned handshake_block(const ScanPass2& a) {
  return kFusedScan && a.tiles < static_cast<int>(gridDim.x) ? gridDim.x - 1 : 0u;
}

// Every block past the second pass before any reads its results: a bounded grid-wide wait on a
// counter in this rank's control region (the blocks of a communication kernel are co-resident),
// reset by the op's last block. Every block arrives, also after a failure, so none waits in vain.
// The dispatch senders read the lists with non-coherent loads (__ldg): none reads a list line
// before this barrier, so no stale line can be in an SM's cache.
__device__ inline bool scan_barrier(LocalState* ls, const WaitCtx& ctx) {
  __shared__ int s_ok;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&ls->scan_done, 1u);
    s_ok = 1;
    const unsigned long long start = globaltimer();
    while (*reinterpret_cast<volatile unsigned*>(&ls->scan_done) < gridDim.x) {
      __nanosleep(64);
      if (aborted(ctx) || globaltimer() - start > ctx.timeout_ns) {
        if (!aborted(ctx)) report_timeout(ctx, kPhaseRound, ctx.rank);
        s_ok = 0;
        break;
      }
    }
    __threadfence();
  }
  __syncthreads();
  return s_ok != 0;
}

}  // namespace fa2a::cuda
