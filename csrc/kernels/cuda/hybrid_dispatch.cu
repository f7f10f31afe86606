// HybridEP dispatch on CUDA (SEMANTICS.md section 2; the CPU backend csrc/kernels/cpu/hybrid.cc
// defines the exact result): a notify kernel exchanges the per-(source, local expert) counts, then
// a data kernel moves the rows with the permute fused into the receive path. Transport and
// protocol: hybrid.cuh.
//
// Notify (one message): rank r sends every rank d its counts for d's L experts, its largest
// fan-out, N, H and the dtype flags; every rank then writes src_expert_counts, tokens_per_expert
// (padded, unclipped) and meta. Ranks that disagree on N (or H, dtype, probs) all see it: meta's
// NumTokens becomes -1 and the counts 0 (the dynamic path raises; the static path's data phase
// then moves no row and leaves zeros).
//
// Data (one message per round of T tokens; B blocks, see hybrid.cuh): slot position i of round k
// holds sender token t = kT + i whatever its routing (no compaction): the values (quantised to
// e4m3 on the send side with fp8_dispatch), scales, the L probs, and for each local expert j of
// the receiver the ordinal of t among the sender's tokens routed to j (-1: not routed; computed
// for all (t, e) by the route pre-pass, hybrid_route.cu). A row crosses the link once per
// destination rank; the receiver copies it to seg_start[s, j] + ordinal for every j, so rows land
// in the CPU backend's order by construction. Positions >= P are dropped; padding rows and the tail
// are zeroed. Nothing is written outside [0, P) rows.
#include <algorithm>
#include <mutex>

#include "core/hybrid_backends.h"
#include "fused_a2a/errors.h"
#include "hybrid.cuh"
#include "state.h"

namespace fa2a::cuda {
namespace {

using namespace hybrid;

// Layout of one dispatched row in a slot.
struct RowLayout {
  size_t x_bytes, scale_off, prob_off, ord_off, tok_off, tag_off, stride;
};

RowLayout row_layout(int64_t hidden, size_t value_bytes, bool fp8, bool probs, int L) {
  RowLayout r;
  r.x_bytes = align16(hidden * value_bytes);
  r.scale_off = r.x_bytes;
  r.prob_off = r.scale_off + (fp8 ? align16(hidden / kFp8BlockSize * sizeof(float)) : 0);
  r.ord_off = r.prob_off + (probs ? align16(L * sizeof(float)) : 0);
  r.tok_off = r.ord_off + align16(L * sizeof(int));
  r.tag_off = r.tok_off + 8;  // overlapped rounds: the message number, released after the row
  r.stride = r.tok_off + 16;
  return r;
}

constexpr int kNotifyWords = 5;  // after the L counts: fan-out, N, H, flags, L
// meta's N in the host-mapped copy before the notify kernel writes it (N >= 0, or -1)
constexpr int32_t kMetaNotWritten = -2;

// counts [E]: this rank's tokens per expert; fanout: its largest number of one rank's experts
// picked by one token (both from route_kernels).
__global__ void __launch_bounds__(kThreads)
    notify_kernel(Comm c, const int* counts, const int* fanout, int N, int H, int flags, int L,
                  long long pad, int32_t* src_expert_counts, int32_t* tokens_per_expert,
                  int32_t* meta, int32_t* meta_host, int32_t host_ticket) {
  __shared__ int s_fail, s_fanout, s_bad, s_max_n;
  __shared__ unsigned long long s_total;
  const int G = c.num_ranks, tid = threadIdx.x;
  if (tid == 0) {
    s_fail = aborted(c.wait_ctx()) ? 1 : 0;
    s_fanout = *fanout;
    s_bad = 0;
    s_max_n = 0;
    s_total = 0;
  }
  __syncthreads();
  if (s_fail) return;
  unsigned long long m = read_msgs(c);
  if (!enter(c, m, &s_fail)) return;
  ++m;
  if (!send_begin(c, m, &s_fail)) return;
  for (int i = tid; i < G * (L + kNotifyWords); i += blockDim.x) {
    const int d = i / (L + kNotifyWords), k = i - d * (L + kNotifyWords);
    int v;
    if (k < L) {
      v = counts[d * L + k];
    } else {
      const int w = k - L;
      v = w == 0 ? s_fanout : w == 1 ? N : w == 2 ? H : w == 3 ? flags : L;
    }
    reinterpret_cast<int*>(c.slot_on(d))[k] = v;
  }
  send_end(c, m);
  if (!recv_begin(c, m, &s_fail)) return;
  for (int i = tid; i < G * (L + kNotifyWords); i += blockDim.x) {
    const int s = i / (L + kNotifyWords), k = i - s * (L + kNotifyWords);
    const int v = __ldcg(reinterpret_cast<const int*>(c.slot_from(s)) + k);
    if (k < L) {
      src_expert_counts[s * L + k] = v;
    } else if (k == L) {
      atomicMax(&s_fanout, v);
    } else {
      const int mine = k == L + 1 ? N : k == L + 2 ? H : k == L + 3 ? flags : L;
      if (v != mine) s_bad = 1;
      if (k == L + 1) atomicMax(&s_max_n, v);
    }
  }
  recv_end(c, m);
  __syncthreads();
  // A thread per local expert (one thread walked all L x G counts: part of the notify's 44 us at
  // L = 64, run 71); the block's earlier global writes are visible after the __syncthreads.
  for (int j = tid; j < L; j += blockDim.x) {
    long long count = 0;
    for (int s = 0; s < G; ++s) {
      if (s_bad) src_expert_counts[s * L + j] = 0;
      count += src_expert_counts[s * L + j];
    }
    const long long padded = pad > 0 ? (count + pad - 1) / pad * pad : count;
    tokens_per_expert[j] = static_cast<int32_t>(padded);
    if (meta_host) meta_host[kHybridMetaSize + j] = static_cast<int32_t>(padded);
    atomicAdd(&s_total, static_cast<unsigned long long>(padded));
  }
  if (host_ticket) __threadfence_system();  // the counts before the ticket (thread 0, below)
  __syncthreads();
  if (tid == 0) {
    const long long total = static_cast<long long>(s_total);
    int32_t values[kHybridMetaSize];
    values[kHybridMetaTotalRows] = static_cast<int32_t>(min(total, 0x7fffffffll));
    values[kHybridMetaOverflow] = 0;
    values[kHybridMetaNumTokens] = s_bad ? -1 : N;
    values[kHybridMetaMaxFanout] = max(1, s_fanout);
    for (int i = 0; i < kHybridMetaSize; ++i) {
      meta[i] = values[i];
      // the dynamic path's host reads these after its sync, without a copy
      if (meta_host) meta_host[i] = values[i];
    }
    ctrl_of(c.peers[c.rank])->group_tokens = s_max_n;
    write_msgs(c, m);
    if (host_ticket) {  // the host spins on it (wait_host_ticket) instead of a stream sync
      __threadfence_system();
      *reinterpret_cast<volatile int32_t*>(meta_host + kHybridMetaSize + L) = host_ticket;
    }
  }
}

struct DataParams {
  const void* x;
  int x_code;  // value code of x (f32/f16/bf16) when quantising
  const float* x_scales;
  const int32_t* ordinal;  // [N, E] from the route pre-pass (hybrid_route.cu)
  const float* probs;
  int N, H, L;
  long long pad, P;
  bool quantize, fp8, cached, rounds_from_notify;
  int rows_per_round;
  int send_blocks;  // overlapped rounds: blocks [0, send_blocks) send, the others receive
  RowLayout row;
  size_t out_row;  // bytes of one permuted_x row
  void* permuted_x;
  float* permuted_probs;
  float* permuted_scales;
  int32_t* tokens_per_expert;
  const int32_t* src_expert_counts;
  int32_t* row_token;
  int32_t* meta;
};

// Expert groups (of 32, a lane each) whose header loads an item issues all at once, before it uses
// any (L <= 64); groups past them load in a loop. Each item was a chain of dependent loads, 2 to 3
// a group: ~212 us of the 977 us plain data kernel at EP 4 had no row bytes at all (run 77).
constexpr int kHeadGroups = 2;

// body(j0, load(j0 + lane)) for every expert group j0 = 0, 32, ... below L (j0 warp-uniform; load
// is called for lanes past L too and returns the unrouted value there), the loads of the first
// kHeadGroups groups all issued before the first body.
template <typename Load, typename Body>
__device__ __forceinline__ void for_each_group(int L, int lane, Load&& load, Body&& body) {
  decltype(load(0)) head[kHeadGroups];
#pragma unroll
  for (int g = 0; g < kHeadGroups; ++g) head[g] = load(g * 32 + lane);
#pragma unroll
  for (int g = 0; g < kHeadGroups; ++g) {
    if (g * 32 < L) body(g * 32, head[g]);
  }
  for (int j0 = kHeadGroups * 32; j0 < L; j0 += 32) body(j0, load(j0 + lane));
}

struct SendHeader {  // lane j of a group: d's expert j's ordinal of the token (-1: not routed),
                     // prob
  int ord;
  float prob;
};
struct RecvHeader {  // the same from the slot row, and the rows source s sends expert j
  int ord, count;
  float prob;
};

// Send side of one (token t at slot position k, destination d) item: the header always, the
// values when t is routed to any of d's experts. One warp. The row's first pieces are loaded
// before the routing is known (a token reaches >= 90% of the ranks at EP 4 with top-8 of 256),
// together with every group's ordinals and probs.
__device__ inline void send_item(const Comm& c, const DataParams& p, int64_t t, int k, int d,
                                 int lane, bool ablate_copy = false) {
  const RowLayout& rl = p.row;
  const int L = p.L, E = c.num_ranks * L;
  uint8_t* row = c.slot_on(d) + static_cast<size_t>(k) * rl.stride;
  const size_t te0 = static_cast<size_t>(t) * E + static_cast<size_t>(d) * L;
  const uint8_t* src = static_cast<const uint8_t*>(p.x) + t * p.out_row;
  // Own rows that need no quantising: the header only; the receive side reads x itself.
  const bool copy = !(d == c.rank && !p.quantize) && !ablate_copy;
  RowHead head;
  if (copy && !p.quantize) warp_load_head(head, src, p.out_row, lane);
  unsigned any = 0;
  const auto load = [&](int j) {
    return j < L ? SendHeader{__ldg(p.ordinal + te0 + j), p.probs ? __ldg(p.probs + te0 + j) : 0.0f}
                 : SendHeader{-1, 0.0f};
  };
  const auto header = [&](int j0, SendHeader h) {
    const int j = j0 + lane;
    if (j < L) {
      reinterpret_cast<int*>(row + rl.ord_off)[j] = h.ord;
      if (p.probs) reinterpret_cast<float*>(row + rl.prob_off)[j] = h.ord >= 0 ? h.prob : 0.0f;
    }
    any |= __ballot_sync(0xffffffffu, j < L && h.ord >= 0);
  };
  for_each_group(L, lane, load, header);
  if (lane == 0) *reinterpret_cast<int*>(row + rl.tok_off) = static_cast<int>(t);
  if (!any || !copy) return;
  if (p.quantize) {
    const size_t in_row = static_cast<size_t>(p.H) * (p.x_code == kValF32 ? 4 : 2);
    warp_quantize_row(static_cast<const uint8_t*>(p.x) + t * in_row, p.x_code, p.H, row,
                      reinterpret_cast<float*>(row + rl.scale_off), lane);
  } else {
    warp_copy_ro_after_head(row, src, p.out_row, head, lane);
    if (p.fp8) {
      const int cols = p.H / kFp8BlockSize;
      for (int b = lane; b < cols; b += 32) {
        reinterpret_cast<float*>(row + rl.scale_off)[b] = __ldg(p.x_scales + t * cols + b);
      }
    }
  }
}

// Receive side of one (source s, slot position k) item: the fused permute, the row to every
// (expert, ordinal) it was routed to, read once for all of them: lane i of the warp collects the
// i-th destination row over the 32-expert groups, and the row is copied when 32 are collected
// and at the end (per group, a row was read once a group with a routed expert: ~3.5 times at
// L = 128). Own rows (s == this rank) that needed no quantising come from x (their slot rows hold
// the header only). Every group's ordinals, counts and probs are loaded before any is used. seg:
// first row of (s', j) at s' * L + j. One warp.
__device__ inline void recv_item(const Comm& c, const DataParams& p, const long long* seg, int s,
                                 int k, int lane, bool ablate_copy = false) {
  const RowLayout& rl = p.row;
  const int L = p.L, N = p.N;
  const uint8_t* row = c.slot_from(s) + static_cast<size_t>(k) * rl.stride;
  const bool from_x = s == c.rank && !p.quantize;
  const int t = __ldcg(reinterpret_cast<const int*>(row + rl.tok_off));
  const int* ord_of = reinterpret_cast<const int*>(row + rl.ord_off);
  const float* prob_of = reinterpret_cast<const float*>(row + rl.prob_off);
  const int32_t* count_of = p.src_expert_counts + s * L;
  const auto load = [&](int j) {
    return j < L ? RecvHeader{__ldcg(ord_of + j), count_of[j], p.probs ? __ldcg(prob_of + j) : 0.0f}
                 : RecvHeader{-1, 0, 0.0f};
  };
  const int cols = p.fp8 ? p.H / kFp8BlockSize : 0;
  const uint8_t* values = from_x ? static_cast<const uint8_t*>(p.x) + t * p.out_row : row;
  const float* scales = from_x ? p.x_scales + static_cast<size_t>(t) * cols
                               : reinterpret_cast<const float*>(row + rl.scale_off);
  long long dest = -1;  // lane i: the i-th destination row collected (lanes < collected)
  int collected = 0;
  const auto copy_collected = [&] {
    const unsigned lanes = collected == 32 ? 0xffffffffu : (1u << collected) - 1;
    if (!ablate_copy) {
      warp_copy_fanout_cg(static_cast<uint8_t*>(p.permuted_x), p.out_row, dest, lanes, values,
                          p.out_row, lane);
    }
    collected = 0;
  };
  const auto group = [&](int j0, RecvHeader h) {
    const int j = j0 + lane;
    long long pos = -1;
    if (j < L && h.ord >= 0 && h.ord < h.count) pos = seg[s * L + j] + h.ord;
    if (pos >= p.P) pos = -1;  // static P overflow: dropped
    const unsigned mask = __ballot_sync(0xffffffffu, pos >= 0);
    for (unsigned m = mask; m; m &= m - 1) {  // warp-uniform
      const long long at = __shfl_sync(0xffffffffu, pos, __ffs(m) - 1);
      if (lane == collected) dest = at;
      if (++collected == 32) copy_collected();
      for (int i = lane; i < cols; i += 32) p.permuted_scales[at * cols + i] = __ldcg(scales + i);
    }
    if (pos >= 0) {  // each routed lane writes its own row's prob and token id
      if (p.probs) p.permuted_probs[pos] = h.prob;
      if (!p.cached) p.row_token[pos] = static_cast<int32_t>(s * N + t);
    }
  };
  for_each_group(L, lane, load, group);
  if (collected > 0) copy_collected();
}

// kRoundsOverlap's rounds (see data_kernel): message m0 + 1 + k carries round k. arrivals: the
// receive arrival counter's value after the kernel's earlier messages (every block took part). The
// senders release no data flags (the rows' tags replace them). A receiving block starts round k
// only after its rank's ack of the message before (so no block's arrival for k + 1, e.g. with no
// item, comes before another's for k: each round's last arrival releases that round's ack; and
// for round 0, every local block has cleared its share of the tags in the entry message).
template <typename ItemsOf>
__device__ inline bool overlap_rounds(const Comm& c, const DataParams& p, const long long* seg,
                                      unsigned long long& m, unsigned int arrivals,
                                      long long rounds, ItemsOf&& items_of, int* fail) {
  const int G = c.num_ranks, lane = threadIdx.x & 31;
  const OverlapRoles role(p.send_blocks);
  const size_t stride = p.row.stride, tag_off = p.row.tag_off;
  const int T = p.rows_per_round;
  const WaitCtx ctx = c.wait_ctx();
  for (long long round = 0; round < rounds; ++round) {
    ++m;
    const long long items = items_of(round);
    const auto done = static_cast<unsigned int>(round + 1);
    if (role.sender) {
      if (!send_begin(c, m, fail, 1)) return false;  // every receiver has read round k - 1
      for (long long w = role.warp_index; w < items; w += role.warps) {
        const int d = static_cast<int>(w % G), k = static_cast<int>(w / G);
        send_item(c, p, round * T + k, k, d, lane);
        warp_release_tag(reinterpret_cast<unsigned long long*>(
                             c.slot_on(d) + static_cast<size_t>(k) * stride + tag_off),
                         m, lane);
      }
      __syncthreads();
    } else {
      if (!overlap_recv_begin(c, m, fail)) return false;  // round 0 too: the tags are clear
      // After a timeout elsewhere each warp's next wait sees the abort and leaves.
      for (long long w = role.warp_index; w < items; w += role.warps) {
        const int s = static_cast<int>(w % G), k = static_cast<int>(w / G);
        const auto* tag = reinterpret_cast<const unsigned long long*>(
            c.slot_from(s) + static_cast<size_t>(k) * stride + tag_off);
        bool arrived = true;
        if (lane == 0) {
          arrived = wait_equal(tag, m, ctx, kPhaseData, s);
          if (!arrived) *fail = 1;
        }
        if (!__shfl_sync(0xffffffffu, arrived, 0)) break;
        (void)ld_acquire_sys(tag);  // every lane: its reads of the row come after the tag
        recv_item(c, p, seg, s, k, lane);
      }
      grid_recv_end(c, m, arrivals + done * role.recv_blocks);
    }
    if (*fail) return false;  // read after a __syncthreads: the same in every thread
  }
  return true;
}

// The data kernel's modes, each its own instantiation (the default kernel's registers stay as
// they were):
// - kRoundsPlain: every block sends its share of a round, then (after the grid's data flags)
//   receives.
// - kRoundsHalves (FUSED_A2A_HYBRID_PIPELINE=1, rows_per_round >= 2): each slot in two halves of
//   rows_per_round / 2 rows, round k in half k % 2, and round k + 1 sent before round k is
//   received, so one round's transfer overlaps the previous round's permute.
// - kRoundsOverlap (FUSED_A2A_HYBRID_OVERLAP bit 1, >= 2 blocks): blocks [0, send_blocks) send,
//   the others receive at the same time. Each slot row carries the message number (tag), released
//   by the sending warp after the row (fence, then release store), and a receiving warp waits for
//   its row's tag instead of the grid's data flag, so rows are permuted while others are in flight.
//   Slot reuse is unchanged: a round's senders wait for every receiver's ack of the round
//   before, released once all of its receiving blocks are done.
// Diagnostic instantiations (FUSED_A2A_HYBRID_ABLATE, plain rounds only): kAblateSend |
// kRoundsPlain sends the headers without the values, kAblateRecv | kRoundsPlain permutes nothing
// but the probs and token ids; their kernel times split the data kernel's send and receive costs.
// The results are wrong (bench verification fails); benchmarks/hybrid_kernels.py does not verify.
constexpr int kAblateSend = 8, kAblateRecv = 16;

template <int kMode>
__global__ void __launch_bounds__(kThreads) data_kernel(Comm c, DataParams p) {
  constexpr int kRounds = kMode & 7;
  constexpr bool kHalves = kRounds == kRoundsHalves;
  constexpr bool kNoSendCopy = (kMode & kAblateSend) != 0, kNoRecvCopy = (kMode & kAblateRecv) != 0;
  extern __shared__ long long s_mem[];
  const int G = c.num_ranks, L = p.L, E = G * L, tid = threadIdx.x;
  long long* seg = s_mem;       // [E] first row of (source s, expert j), at s*L + j
  long long* off = seg + E;     // [L] first row of expert j
  long long* cnt = off + L;     // [L] real rows of expert j
  long long* padded = cnt + L;  // [L]
  __shared__ int s_fail, s_bad, s_last;
  __shared__ long long s_total, s_rounds, s_positions;
  const int lane = tid & 31, warp = tid >> 5;
  const long long nwarps = static_cast<long long>(gridDim.x) * kWarps;
  const long long gw = static_cast<long long>(blockIdx.x) * kWarps + warp;
  if (tid == 0) {
    s_fail = aborted(c.wait_ctx()) ? 1 : 0;
    // A handle that does not belong to this N (or a notify that found the ranks disagreeing):
    // every row is treated as unrouted, but the rounds still run so that the peers finish.
    s_bad = p.meta[kHybridMetaNumTokens] != p.N ? 1 : 0;
    long long total = 0;
    for (int j = 0; j < L; ++j) {
      off[j] = total;
      long long count = 0;
      for (int s = 0; s < G; ++s) {
        const long long v = p.src_expert_counts[s * L + j];
        if (v < 0) s_bad = 1;
        seg[s * L + j] = total + count;
        count += v > 0 ? v : 0;
      }
      cnt[j] = count;
      padded[j] = p.pad > 0 ? (count + p.pad - 1) / p.pad * p.pad : count;
      total += padded[j];
    }
    s_total = total;
    long long n = p.N;
    if (p.rounds_from_notify) n = ctrl_of(c.peers[c.rank])->group_tokens;
    s_positions = min(n, static_cast<long long>(p.rows_per_round));  // slot rows ever used
    const long long round_rows = kHalves ? p.rows_per_round / 2 : p.rows_per_round;
    s_rounds = (n + round_rows - 1) / round_rows;
    // The notify's group-wide verdict that the ranks disagree (every rank sees it, and their
    // round sizes may differ): no rounds on any rank.
    if (p.meta[kHybridMetaNumTokens] == -1) s_rounds = 0;
  }
  __syncthreads();
  const bool bad = s_bad != 0;
  const int T = kHalves ? p.rows_per_round / 2 : p.rows_per_round;
  const auto items_of = [&](long long round) {
    const long long t0 = round * T;
    const long long t1 = bad ? t0 : min(static_cast<long long>(p.N), t0 + T);
    return max(0ll, t1 - t0) * G;
  };
  // Slot row of round position k: the round's half first (pipelined).
  const auto slot_row = [&](long long round, int k) {
    return kHalves ? static_cast<int>((round & 1) * T) + k : k;
  };
  // Destination innermost: consecutive warps write to different peers.
  auto send_round = [&](long long round, unsigned long long) {
    const long long items = items_of(round);
    for (long long w = gw; w < items; w += nwarps) {
      const int d = static_cast<int>(w % G), k = static_cast<int>(w / G);
      send_item(c, p, round * T + k, slot_row(round, k), d, lane, kNoSendCopy);
    }
  };
  auto recv_round = [&](long long round, unsigned long long) {
    const long long items = items_of(round);
    for (long long w = gw; w < items; w += nwarps) {
      recv_item(c, p, seg, static_cast<int>(w % G), slot_row(round, static_cast<int>(w / G)), lane,
                kNoRecvCopy);
    }
  };
  unsigned long long m = read_msgs(c);
  unsigned int q = 0;
  bool ok = !s_fail;
  if constexpr (kRounds == kRoundsOverlap) {
    // The entry message also clears the tags of every slot row this op uses, before its ack
    // lets any sender write: a stale tag (an earlier buffer's at the same address, or normal
    // mode's bytes in JAX's shared data region) could otherwise equal a message number here.
    const auto clear_tags = [&] {
      grid_zero_tags(G * s_positions, [&](long long i) {
        return reinterpret_cast<unsigned long long*>(
            const_cast<uint8_t*>(c.slot_from(static_cast<int>(i % G))) +
            static_cast<size_t>(i / G) * p.row.stride + p.row.tag_off);
      });
    };
    ok = ok && grid_message(c, m, q, &s_fail, [] {}, clear_tags);
    if (ok) {
      ok = overlap_rounds(c, p, seg, m, q * gridDim.x, s_rounds, items_of, &s_fail);
    }
  } else {
    ok = ok && grid_enter(c, m, q, &s_fail);
    if (ok) ok = grid_rounds<kHalves>(c, m, q, &s_fail, s_rounds, send_round, recv_round);
  }
  // Padding rows of each expert and the tail past the padded total: zeros.
  const int cols = p.fp8 ? p.H / kFp8BlockSize : 0;
  for (int j = -1; ok && j < L; ++j) {
    long long z0 = j < 0 ? s_total : off[j] + cnt[j];
    long long z1 = j < 0 ? p.P : off[j] + padded[j];
    if (bad && j < 0) z0 = 0;  // nothing was received: every row is zero
    z1 = min(z1, p.P);
    for (long long r = z0 + gw; r < z1; r += nwarps) {
      warp_zero(static_cast<uint8_t*>(p.permuted_x) + r * p.out_row, p.out_row, lane);
      for (int b = lane; b < cols; b += 32) p.permuted_scales[r * cols + b] = 0.0f;
      if (lane == 0) {
        if (p.permuted_probs) p.permuted_probs[r] = 0.0f;
        if (!p.cached) p.row_token[r] = -1;
      }
    }
  }
  if (!grid_finish(c, &s_last)) return;
  if (tid == 0) {
    write_msgs(c, m);
    if (!p.cached) {
      for (int j = 0; j < L; ++j) {
        const long long v = bad ? 0 : min(max(p.P - off[j], 0ll), padded[j]);
        p.tokens_per_expert[j] = static_cast<int32_t>(v);
      }
      p.meta[kHybridMetaOverflow] = (!bad && s_total > p.P) ? 1 : 0;
    }
  }
}

void check_common(Buffer& buffer, const HybridDispatchArgs& a) {
  const int G = buffer.num_ranks();
  FA2A_CHECK(G >= 1 && G <= kMaxRanks, "group size ", G, " is not supported");
  FA2A_CHECK(a.num_experts <= kMaxExpertsNotify,
             "fused_a2a hybrid dispatch (CUDA): E = ", a.num_experts, " exceeds the limit of ",
             kMaxExpertsNotify, " experts");
  FA2A_CHECK(a.num_tokens * G <= 0x7fffffffll, "fused_a2a hybrid dispatch: ", G,
             " ranks x N = ", a.num_tokens, " tokens do not fit int32 global token ids");
}

// meta_host: also write meta and then the L padded counts there (host-mapped; the dynamic
// path), or null; host_ticket != 0: then that value after them, at meta_host[kHybridMetaSize + L].
void launch_notify(Buffer& buffer, CudaState& st, const HybridDispatchArgs& a, cudaStream_t s,
                   int32_t* meta_host, int32_t host_ticket = 0) {
  const Comm c = make_comm(buffer, st, kOpHybridNotify);
  const int L = a.num_local_experts;
  FA2A_CHECK(c.slot_bytes >= (L + kNotifyWords) * sizeof(int),
             "fused_a2a hybrid dispatch: the buffer is too small for the counts of ", L,
             " local experts");
  const int flags = static_cast<int>(a.x_dtype) | (a.x_scales ? 256 : 0) | (a.probs ? 512 : 0) |
                    (a.quantize_fp8 ? 1024 : 0);
  const Scratch& scratch = st.scratch;  // launch_hybrid_route ran first
  notify_kernel<<<1, kThreads, 0, s>>>(c, scratch.ecount, scratch.fanout,
                                       static_cast<int>(a.num_tokens), static_cast<int>(a.hidden),
                                       flags, L, a.pad_multiple, a.src_expert_counts,
                                       a.tokens_per_expert, a.meta, meta_host, host_ticket);
  check_launch("hybrid dispatch notify");
}

// cached: combine's backward (the handle is read only); from_notify: the rounds follow the
// group's largest N seen by the notify just before (static and dynamic dispatch).
void launch_data(Buffer& buffer, CudaState& st, const HybridDispatchArgs& a, cudaStream_t s,
                 bool cached, bool from_notify) {
  const Comm c = make_comm(buffer, st, kOpHybridDispatch);
  const int L = a.num_local_experts;
  const DType row_dtype = a.quantize_fp8 ? DType::kE4M3 : a.x_dtype;
  DataParams p{};
  p.x = a.x;
  p.x_code = value_code(a.x_dtype);
  p.x_scales = a.x_scales;
  p.ordinal = st.scratch.ordinal;  // launch_hybrid_route ran first
  p.probs = a.probs;
  p.N = static_cast<int>(a.num_tokens);
  p.H = static_cast<int>(a.hidden);
  p.L = L;
  p.pad = a.pad_multiple;
  p.P = a.num_rows;
  p.quantize = a.quantize_fp8;
  p.fp8 = row_dtype == DType::kE4M3;
  p.cached = cached;
  p.rounds_from_notify = from_notify;
  p.row = row_layout(a.hidden, dtype_size(row_dtype), p.fp8, a.probs != nullptr, L);
  p.out_row = static_cast<size_t>(a.hidden) * dtype_size(row_dtype);
  const size_t rows = c.slot_bytes / p.row.stride;
  FA2A_CHECK(rows >= 1, "fused_a2a hybrid dispatch: the buffer slot (", c.slot_bytes,
             " bytes) cannot hold one row of ", p.row.stride,
             " bytes; create the buffer with more bytes (init_hybrid_ep_buffer)");
  p.rows_per_round = static_cast<int>(std::min<size_t>(rows, 1 << 20));
  p.permuted_x = a.permuted_x;
  p.permuted_probs = a.permuted_probs;
  p.permuted_scales = a.permuted_scales;
  p.tokens_per_expert = a.tokens_per_expert;
  p.src_expert_counts = a.src_expert_counts;
  p.row_token = a.row_token;
  p.meta = a.meta;
  if (a.num_rows > 0) {
    check_aligned(a.permuted_x, "permuted hidden output");
    check_aligned(a.x, "x");
  }
  const size_t E = static_cast<size_t>(a.num_experts);
  const size_t smem = (E + 3 * static_cast<size_t>(L)) * sizeof(long long);
  const int blocks = comm_blocks(st, a.num_sms);
  const bool overlap = (hybrid_overlap_bits(c.num_ranks) & kOverlapDispatch) != 0 && blocks >= 2;
  const bool pipelined = !overlap && hybrid_pipeline_env() && p.rows_per_round >= 2;
  p.send_blocks = overlap ? hybrid_send_blocks(blocks) : 0;
  const int ablate = overlap || pipelined ? 0 : hybrid_ablate_env();
  auto* kernel = overlap       ? data_kernel<kRoundsOverlap>
                 : pipelined   ? data_kernel<kRoundsHalves>
                 : ablate == 1 ? data_kernel<kRoundsPlain | kAblateSend>
                 : ablate == 2 ? data_kernel<kRoundsPlain | kAblateRecv>
                               : data_kernel<kRoundsPlain>;
  if (smem > 48 * 1024) {
    FA2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)),
                    "hybrid dispatch shared memory");
  }
  kernel<<<blocks, kThreads, smem, s>>>(c, p);
  check_launch(cached ? "hybrid dispatch (cached)" : "hybrid dispatch");
}

}  // namespace

void hybrid_dispatch(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  check_common(buffer, args);
  OpScope scope(buffer);
  launch_hybrid_route(buffer, scope.st, args, s);
  launch_notify(buffer, scope.st, args, s, nullptr);
  launch_data(buffer, scope.st, args, s, false, true);
}

int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  check_common(buffer, args);
  OpScope scope(buffer);
  // FUSED_A2A_HYBRID_NOTIFY_WAIT=spin: the host spins on a ticket the kernel writes after its
  // counts (wait_host_ticket) instead of a stream sync, so it goes on as soon as they are written
  // (runs 84-85: 63-86 us between the sync's return and the data kernel's launch, 30 in run 80).
  const bool spin = env_is("FUSED_A2A_HYBRID_NOTIFY_WAIT", "spin");
  FA2A_CHECK(!capturing(s),
             "fused_a2a hybrid dispatch: the stream is capturing a CUDA graph, and the dynamic "
             "dispatch (num_permuted_tokens=None) needs its counts on the host; capture one with "
             "a static num_permuted_tokens instead");
  launch_hybrid_route(buffer, scope.st, args, s);
  scope.st.hybrid_notified = {args.routing_map, args.num_tokens, args.num_experts,
                              args.num_local_experts, scope.st.scratch_gen};
  // The kernel writes meta and the padded counts into host-mapped memory too: no copy back
  // after the sync (a pageable cudaMemcpy took 21 us, then the caller's meta.item() another ~20,
  // run 75's timeline), and the caller's host counts need not wait for the data kernel (the
  // torch op's tokens_per_expert.to("cpu") blocked the host for the whole data kernel, 889 us in
  // run 80's timeline).
  const int words = kHybridMetaSize + args.num_local_experts + 1;  // meta, counts, ticket
  if (scope.st.hybrid_meta_host_words < words) {  // the first dynamic dispatch, or a larger L
    if (scope.st.hybrid_meta_host) {  // a grown L (rare): after the kernels that write it
      FA2A_CUDA_CHECK(cudaStreamSynchronize(s), "hybrid dispatch notify: synchronising");
      FA2A_CUDA_CHECK(cudaFreeHost(scope.st.hybrid_meta_host), "cudaFreeHost (HybridEP counts)");
      scope.st.hybrid_meta_host = nullptr;
      scope.st.hybrid_meta_host_words = 0;
    }
    void* host = nullptr;
    FA2A_CUDA_CHECK(
        cudaHostAlloc(&host, sizeof(int32_t) * words, cudaHostAllocMapped | cudaHostAllocPortable),
        "cudaHostAlloc (HybridEP counts)");
    scope.st.hybrid_meta_host = static_cast<int32_t*>(host);
    scope.st.hybrid_meta_host_words = words;
  }
  volatile int32_t* meta = scope.st.hybrid_meta_host;
  meta[kHybridMetaNumTokens] = kMetaNotWritten;
  int32_t ticket = 0;  // 0: the kernel writes none (the stream sync below)
  if (spin) {
    check_host_wait_env();  // before the launch: wait_host_ticket would refuse it after
    ticket = scope.st.hybrid_ticket = scope.st.hybrid_ticket % 0x7fffffff + 1;
  }
  volatile int32_t* ticket_word = meta + kHybridMetaSize + args.num_local_experts;
  *ticket_word = 0;
  launch_notify(buffer, scope.st, args, s, scope.st.hybrid_meta_host, ticket);
  if (spin) {
    wait_host_ticket(scope.st, buffer, ticket_word, ticket, &s, "hybrid dispatch notify");
  } else {
    sync_and_check(scope.st, buffer, s, "hybrid dispatch notify");
  }
  FA2A_CHECK_RUNTIME(meta[kHybridMetaNumTokens] != kMetaNotWritten,
                     "fused_a2a hybrid dispatch: the notify kernel ended without its counts");
  FA2A_CHECK(meta[kHybridMetaNumTokens] == args.num_tokens,
             "fused_a2a hybrid dispatch: HybridEP mode needs the same number of tokens N (rows of "
             "x) on every rank, and the same hidden size, dtype, probs / FP8 scales presence, "
             "fp8_dispatch and num_local_experts; the ranks differ (this rank: N=",
             args.num_tokens, ", hidden size ", args.hidden, ")");
  if (args.tokens_per_expert_host) {
    for (int j = 0; j < args.num_local_experts; ++j) {
      args.tokens_per_expert_host[j] = meta[kHybridMetaSize + j];
    }
  }
  return meta[kHybridMetaTotalRows];
}

void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  check_common(buffer, args);
  OpScope scope(buffer);
  // The notify's pre-pass is still in the scratch when nothing used it since (every use bumps
  // scratch_gen) and the routing is the same; else (another op in between) it runs again.
  const CudaState::NotifiedRoute nr = scope.st.hybrid_notified;
  scope.st.hybrid_notified.routing_map = nullptr;  // one use
  const bool adjacent = nr.gen == scope.st.scratch_gen && nr.routing_map == args.routing_map &&
                        nr.num_tokens == args.num_tokens && nr.num_experts == args.num_experts &&
                        nr.num_local_experts == args.num_local_experts;
  if (!adjacent) launch_hybrid_route(buffer, scope.st, args, s);
  launch_data(buffer, scope.st, args, s, false, true);
}

void hybrid_dispatch_cached(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  check_common(buffer, args);
  OpScope scope(buffer);
  launch_hybrid_route(buffer, scope.st, args, s);
  launch_data(buffer, scope.st, args, s, true, false);
}

}  // namespace fa2a::cuda
