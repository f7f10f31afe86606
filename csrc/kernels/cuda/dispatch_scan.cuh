// The route scan's second pass inside the static dispatch kernel (FUSED_A2A_CUDA_SCAN=fused,
// session 13, compile-checked): route_mask_kernel (layout.cu) ran the first pass, so the kernel
// launch that ran the second (route_list_kernel, ~4.5 us at N = 4096, runs 51-66) is gone, and
// the count exchange's round trip overlaps this pass (the counts per destination come from the
// first pass's tile counts).
#pragma once

#include "dispatch_common.cuh"

namespace fa2a::cuda::dispatch_impl {

// Exclusive prefix sum of v over the block (any multiple of 32 threads, at most 1024), in thread
// order; *total = the block's sum. s_warp: 33 ints of shared memory. Ends with a barrier, so
// s_warp may be reused by the next call.
__device__ inline int block_exclusive_sum(int v, int* s_warp, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < warps ? s_warp[lane] : 0;
    int run = w;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, run, o);
      if (lane >= o) run += y;
    }
    if (lane < warps) s_warp[lane] = run - w;  // warps before this one
    if (lane == 31) s_warp[32] = run;
  }
  __syncthreads();
  const int before = s_warp[warp] + incl - v;
  *total = s_warp[32];
  __syncthreads();
  return before;
}

// Tokens of the earlier tiles routed to d, and the tile count sums of all tiles (pass 1's
// tile_count rows; at most kMaxScanTiles loads).
__device__ __forceinline__ int tiles_count(const DispatchParams& p, int d, int tiles) {
  int n = 0;
  for (int j = 0; j < tiles; ++j) n += p.tile_count[j * kMaxRanks + d];
  return n;
}

// Pass 2 over this block's tiles (b, b + grid, ...): every destination's send list in token
// order, as route_list_kernel writes it, and cum[d][N] (the last tile).
__device__ inline void fused_scan_pass2(const DispatchParams& p) {
  __shared__ int s_warp[33];
  __shared__ int s_base[kMaxRanks];
  const int G = p.num_ranks, N = p.num_tokens, tid = threadIdx.x;
  const int tile_tokens = kScanThreads * p.scan_per;
  for (int tile = blockIdx.x; tile < p.scan_tiles; tile += gridDim.x) {
    for (int d = tid; d < G; d += blockDim.x) s_base[d] = tiles_count(p, d, tile);
    __syncthreads();
    const int t0 = tile * tile_tokens, t1 = min(N, t0 + tile_tokens);
    for (int d = 0; d < G; ++d) {
      int* list = p.send_list_out + static_cast<size_t>(d) * N;
      int base = s_base[d];
      for (int r0 = t0; r0 < t1; r0 += blockDim.x) {  // block-uniform trip count
        const int t = r0 + tid;
        const int routed = t < t1 ? static_cast<int>((p.masks[t] >> d) & 1ull) : 0;
        int total = 0;
        const int before = block_exclusive_sum(routed, s_warp, &total);
        if (routed) list[base + before] = t;
        base += total;
      }
      if (t1 == N && tid == 0) p.cum_out[static_cast<size_t>(d) * (N + 1) + N] = base;
    }
    __syncthreads();  // s_base is rewritten for the next tile
  }
}

// Every block past pass 2 before any reads a send list: a bounded grid-wide wait on a counter in
// this rank's control region (the blocks of a communication kernel are co-resident), reset by
// the op's last block. Every block arrives, also after a failure, so none waits in vain. The
// senders read the lists with non-coherent loads (__ldg): none of them reads a list line before
// this barrier, so no stale line can be in an SM's cache.
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

}  // namespace fa2a::cuda::dispatch_impl
