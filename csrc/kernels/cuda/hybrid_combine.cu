// HybridEP combine on CUDA (SEMANTICS.md section 2; the CPU backend csrc/kernels/cpu/hybrid.cc
// defines the exact result). Transport and protocol: hybrid.cuh (B blocks).
//
// One message per round of T tokens. Each rank's slot on source rank s holds, for every token t
// of the round, F positions (F = the dispatch's largest fan-out of one token to one rank, so T =
// slot rows / F): the rows of this rank's experts j that t was routed to (and kept), in
// ascending j, each with a tag equal to the message number, its prob and j; the positions after
// them get tag 0. A pre-pass (rowmap_kernel) writes, for every kept row r of (token g = s*N + t,
// local expert j), rowmap[g * L + j] = r (-1 elsewhere); a warp per (s, t) then reads t's L
// entries and writes all F positions, so no stale tag survives. The source then sums, for each
// token, ranks ascending and local experts ascending, in fp32 from 0.0f, with one rounding to y's
// dtype: the contract's order. Rows at positions >= P (dropped by a static P) and padding rows are
// never sent.
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
  size_t y_row;    // bytes of one row (16-byte multiple)
  size_t y_bytes;  // 16-aligned
  size_t stride;   // y_bytes + 16 (tag, prob, j, row of y)
  int N, H, L;
  long long P, pad;
  const float* probs;
  const int32_t* src_expert_counts;
  const int32_t* row_token;
  const int32_t* meta;
  long long slot_rows;    // positions of one slot
  bool pipelined;         // FUSED_A2A_HYBRID_PIPELINE=1: two half slots, rounds overlapped
  int send_blocks;        // kRoundsOverlap: blocks [0, send_blocks) send, the others reduce
  const int32_t* rowmap;  // [G*N, L] from rowmap_kernel
  void* out;
  float* out_probs;
};

// rowmap[g * L + j] = r for every real row r < P of local expert j with row_token g (the map was
// set to -1 before). A thread per row; the expert layout from src_expert_counts and pad.
__global__ void rowmap_kernel(const int32_t* row_token, const int32_t* src_expert_counts,
                              long long P, long long pad, int G, int L, long long num_ids,
                              int32_t* rowmap) {
  extern __shared__ long long s_rm[];
  long long* off = s_rm;     // [L] first row of expert j
  long long* cnt = off + L;  // [L] real rows of expert j
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int j = 0; j < L; ++j) {
      long long count = 0;
      for (int s = 0; s < G; ++s) count += max(0, src_expert_counts[s * L + j]);
      off[j] = total;
      cnt[j] = count;
      total += pad > 0 ? (count + pad - 1) / pad * pad : count;
    }
  }
  __syncthreads();
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < P;
       r += static_cast<long long>(gridDim.x) * blockDim.x) {
    int lo = 0, hi = L - 1;  // the last expert whose first row is <= r
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (off[mid] <= r) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    if (r >= off[lo] + cnt[lo]) continue;  // a padding row
    const int g = __ldg(row_token + r);
    if (g >= 0 && g < num_ids) rowmap[static_cast<size_t>(g) * L + lo] = static_cast<int32_t>(r);
  }
}

// Sender side of (source s, token t at round position k): all F positions of t in this rank's
// slot on s: the values (not for s == this rank: the reduction reads those from y) and the tail
// (tag, prob, j, row of y). One warp.
__device__ inline void send_token(const Comm& c, const CombineParams& p, size_t half, int s, int t,
                                  int k, int F, unsigned long long m, bool bad, int lane) {
  const int L = p.L;
  uint8_t* base = c.slot_on(s) + half + static_cast<size_t>(k) * F * p.stride;
  const size_t g = static_cast<size_t>(s) * p.N + t;
  int count = 0;
  for (int j0 = 0; j0 < L && !bad; j0 += 32) {
    const int j = j0 + lane;
    const long long row = j < L ? __ldg(p.rowmap + g * L + j) : -1;
    unsigned mask = __ballot_sync(0xffffffffu, row >= 0);
    while (mask) {
      const int b = __ffs(mask) - 1;
      mask &= mask - 1;
      const long long r = __shfl_sync(0xffffffffu, row, b);
      uint8_t* dst = base + static_cast<size_t>(count) * p.stride;
      if (s != c.rank) {
        warp_copy_ro(dst, static_cast<const uint8_t*>(p.y) + r * p.y_row, p.y_row, lane);
      }
      if (lane == 0) {
        auto* tail = reinterpret_cast<unsigned int*>(dst + p.y_bytes);
        tail[1] = __float_as_uint(p.probs ? __ldg(p.probs + r) : 0.0f);
        tail[2] = static_cast<unsigned int>(j0 + b);
        tail[3] = static_cast<unsigned int>(r);
        tail[0] = static_cast<unsigned int>(m);
      }
      ++count;
    }
  }
  for (int i = count + lane; i < F; i += 32) {
    *reinterpret_cast<unsigned int*>(base + static_cast<size_t>(i) * p.stride + p.y_bytes) = 0u;
  }
}

// 16 bytes of values <-> fp32, with the exact conversions of hybrid.cuh.
__device__ __forceinline__ void add_vec(float* acc, int4 v, int code) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                         static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
  if (code == kValF32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = __fadd_rn(acc[i], __uint_as_float(w[i]));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = static_cast<uint16_t>(w[i] & 0xffffu),
                     hi = static_cast<uint16_t>(w[i] >> 16);
      acc[2 * i] = __fadd_rn(acc[2 * i], code == kValF16 ? f16_to_f32(lo) : bf16_to_f32(lo));
      acc[2 * i + 1] =
          __fadd_rn(acc[2 * i + 1], code == kValF16 ? f16_to_f32(hi) : bf16_to_f32(hi));
    }
  }
}

__device__ __forceinline__ int4 pack_vec(const float* acc, int code) {
  uint32_t w[4];
  if (code == kValF32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(acc[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = code == kValF16 ? f32_to_f16(acc[2 * i]) : f32_to_bf16(acc[2 * i]);
      const uint32_t hi =
          code == kValF16 ? f32_to_f16(acc[2 * i + 1]) : f32_to_bf16(acc[2 * i + 1]);
      w[i] = lo | (hi << 16);
    }
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                   static_cast<int>(w[3]));
}

// Receiver side of token t (round position k): out[t] = sum of the present positions in order
// (rank ascending, then position = j ascending), fp32 from 0.0f, one rounding. One warp. own:
// this rank's data region (addresses are arithmetic: no table load per row).
__device__ inline void reduce_token(const Comm& c, const CombineParams& p, const uint8_t* own,
                                    size_t half, int t, int k, int F, unsigned int tag, int lane) {
  const int G = c.num_ranks, L = p.L, E = G * L;
  const int pairs = G * F;
  auto position = [&](int i) {  // pair i = (rank i / F, position i % F)
    return own + static_cast<size_t>(i / F) * c.slot_bytes + half +
           (static_cast<size_t>(k) * F + i % F) * p.stride;
  };
  auto present = [&](const uint8_t* at, int i) {
    return i < pairs && __ldcg(reinterpret_cast<const unsigned int*>(at + p.y_bytes)) == tag;
  };
  // Where pair i's values are: its slot position, or for this rank's own pairs the row of y
  // named in the tail (their values were not copied).
  auto values_of = [&](const uint8_t* at, int i) {
    if (i >= pairs || i / F != c.rank) return at;
    const unsigned int r = __ldcg(reinterpret_cast<const unsigned int*>(at + p.y_bytes) + 3);
    return static_cast<const uint8_t*>(p.y) + static_cast<size_t>(r) * p.y_row;
  };
  const uint8_t* first_at = position(lane);
  const unsigned first_mask = __ballot_sync(0xffffffffu, present(first_at, lane));
  const uint8_t* first_values = values_of(first_at, lane);
  const int nvec = static_cast<int>(p.y_row / 16);
  int4* out =
      reinterpret_cast<int4*>(static_cast<uint8_t*>(p.out) + static_cast<size_t>(t) * p.y_row);
  constexpr int kBatch = 8;  // rows whose loads are in flight together
  for (int v = lane; v - lane < nvec; v += 32) {
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    for (int i0 = 0; i0 < pairs; i0 += 32) {
      // Lane l holds the address of pair i0 + l; the present ones are taken in order.
      const uint8_t* at = i0 == 0 ? first_at : position(i0 + lane);
      unsigned mask = i0 == 0 ? first_mask : __ballot_sync(0xffffffffu, present(at, i0 + lane));
      const uint8_t* values = i0 == 0 ? first_values : values_of(at, i0 + lane);
      while (mask) {
        int4 raw[kBatch];
        int nb = 0;
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int src = mask ? __ffs(mask) - 1 : 0;
          const auto* row = reinterpret_cast<const int4*>(
              __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(values), src));
          if (mask) {
            mask &= mask - 1;
            nb = b + 1;
            if (v < nvec) raw[b] = __ldcg(row + v);
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (b < nb && v < nvec) add_vec(acc, raw[b], p.code);
        }
      }
    }
    if (v < nvec) out[v] = pack_vec(acc, p.code);
  }
  if (p.out_probs) {
    float* row = p.out_probs + static_cast<size_t>(t) * E;
    for (int e = lane; e < E; e += 32) row[e] = 0.0f;
    __syncwarp();
    for (int i0 = 0; i0 < pairs; i0 += 32) {
      const int i = i0 + lane;
      if (i < pairs) {
        const auto* tail = reinterpret_cast<const unsigned int*>(position(i) + p.y_bytes);
        if (__ldcg(tail) == tag) {
          const int j = static_cast<int>(__ldcg(tail + 2));
          if (j >= 0 && j < L) row[(i / F) * L + j] = __uint_as_float(__ldcg(tail + 1));
        }
      }
    }
  }
}

// kMode (hybrid.cuh), each a separate instantiation, so that the default kernel's registers stay
// as they were (the pipelined loop spills):
// - kRoundsPlain: every block sends its share of a round, then (after the grid's data flags)
//   reduces.
// - kRoundsHalves (FUSED_A2A_HYBRID_PIPELINE=1): two half slots, round k + 1 sent before round k
//   is reduced.
// - kRoundsOverlap (FUSED_A2A_HYBRID_OVERLAP bit 2, >= 2 blocks): blocks [0, send_blocks) send,
//   the others reduce at the same time. A round's slot holds T tokens x F positions, then a
//   flag a token (T = slot bytes / (F x stride + 8)); the warp that wrote a token's F positions
//   releases its flag (the message number) after them, and the warp reducing the token waits
//   for the flags of all G holders instead of the grid's data flags. The entry message clears
//   the flags; reducing blocks start a round after their rank's ack of the message before;
//   senders wait for every source's ack of the round before (slot reuse as in the other modes).
template <int kMode>
__global__ void __launch_bounds__(kThreads) combine_kernel(Comm c, CombineParams p) {
  constexpr bool kPipelined = kMode == kRoundsHalves, kOverlap = kMode == kRoundsOverlap;
  const int G = c.num_ranks, L = p.L, E = G * L, tid = threadIdx.x;
  __shared__ int s_fail, s_bad, s_last;
  const int lane = tid & 31, warp = tid >> 5;
  const long long nwarps = static_cast<long long>(gridDim.x) * kWarps;
  const long long gw = static_cast<long long>(blockIdx.x) * kWarps + warp;
  if (tid == 0) {
    s_fail = aborted(c.wait_ctx()) ? 1 : 0;
    s_bad = p.meta[kHybridMetaNumTokens] != p.N ? 1 : 0;  // handle of another N: send nothing
  }
  __syncthreads();
  const bool bad = s_bad != 0;
  const uint8_t* own = c.peers[c.rank] + kControlBytes;
  const int F = max(1, p.meta[kHybridMetaMaxFanout]);
  // Pipelined (FUSED_A2A_HYBRID_PIPELINE=1): each slot in two halves, round k in half k % 2, and
  // round k + 1 sent before round k is reduced, so one round's transfer overlaps the previous
  // round's reduction. Every rank decides alike (same slot size, F from the notify).
  const size_t half_bytes = (c.slot_bytes / 2) & ~static_cast<size_t>(15);
  const bool pipe = kPipelined && static_cast<long long>(half_bytes / p.stride) >= F;
  const size_t token_bytes = static_cast<size_t>(F) * p.stride;
  const long long T =
      kOverlap ? max(1ll, static_cast<long long>(c.slot_bytes / (token_bytes + 8)))
               : max(1ll, (pipe ? static_cast<long long>(half_bytes / p.stride) : p.slot_rows) / F);
  const size_t flags_off = static_cast<size_t>(T) * token_bytes;  // kOverlap: T u64 flags
  // meta NumTokens -1: the dispatch's notify found the ranks disagreeing (on every rank): no
  // rounds anywhere, zeros out.
  const bool group_bad = p.meta[kHybridMetaNumTokens] == -1;
  const long long rounds = group_bad ? 0 : (static_cast<long long>(p.N) + T - 1) / T;
  const auto tokens_of = [&](long long round) {
    return static_cast<int>(min(static_cast<long long>(p.N), (round + 1) * T) - round * T);
  };
  const auto half_of = [&](long long round) { return pipe ? (round & 1) * half_bytes : 0; };
  auto send_round = [&](long long round, unsigned long long msg) {
    const long long t0 = round * T;
    const int n = tokens_of(round);
    for (long long w = gw; w < static_cast<long long>(n) * G; w += nwarps) {
      const int s = static_cast<int>(w % G), k = static_cast<int>(w / G);
      send_token(c, p, half_of(round), s, static_cast<int>(t0 + k), k, F, msg, bad, lane);
    }
  };
  auto recv_round = [&](long long round, unsigned long long msg) {
    const long long t0 = round * T;
    for (long long k = gw; k < tokens_of(round); k += nwarps) {
      reduce_token(c, p, own, half_of(round), static_cast<int>(t0 + k), static_cast<int>(k), F,
                   static_cast<unsigned int>(msg), lane);
    }
  };
  unsigned long long m = read_msgs(c);
  unsigned int q = 0;
  bool ok = !s_fail;
  if constexpr (kOverlap) {
    // Token flags in this rank's slots: flag_of(h, k) = token k's flag from holder h.
    const auto flag_of = [&](int h, long long k) {
      return reinterpret_cast<unsigned long long*>(const_cast<uint8_t*>(c.slot_from(h)) +
                                                   flags_off + static_cast<size_t>(k) * 8);
    };
    const long long used = min(T, static_cast<long long>(p.N));  // token positions ever used
    const auto clear_flags = [&] {
      grid_zero_tags(G * used,
                     [&](long long i) { return flag_of(static_cast<int>(i % G), i / G); });
    };
    ok = ok && grid_message(c, m, q, &s_fail, [] {}, clear_flags);
    const OverlapRoles role(p.send_blocks);
    const unsigned int arrivals = q * gridDim.x;
    const WaitCtx ctx = c.wait_ctx();
    for (long long round = 0; ok && round < rounds; ++round) {
      ++m;
      const long long t0 = round * T;
      const int n = tokens_of(round);
      if (role.sender) {
        if (!send_begin(c, m, &s_fail, 1)) break;  // every source has reduced round k - 1
        for (long long w = role.warp_index; w < static_cast<long long>(n) * G; w += role.warps) {
          const int s = static_cast<int>(w % G), k = static_cast<int>(w / G);
          send_token(c, p, 0, s, static_cast<int>(t0 + k), k, F, m, bad, lane);
          warp_release_tag(reinterpret_cast<unsigned long long*>(c.slot_on(s) + flags_off +
                                                                 static_cast<size_t>(k) * 8),
                           m, lane);
        }
        __syncthreads();
      } else {
        if (!overlap_recv_begin(c, m, &s_fail)) break;  // round 0 too: the flags are clear
        for (long long k = role.warp_index; k < n; k += role.warps) {
          bool arrived = true;
          if (lane < G) {
            arrived = wait_equal(flag_of(lane, k), m, ctx, kPhaseData, lane);
            if (!arrived) s_fail = 1;
          }
          if (__ballot_sync(0xffffffffu, !arrived) != 0u) break;
          for (int h = 0; h < G; ++h) (void)ld_acquire_sys(flag_of(h, k));  // every lane
          reduce_token(c, p, own, 0, static_cast<int>(t0 + k), static_cast<int>(k), F,
                       static_cast<unsigned int>(m), lane);
        }
        grid_recv_end(c, m, arrivals + static_cast<unsigned int>(round + 1) * role.recv_blocks);
      }
      __syncthreads();
      ok = s_fail == 0;
    }
    __syncthreads();  // a block that left the loop early (break) reads the verdict too
    ok = ok && s_fail == 0;
  } else {
    ok = ok && grid_enter(c, m, q, &s_fail);
    if (ok) {
      ok = pipe ? grid_rounds<kPipelined>(c, m, q, &s_fail, rounds, send_round, recv_round)
                : grid_rounds<false>(c, m, q, &s_fail, rounds, send_round, recv_round);
    }
  }
  if (ok && group_bad) {
    for (long long t = gw; t < p.N; t += nwarps) {
      for (int h = lane; h < p.H; h += 32) {
        store_f32(static_cast<uint8_t*>(p.out) + t * p.y_row, h, p.code, 0.0f);
      }
      for (int e = lane; p.out_probs && e < E; e += 32) p.out_probs[t * E + e] = 0.0f;
    }
  }
  if (!grid_finish(c, &s_last)) return;
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
  OpScope scope(buffer);
  CudaState& st = scope.st;
  const Comm c = make_comm(buffer, st, kOpHybridCombine);
  CombineParams p{};
  p.y = a.y;
  p.code = value_code(a.y_dtype);
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
  p.slot_rows = static_cast<long long>(c.slot_bytes / p.stride);
  p.pipelined = hybrid_pipeline_env();
  const int blocks = comm_blocks(st, a.num_sms);
  // The overlapped rounds need one token of F <= L positions and its flag in a slot.
  const bool overlap = (hybrid_overlap_bits(c.num_ranks) & kOverlapCombine) != 0 && blocks >= 2 &&
                       c.slot_bytes >= static_cast<size_t>(L) * p.stride + 8;
  p.send_blocks = overlap ? hybrid_send_blocks(blocks) : 0;
  FA2A_CHECK(p.slot_rows >= L, "fused_a2a hybrid combine: the buffer slot (", c.slot_bytes,
             " bytes) cannot hold one token's ", L, " rows of ", p.stride,
             " bytes; create the buffer with more bytes (init_hybrid_ep_buffer)");
  p.out = a.out;
  p.out_probs = a.out_probs;
  if (a.num_rows > 0) check_aligned(a.y, "the permuted rows to combine");
  const long long num_ids = static_cast<long long>(G) * a.num_tokens;
  const Scratch& scratch = ensure_scratch(st, G, std::max<int64_t>(a.num_tokens, 1), G * L, s);
  p.rowmap = scratch.ordinal;  // the dispatch's ordinals are recomputed by its next call
  FA2A_CUDA_CHECK(cudaMemsetAsync(scratch.ordinal, 0xff, sizeof(int32_t) * num_ids * L, s),
                  "hybrid combine row map reset");
  if (a.num_rows > 0) {
    const size_t smem = 2 * static_cast<size_t>(L) * sizeof(long long);
    if (smem > 48 * 1024) {
      FA2A_CUDA_CHECK(
          cudaFuncSetAttribute(rowmap_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "hybrid combine row map shared memory");
    }
    const int map_blocks = static_cast<int>(std::min<long long>((a.num_rows + 255) / 256, 1024));
    rowmap_kernel<<<map_blocks, 256, smem, s>>>(a.row_token, a.src_expert_counts, a.num_rows,
                                                a.pad_multiple, G, L, num_ids, scratch.ordinal);
    check_launch("hybrid combine row map");
  }
  auto* kernel = overlap       ? combine_kernel<kRoundsOverlap>
                 : p.pipelined ? combine_kernel<kRoundsHalves>
                               : combine_kernel<kRoundsPlain>;
  kernel<<<blocks, kThreads, 0, s>>>(c, p);
  check_launch("hybrid combine");
}

}  // namespace fa2a::cuda
