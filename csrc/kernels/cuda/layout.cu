// layout (the public op) and the route scan that dispatch and combine start with.
#include <algorithm>
#include <cstdlib>
#include <cub/block/block_scan.cuh>

#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

__global__ void layout_kernel(const void* topk_idx, bool idx64, int64_t num_tokens, int num_topk,
                              int num_experts, int num_ranks, int32_t* per_rank,
                              int32_t* per_expert, uint8_t* in_rank) {
  __shared__ int s_rank[kMaxRanks];
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) s_rank[i] = 0;
  __syncthreads();
  const int lpr = num_experts / num_ranks;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    unsigned long long mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      const long long e = load_idx(topk_idx, idx64, t * num_topk + k);
      const int o = owner_of(e, num_experts, lpr);
      if (o >= 0) {
        mask |= 1ull << o;
        atomicAdd(&per_expert[e], 1);
      }
    }
    for (int g = 0; g < num_ranks; ++g) {
      const bool in = (mask >> g) & 1ull;
      in_rank[t * num_ranks + g] = in ? 1 : 0;
      if (in) atomicAdd(&s_rank[g], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
    if (s_rank[i]) atomicAdd(&per_rank[i], s_rank[i]);
}

// The route scan in one block per destination rank d (small N, or FUSED_A2A_CUDA_SCAN=block):
// cum[d][t] (tokens before t routed to d), cum[d][N], the send list of d, and the (token, slot)
// pairs per expert of d. Tiles of kScanTile tokens: the routed flags of a tile are computed with
// coalesced index loads into shared memory, then each thread scans kScanTile / kScanThreads
// consecutive flags. Run 12: 21 us at N = 4096, 8 dependent rounds of index loads in 4 blocks.
constexpr int kScanTile = kScanThreads * 8;

__global__ void __launch_bounds__(kScanThreads)
    route_scan_kernel(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int* cum, int* send_list, int* ecount) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ unsigned char s_routed[kScanTile];
  extern __shared__ int s_ecount[];  // lpr
  griddep_launch_dependents();       // a dependent dispatch / combine waits for the whole scan
  const int d = blockIdx.x;
  const int lpr = num_experts / num_ranks;
  for (int j = threadIdx.x; j < lpr; j += blockDim.x) s_ecount[j] = 0;
  __syncthreads();
  int* my_cum = cum + static_cast<size_t>(d) * (num_tokens + 1);
  int* my_list = send_list ? send_list + static_cast<size_t>(d) * num_tokens : nullptr;
  constexpr int per = kScanTile / kScanThreads;
  int before = 0;  // tokens of earlier tiles routed to d
  for (int base = 0; base < num_tokens; base += kScanTile) {
    const int n = min(kScanTile, num_tokens - base);
    for (int i = threadIdx.x; i < n; i += kScanThreads) {
      const long long t = base + i;
      bool routed = false;
      for (int k = 0; k < num_topk; ++k) {
        const long long e = load_idx(topk_idx, idx64, t * num_topk + k);
        if (owner_of(e, num_experts, lpr) == d) {
          routed = true;
          atomicAdd(&s_ecount[static_cast<int>(e) - d * lpr], 1);
        }
      }
      s_routed[i] = routed ? 1 : 0;
    }
    __syncthreads();
    const int i0 = min(n, static_cast<int>(threadIdx.x) * per), i1 = min(n, i0 + per);
    int count = 0;
    for (int i = i0; i < i1; ++i) count += s_routed[i];
    int run = 0, total = 0;
    Scan(temp).ExclusiveSum(count, run, total);
    run += before;
    for (int i = i0; i < i1; ++i) {
      my_cum[base + i] = run;
      if (s_routed[i]) {
        if (my_list) my_list[run] = base + i;
        ++run;
      }
    }
    before += total;
    __syncthreads();  // s_routed and temp are reused by the next tile
  }
  if (threadIdx.x == 0) my_cum[num_tokens] = before;
  __syncthreads();
  for (int j = threadIdx.x; j < lpr; j += blockDim.x) ecount[d * lpr + j] = s_ecount[j];
}

// The route scan in two passes over tiles of `per` x kScanThreads tokens (at most kMaxScanTiles
// tiles), each pass one round of loads per block instead of the single block's 8 dependent rounds.
// Pass 1, one block a tile (route_mask_tile, scan_pass2.cuh): each token's destination mask into
// scratch.masks, the tile's tokens per destination and pairs per expert into
// tile_count[tile][d] / tile_ecount[tile][e].
__global__ void __launch_bounds__(kScanThreads)
    route_mask_kernel(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int per, unsigned long long* masks,
                      int* tile_count, int* tile_ecount) {
  extern __shared__ int s_ecount[];  // num_experts
  griddep_launch_dependents();       // fused_scan: the dispatch / combine kernel runs pass 2
  route_mask_tile(topk_idx, idx64, num_tokens, num_topk, num_experts, num_ranks, per, blockIdx.x,
                  masks, tile_count, tile_ecount, s_ecount);
}

// Pass 2, one block a tile: the tile's offset per destination from the earlier tiles' counts,
// then per destination a block scan of the routed flags of each round of kScanThreads tokens:
// cum[d][t], the send list, cum[d][N] (last tile); and ecount (the tiles' sums, experts spread
// over the blocks).
__global__ void __launch_bounds__(kScanThreads)
    route_list_kernel(int num_tokens, int num_experts, int num_ranks, int per,
                      const unsigned long long* masks, const int* tile_count,
                      const int* tile_ecount, int* cum, int* send_list, int* ecount) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int s_base[kMaxRanks];
  const int tid = threadIdx.x, tiles = gridDim.x;
  griddep_launch_dependents();  // a dependent dispatch / combine waits for the whole scan
  for (int d = tid; d < num_ranks; d += blockDim.x) {
    int before = 0;
    for (int j = 0; j < static_cast<int>(blockIdx.x); ++j) before += tile_count[j * kMaxRanks + d];
    s_base[d] = before;
  }
  for (int e = blockIdx.x * blockDim.x + tid; e < num_experts; e += tiles * blockDim.x) {
    int sum = 0;
    for (int j = 0; j < tiles; ++j) sum += tile_ecount[static_cast<size_t>(j) * num_experts + e];
    ecount[e] = sum;
  }
  __syncthreads();
  const int t0 = blockIdx.x * kScanThreads * per;
  for (int d = 0; d < num_ranks; ++d) {
    int* my_cum = cum + static_cast<size_t>(d) * (num_tokens + 1);
    int* my_list = send_list ? send_list + static_cast<size_t>(d) * num_tokens : nullptr;
    int base = s_base[d];
    for (int u = 0; u < per; ++u) {
      const int t = t0 + u * kScanThreads + tid;
      const int routed = t < num_tokens ? static_cast<int>((masks[t] >> d) & 1ull) : 0;
      int run = 0, total = 0;
      Scan(temp).ExclusiveSum(routed, run, total);
      if (t < num_tokens) {
        my_cum[t] = base + run;
        if (routed && my_list) my_list[base + run] = t;
      }
      base += total;
      __syncthreads();  // temp is reused by the next scan
    }
    if (blockIdx.x == tiles - 1 && tid == 0) my_cum[num_tokens] = base;
  }
}

// Which scan: FUSED_A2A_CUDA_SCAN=block / tiles, else one block per destination up to
// kBlockScanMaxTokens tokens (a round or two of index loads, one launch) and two passes above.
// Session 10 (4x H200, EP 4, two runs): two passes took the standard case (N = 4096) from 579 to
// 567 us (dispatch) and 558 to 547 us (combine), EP 2 280 -> 265 us; decode (N = 128, CUDA
// graphs) lost 1-7 us to the second launch.
constexpr int kBlockScanMaxTokens = 1024;
bool scan_in_one_block(int num_tokens) {
  if (env_is("FUSED_A2A_CUDA_SCAN", "block")) return true;
  if (env_is("FUSED_A2A_CUDA_SCAN", "tiles")) return false;
  return num_tokens <= kBlockScanMaxTokens;
}

// The tiled route scan's tiles (blocks of each pass, at most kMaxScanTiles) of per x
// kScanThreads tokens.
struct ScanTiles {
  int per;  // tokens per thread of a tile
  int tiles;
};

ScanTiles scan_tiles(int num_tokens) {
  const int cover = kScanThreads * kMaxScanTiles;  // tokens of kMaxScanTiles one-token tiles
  ScanTiles st;
  st.per = std::max(1, (num_tokens + cover - 1) / cover);
  st.tiles = std::max(1, (num_tokens + kScanThreads * st.per - 1) / (kScanThreads * st.per));
  return st;
}

}  // namespace

// Session 14 (two runs, EP 4 and EP 2): N = 4096 static dispatch -2.3 to -4.7 us, combine -1.0
// to -5.0; decode in CUDA graphs (N = 128, where the scan is one block) +1.4 to +2.4 us, so
// not below the two-pass threshold.
bool fused_scan(int64_t num_tokens) {  // false for N = 0 (callers rely on it)
  if (env_is("FUSED_A2A_CUDA_SCAN", "fused")) return num_tokens > 0;
  if (std::getenv("FUSED_A2A_CUDA_SCAN") != nullptr) return false;
  return !scan_in_one_block(static_cast<int>(std::min<int64_t>(num_tokens, 1 << 30)));
}

int stream_device(cudaStream_t stream) {
  int device = 0;
  if (stream != nullptr && cudaStreamGetDevice(stream, &device) == cudaSuccess) return device;
  (void)cudaGetLastError();
  FA2A_CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

namespace {

// Session 25: FUSED_A2A_CUDA_SCAN_PASS1=fused runs the first pass in the data kernel too.
bool scan_pass1_in_kernel() { return env_is("FUSED_A2A_CUDA_SCAN_PASS1", "fused"); }

// The tiles of the first pass, checked for the scratch and for route_mask_kernel's shared memory.
ScanTiles route_mask_tiles(int num_tokens, int num_experts) {
  const ScanTiles st = scan_tiles(num_tokens);
  FA2A_CHECK(st.tiles <= kMaxScanTiles, "route scan: ", st.tiles, " tiles for ", num_tokens,
             " tokens exceed ", kMaxScanTiles);
  FA2A_CHECK(sizeof(int) * static_cast<size_t>(num_experts) <= 48 * 1024,
             "route scan: num_experts=", num_experts, " exceeds the CUDA backend's limit of ",
             48 * 1024 / sizeof(int));
  return st;
}

ScanTiles launch_route_masks(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                             int num_experts, int num_ranks, const Scratch& scratch,
                             cudaStream_t stream) {
  const ScanTiles st = route_mask_tiles(num_tokens, num_experts);
  const size_t ecount_smem = sizeof(int) * static_cast<size_t>(num_experts);
  route_mask_kernel<<<st.tiles, kScanThreads, ecount_smem, stream>>>(
      topk_idx, idx64, num_tokens, num_topk, num_experts, num_ranks, st.per, scratch.masks,
      scratch.tile_count, scratch.tile_ecount);
  check_launch("route scan (masks)");
  return st;
}

}  // namespace

ScanPass2 launch_fused_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                            int num_experts, int num_ranks, const Scratch& scratch, bool list,
                            bool cum, bool pairs, cudaStream_t stream) {
  const bool in_kernel = scan_pass1_in_kernel();
  const ScanTiles st = in_kernel ? route_mask_tiles(num_tokens, num_experts)
                                 : launch_route_masks(topk_idx, idx64, num_tokens, num_topk,
                                                      num_experts, num_ranks, scratch, stream);
  ScanPass2 a;
  a.tiles = st.tiles;
  a.per = st.per;
  a.masks = scratch.masks;
  a.tile_count = scratch.tile_count;
  a.cum = scratch.cum;
  a.send_list = list ? scratch.send_list : nullptr;
  a.write_cum = cum;
  if (in_kernel) {
    a.pass1.topk_idx = topk_idx;
    a.pass1.idx64 = idx64;
    a.pass1.num_topk = num_topk;
    a.pass1.num_experts = num_experts;
    a.pass1.masks = scratch.masks;
    a.pass1.tile_count = scratch.tile_count;
    a.pass1.tile_ecount = pairs ? scratch.tile_ecount : nullptr;
    a.pass1.tile_flag = scratch.tile_flag;
  }
  return a;
}

void launch_route_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                       int num_experts, int num_ranks, const Scratch& scratch, bool want_list,
                       cudaStream_t stream) {
  int* list = want_list ? scratch.send_list : nullptr;
  if (scan_in_one_block(num_tokens)) {
    const int lpr = num_experts / num_ranks;
    route_scan_kernel<<<num_ranks, kScanThreads, sizeof(int) * lpr, stream>>>(
        topk_idx, idx64, num_tokens, num_topk, num_experts, num_ranks, scratch.cum, list,
        scratch.ecount);
    check_launch("route scan");
    return;
  }
  const ScanTiles st = launch_route_masks(topk_idx, idx64, num_tokens, num_topk, num_experts,
                                          num_ranks, scratch, stream);
  route_list_kernel<<<st.tiles, kScanThreads, 0, stream>>>(
      num_tokens, num_experts, num_ranks, st.per, scratch.masks, scratch.tile_count,
      scratch.tile_ecount, scratch.cum, list, scratch.ecount);
  check_launch("route scan (lists)");
}

void layout(Stream stream, const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
            int num_experts, int num_ranks, int32_t* num_tokens_per_rank,
            int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank) {
  FA2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks,
             "], got ", num_ranks);
  auto s = static_cast<cudaStream_t>(stream.handle);
  DeviceGuard guard(stream_device(s));
  FA2A_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int32_t) * num_ranks, s),
                  "layout memset");
  FA2A_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int32_t) * num_experts, s),
                  "layout memset");
  if (num_tokens == 0) return;
  const int threads = 256;
  const int64_t want = (num_tokens + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 1024 ? want : 1024);
  layout_kernel<<<blocks, threads, 0, s>>>(topk_idx, idx_dtype == DType::kI64, num_tokens, num_topk,
                                           num_experts, num_ranks, num_tokens_per_rank,
                                           num_tokens_per_expert, is_token_in_rank);
  check_launch("layout");
}

}  // namespace fa2a::cuda
