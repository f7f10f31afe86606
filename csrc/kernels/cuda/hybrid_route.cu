// HybridEP's routing pre-pass (before every dispatch, cached dispatch included): each token's
// ordinal among this rank's tokens routed to each expert, the per-expert counts, and the largest
// number of one rank's experts picked by one token (the fan-out). Plain parallel kernels.
#include <algorithm>

#include "core/hybrid_backends.h"
#include "hybrid.cuh"
#include "state.h"

namespace fa2a::cuda {
namespace {

// The ordinals in two passes over chunks of per_chunk consecutive tokens, each pass a grid of
// (32 experts = lanes) x (chunk) blocks of 32 warps, a warp per slice of the chunk, coalesced
// 32-byte map loads. One block per 32 experts (the former kernel: 8 blocks at E = 256) took 57 us
// at N = 4096 (run 71), its two serial walks over N / 32 tokens a warp latency-bound.
__device__ inline void chunk_slice(int N, int per_chunk, int chunk, int warp, int& t0, int& t1) {
  const int c0 = min(N, chunk * per_chunk), c1 = min(N, c0 + per_chunk);
  const int per = (c1 - c0 + 31) / 32;
  t0 = min(c1, c0 + warp * per);
  t1 = min(c1, t0 + per);
}

__device__ inline int routed_in(const uint8_t* routing_map, int E, int e, int t0, int t1) {
  int count = 0;
#pragma unroll 8
  for (int t = t0; t < t1; ++t) count += __ldg(routing_map + static_cast<size_t>(t) * E + e) != 0;
  return count;
}

// Pass 1: chunk_count[c * E + e] = the tokens of chunk c routed to e.
__global__ void __launch_bounds__(1024)
    ordinal_count_kernel(const uint8_t* routing_map, int N, int E, int per_chunk,
                         int* chunk_count) {
  __shared__ int s_count[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * 32 + lane;
  int t0, t1;
  chunk_slice(N, per_chunk, blockIdx.y, warp, t0, t1);
  s_count[warp][lane] = e < E ? routed_in(routing_map, E, e, t0, t1) : 0;
  __syncthreads();
  if (warp != 0 || e >= E) return;
  int total = 0;
  for (int w = 0; w < 32; ++w) total += s_count[w][lane];
  chunk_count[blockIdx.y * E + e] = total;
}

// Pass 2: ordinal[t * E + e] = the number of tokens t' < t routed to e if t is routed to e, else
// -1; counts[e] = the tokens routed to e (written by the last chunk's blocks).
__global__ void __launch_bounds__(1024)
    ordinal_kernel(const uint8_t* routing_map, int N, int E, int per_chunk, const int* chunk_count,
                   int32_t* ordinal, int* counts) {
  __shared__ int s_count[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * 32 + lane, chunk = blockIdx.y;
  int t0, t1;
  chunk_slice(N, per_chunk, chunk, warp, t0, t1);
  const int count = e < E ? routed_in(routing_map, E, e, t0, t1) : 0;
  s_count[warp][lane] = count;
  __syncthreads();
  if (e >= E) return;
  int base = 0;
  for (int c = 0; c < chunk; ++c) base += chunk_count[c * E + e];
  for (int w = 0; w < warp; ++w) base += s_count[w][lane];
  if (chunk == gridDim.y - 1 && warp == 31) counts[e] = base + count;
#pragma unroll 8
  for (int t = t0; t < t1; ++t) {
    const bool routed = __ldg(routing_map + static_cast<size_t>(t) * E + e) != 0;
    ordinal[static_cast<size_t>(t) * E + e] = routed ? base : -1;
    base += routed ? 1 : 0;
  }
}

// *fanout = max over (t, d) of the experts of rank d that token t picked (zeroed before). A warp
// per (t, d), its lanes over the L bytes (a thread per pair walked L bytes serially: 18 us at
// N = 4096, L = 128, run 74).
__global__ void fanout_kernel(const uint8_t* routing_map, int N, int G, int L, int* fanout) {
  const long long pairs = static_cast<long long>(N) * G;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  int best = 0;
  for (long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
       i < pairs; i += warps) {                // warp-uniform
    const uint8_t* row = routing_map + i * L;  // (t, d) = (i / G, i % G): row t, columns d*L..
    int picked = 0;
    for (int j0 = 0; j0 < L; j0 += 32) {
      const bool routed = j0 + lane < L && __ldg(row + j0 + lane) != 0;
      picked += __popc(__ballot_sync(0xffffffffu, routed));
    }
    best = max(best, picked);
  }
  if (lane == 0 && best > 0) atomicMax(fanout, best);
}

}  // namespace

// The routing pre-pass: ordinals and per-expert counts (ordinal_kernel) and the fan-out
// (fanout_kernel), into the buffer's scratch; every entry point runs it before its kernels.
void launch_hybrid_route(Buffer& buffer, CudaState& st, const HybridDispatchArgs& a,
                         cudaStream_t s) {
  const Scratch& scratch =
      ensure_scratch(st, buffer.num_ranks(), std::max<int64_t>(a.num_tokens, 1), a.num_experts, s);
  int* fanout = scratch.fanout;
  FA2A_CUDA_CHECK(cudaMemsetAsync(fanout, 0, sizeof(int), s), "hybrid dispatch fan-out reset");
  if (a.num_tokens == 0) {
    FA2A_CUDA_CHECK(cudaMemsetAsync(scratch.ecount, 0, sizeof(int) * a.num_experts, s),
                    "hybrid dispatch counts reset");
    return;
  }
  const int N = static_cast<int>(a.num_tokens), G = buffer.num_ranks();
  // Chunks of >= 256 tokens (8 a warp), at most kMaxScanTiles (scratch.tile_ecount holds their
  // counts: [kMaxScanTiles, E], the normal-mode scan's tile counts, free between ops).
  const int chunks = std::max(1, std::min(kMaxScanTiles, (N + 255) / 256));
  const int per_chunk = (N + chunks - 1) / chunks;
  const dim3 grid((a.num_experts + 31) / 32, chunks);
  ordinal_count_kernel<<<grid, 1024, 0, s>>>(a.routing_map, N, a.num_experts, per_chunk,
                                             scratch.tile_ecount);
  check_launch("hybrid dispatch ordinal counts");
  ordinal_kernel<<<grid, 1024, 0, s>>>(a.routing_map, N, a.num_experts, per_chunk,
                                       scratch.tile_ecount, scratch.ordinal, scratch.ecount);
  check_launch("hybrid dispatch ordinals");
  const long long pairs = static_cast<long long>(N) * G;
  const int blocks = static_cast<int>(std::min<long long>((pairs + 7) / 8, 1024));  // 8 warps
  fanout_kernel<<<blocks, 256, 0, s>>>(a.routing_map, N, G, a.num_local_experts, fanout);
  check_launch("hybrid dispatch fan-out");
}

}  // namespace fa2a::cuda
