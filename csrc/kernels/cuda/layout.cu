// layout (the public op) and the route scan that dispatch and combine start with.
#include <cub/block/block_scan.cuh>

#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

constexpr int kScanThreads = 512;

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

// One block per destination rank d: cum[d][t] (tokens before t routed to d), cum[d][N], the send
// list of d, and the (token, slot) pairs per expert of d. Tiles of kScanTile tokens: the routed
// flags of a tile are computed with coalesced index loads (consecutive tokens on consecutive
// threads) into shared memory, then each thread scans kScanTile / kScanThreads consecutive flags.
// (Each thread used to load its own consecutive tokens' indices, twice: 39 us at N = 4096.)
constexpr int kScanTile = kScanThreads * 8;

__global__ void __launch_bounds__(kScanThreads)
    route_scan_kernel(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int* cum, int* send_list, int* ecount) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ unsigned char s_routed[kScanTile];
  extern __shared__ int s_ecount[];  // lpr
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

}  // namespace

int stream_device(cudaStream_t stream) {
  int device = 0;
  if (stream != nullptr && cudaStreamGetDevice(stream, &device) == cudaSuccess) return device;
  (void)cudaGetLastError();
  FA2A_CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

void launch_route_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                       int num_experts, int num_ranks, const Scratch& scratch, bool want_list,
                       cudaStream_t stream) {
  const int lpr = num_experts / num_ranks;
  route_scan_kernel<<<num_ranks, kScanThreads, sizeof(int) * lpr, stream>>>(
      topk_idx, idx64, num_tokens, num_topk, num_experts, num_ranks, scratch.cum,
      want_list ? scratch.send_list : nullptr, scratch.ecount);
  check_launch("route scan");
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
