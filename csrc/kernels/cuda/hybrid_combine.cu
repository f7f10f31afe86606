// HybridEP combine on CUDA (SEMANTICS.md section 2; the CPU backend csrc/kernels/cpu/hybrid.cc
// defines the exact result). Transport and protocol: hybrid.cuh.
//
// One message per round of T tokens: every rank writes, into its slot on each source rank s,
// the rows of s's tokens [kT, (k+1)T) at position (t - kT) * L + j (local expert j), each with
// its prob and a tag equal to the message number (every position's tag is cleared to 0 first;
// message numbers start at 1). The source then sums, for each token, ranks ascending and local
// experts ascending, in fp32 from 0.0f, with one rounding to y's dtype: the contract's order.
// Rows at positions >= P (dropped by a static P) and padding rows are never sent.
#include <algorithm>
#include <mutex>

#include "core/hybrid_backends.h"
#include "fused_a2a/errors.h"
#include "hybrid.cuh"
#include "state.h"

namespace fa2a::cuda {
namespace {

using namespace hybrid;

struct CombineParams {
  const void* y;
  int code;        // value code of y
  size_t y_row;    // bytes of one row
  size_t y_bytes;  // 16-aligned
  size_t stride;   // y_bytes + 16 (tag, prob)
  int N, H, L;
  long long P, pad;
  const float* probs;
  const int32_t* src_expert_counts;
  const int32_t* row_token;
  const int32_t* meta;
  int rows_per_round;
  void* out;
  float* out_probs;
};

constexpr int kChunk = 8;  // values per lane per pass over the contributions

__global__ void __launch_bounds__(kThreads) combine_kernel(Comm c, CombineParams p) {
  extern __shared__ long long s_mem[];
  const int G = c.num_ranks, L = p.L, E = G * L, tid = threadIdx.x;
  long long* off = s_mem;    // [L] first row of expert j
  long long* cnt = off + L;  // [L] real rows of expert j
  __shared__ int s_fail, s_bad;
  const int lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    s_fail = aborted(c.wait_ctx()) ? 1 : 0;
    s_bad = p.meta[kHybridMetaNumTokens] != p.N ? 1 : 0;  // handle of another N: send nothing
    long long total = 0;
    for (int j = 0; j < L; ++j) {
      off[j] = total;
      long long count = 0;
      for (int s = 0; s < G; ++s) count += max(0, p.src_expert_counts[s * L + j]);
      cnt[j] = count;
      total += p.pad > 0 ? (count + p.pad - 1) / p.pad * p.pad : count;
    }
  }
  __syncthreads();
  if (s_fail) return;
  const bool bad = s_bad != 0;
  const int T = p.rows_per_round;
  // meta NumTokens -1: the dispatch's notify found the ranks disagreeing (on every rank): no
  // rounds anywhere, zeros out.
  const bool group_bad = p.meta[kHybridMetaNumTokens] == -1;
  const long long rounds = group_bad ? 0 : (static_cast<long long>(p.N) + T - 1) / T;
  unsigned long long m = read_msgs(c);
  if (!enter(c, m, &s_fail)) return;
  for (long long round = 0; round < rounds; ++round) {
    ++m;
    const long long t0 = round * T;
    const long long t1 = min(static_cast<long long>(p.N), t0 + T);
    if (!send_begin(c, m, &s_fail)) return;
    // Clear every position's tag first (the slot holds older messages of any kind), then write
    // the rows: the barrier orders the two writes of a position.
    const long long n = t1 - t0;
    for (long long i = tid; i < G * n * L; i += blockDim.x) {
      const int d = static_cast<int>(i % G);
      *reinterpret_cast<unsigned int*>(c.slot_on(d) + (i / G) * p.stride + p.y_bytes) = 0u;
    }
    __threadfence();
    __syncthreads();
    // A warp per row of this rank: the rows of tokens of this round go back to their source.
    for (long long r = warp; r < (bad ? 0 : p.P); r += kWarps) {
      const int g = __ldg(p.row_token + r);
      if (g < 0 || g >= G * p.N) continue;
      const int dst = g / p.N, t = g - dst * p.N;
      if (t < t0 || t >= t1) continue;
      // Expert j of row r: the last expert whose first row is <= r (padding rows: skipped).
      int lo = 0, hi = L - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (off[mid] <= r) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      const int j = lo;
      if (r >= off[j] + cnt[j]) continue;
      uint8_t* row = c.slot_on(dst) + (static_cast<size_t>(t - t0) * L + j) * p.stride;
      warp_copy_ro(row, static_cast<const uint8_t*>(p.y) + r * p.y_row, p.y_row, lane);
      if (lane == 0) {
        auto* tail = reinterpret_cast<unsigned int*>(row + p.y_bytes);
        tail[1] = __float_as_uint(p.probs ? __ldg(p.probs + r) : 0.0f);
        tail[0] = static_cast<unsigned int>(m);
      }
    }
    send_end(c, m);
    if (!recv_begin(c, m, &s_fail)) return;
    const unsigned int tag = static_cast<unsigned int>(m);
    for (long long t = t0 + warp; t < t1; t += kWarps) {
      const size_t base = static_cast<size_t>(t - t0) * L;
      for (int h0 = 0; h0 < p.H; h0 += 32 * kChunk) {
        float acc[kChunk];
#pragma unroll
        for (int k = 0; k < kChunk; ++k) acc[k] = 0.0f;
        for (int s = 0; s < G; ++s) {
          const uint8_t* slot = c.slot_from(s);
          for (int j = 0; j < L; ++j) {
            const uint8_t* row = slot + (base + j) * p.stride;
            if (__ldcg(reinterpret_cast<const unsigned int*>(row + p.y_bytes)) != tag) continue;
#pragma unroll
            for (int k = 0; k < kChunk; ++k) {
              const int h = h0 + k * 32 + lane;
              if (h < p.H) acc[k] = __fadd_rn(acc[k], load_f32_cg(row, h, p.code));
            }
          }
        }
#pragma unroll
        for (int k = 0; k < kChunk; ++k) {
          const int h = h0 + k * 32 + lane;
          if (h < p.H) store_f32(static_cast<uint8_t*>(p.out) + t * p.y_row, h, p.code, acc[k]);
        }
      }
      if (p.out_probs) {
        for (int e = lane; e < E; e += 32) {
          const int s = e / L, j = e - s * L;
          const unsigned int* tail = reinterpret_cast<const unsigned int*>(
              c.slot_from(s) + (base + j) * p.stride + p.y_bytes);
          const bool valid = __ldcg(tail) == tag;
          p.out_probs[t * E + e] = valid ? __uint_as_float(__ldcg(tail + 1)) : 0.0f;
        }
      }
    }
    recv_end(c, m);
  }
  if (group_bad) {
    for (long long t = warp; t < p.N; t += kWarps) {
      for (int h = lane; h < p.H; h += 32) {
        store_f32(static_cast<uint8_t*>(p.out) + t * p.y_row, h, p.code, 0.0f);
      }
      for (int e = lane; p.out_probs && e < E; e += 32) p.out_probs[t * E + e] = 0.0f;
    }
  }
  __syncthreads();
  if (tid == 0) write_msgs(c, m);
}

}  // namespace

void hybrid_combine(Buffer& buffer, const HybridCombineArgs& a, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  const int G = buffer.num_ranks();
  const int L = a.num_local_experts;
  FA2A_CHECK(G >= 1 && G <= kMaxRanks, "group size ", G, " is not supported");
  FA2A_CHECK(a.num_tokens * G <= 0x7fffffffll, "fused_a2a hybrid combine: ", G,
             " ranks x N = ", a.num_tokens, " tokens do not fit int32 global token ids");
  std::lock_guard<std::mutex> lock(buffer.op_mutex());
  DeviceGuard guard(buffer.device());
  CudaState& st = cuda_state(buffer);
  check_no_error(st, buffer);
  Comm c;
  c.peers = reinterpret_cast<uint8_t* const*>(buffer.peer_table());
  c.rank = buffer.rank();
  c.num_ranks = G;
  c.slot_bytes = (buffer.data_bytes() / G) & ~size_t{15};
  c.host_error = st.host_error;
  c.timeout_ns = timeout_ns();
  c.op = kOpHybridCombine;
  CombineParams p{};
  p.y = a.y;
  p.code = a.y_dtype == DType::kF32 ? kValF32 : a.y_dtype == DType::kF16 ? kValF16 : kValBF16;
  p.y_row = static_cast<size_t>(a.hidden) * dtype_size(a.y_dtype);
  p.y_bytes = align16(p.y_row);
  p.stride = p.y_bytes + 16;
  p.N = static_cast<int>(a.num_tokens);
  p.H = static_cast<int>(a.hidden);
  p.L = L;
  p.P = a.num_rows;
  p.pad = a.pad_multiple;
  p.probs = a.probs;
  p.src_expert_counts = a.src_expert_counts;
  p.row_token = a.row_token;
  p.meta = a.meta;
  const size_t rows = c.slot_bytes / (p.stride * static_cast<size_t>(L));
  FA2A_CHECK(rows >= 1, "fused_a2a hybrid combine: the buffer slot (", c.slot_bytes,
             " bytes) cannot hold one token's ", L, " rows of ", p.stride,
             " bytes; create the buffer with more bytes (init_hybrid_ep_buffer)");
  p.rows_per_round = static_cast<int>(std::min<size_t>(rows, 1 << 20));
  p.out = a.out;
  p.out_probs = a.out_probs;
  if (a.num_rows > 0) check_aligned(a.y, "the permuted rows to combine");
  const size_t smem = 2 * static_cast<size_t>(L) * sizeof(long long);
  if (smem > 48 * 1024) {
    FA2A_CUDA_CHECK(
        cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "hybrid combine shared memory");
  }
  combine_kernel<<<1, kThreads, smem, s>>>(c, p);
  check_launch("hybrid combine");
}

}  // namespace fa2a::cuda
