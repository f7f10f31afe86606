// Normal-mode dispatch on CUDA, shared pieces (included by dispatch.cu only): the kernel's
// parameters and shared-memory layout, metadata records, the window segments of a (source,
// destination) stream, the per-warp trace and the item enumeration. Protocol: dispatch.cu.
#pragma once

#include "scan_pass2.cuh"
#include "state.h"

namespace fa2a::cuda::dispatch_impl {

// Who copies this rank's own rows x -> recv_x (FUSED_A2A_CUDA_SELF=send|recv|split): the sender
// warps with bulk copies, the receiver warps, or both (own chunk c: receivers when c is even).
// Each own chunk is copied by exactly one role (tests/cuda_host/own_rows_check.cu).
enum OwnRows : int { kOwnBySenders = 0, kOwnByReceivers = 1, kOwnSplit = 2 };
__host__ __device__ __forceinline__ bool own_chunk_by_senders(int mode, long long chunk) {
  return mode == kOwnBySenders || (mode == kOwnSplit && (chunk & 1));
}
__host__ __device__ __forceinline__ bool own_chunk_by_receivers(int mode, long long chunk) {
  return mode == kOwnByReceivers || (mode == kOwnSplit && !(chunk & 1));
}
// Whether a role has any own chunk (the senders' own column, the receivers' own row count).
__host__ __device__ __forceinline__ bool senders_have_own(int mode) {
  return mode != kOwnByReceivers;
}
__host__ __device__ __forceinline__ bool receivers_have_own(int mode) {
  return mode != kOwnBySenders;
}

struct DispatchParams {
  int rank, num_ranks, lpr, num_topk, num_experts, num_tokens, op;
  bool static_mode, idx64, tma;
  size_t row_bytes;
  int nsc, meta_words, meta_real;  // meta record: words (multiple of 4), words in use
  bool scales_vec;  // x_scales rows load as float4 (nsc % 4 == 0, 16-byte aligned pointer)
  // The records' index and weight words load as 16-byte vectors, 4 choices of a row at a time
  // (by default, FUSED_A2A_CUDA_META_VEC=0: off; K % 4 == 0, 16-byte aligned topk_idx / topk_w,
  // scales absent or scales_vec): head_quads, in the records kernel and the fused-scan kernels'
  // kHeadVec instantiations (the senders' remote chunks; the own rows' records stay word by word)
  bool head_vec;
  bool dst_major;
  bool claim_items;         // senders claim items from a counter (FUSED_A2A_CUDA_CLAIM, default 1)
  int own_rows;             // who copies the own rows x -> recv_x: an OwnRows value
  int recv_rows;            // rows of a receiver item (FUSED_A2A_CUDA_RECV_ROWS; 0: a whole chunk)
  bool zero_while_waiting;  // receivers zero padding rows during flag waits (FUSED_A2A_CUDA_ZERO)
  bool layout_notify;    // static, G <= kLayoutMaxRanks: no round-0 ready (FUSED_A2A_CUDA_LAYOUT)
  bool recv_own_column;  // receiver items keep an empty own column (FUSED_A2A_CUDA_RECV_COLS=all)
  // Direct rows (the static dispatch with the layout notify, and with FUSED_A2A_CUDA_DIRECT_READY
  // the dispatches whose receivers send a ready message; FUSED_A2A_CUDA_DIRECT=0 turns them off):
  // every peer reaches this rank's recv_x (all in this process, or recv_x in this rank's output
  // arena), so its LayoutSlot or ready message carries recv_x (as a delta from its buffer base),
  // the senders push its rows straight there instead of into its window, and its receivers copy
  // no rows (only the records, which still travel through the window with the chunk flags). A
  // sender follows each receiver's published delta, so ranks need not agree.
  bool direct_recv;
  const uint8_t* x;
  const float* x_scales;
  const void* topk_idx;
  const float* topk_w;
  long long capacity;
  long long zero_end;  // padding rows [kept total, zero_end) are zeroed: capacity, or 0 (no)
  uint8_t* recv_x;
  float* recv_scales;
  int* recv_idx;
  long long* recv_idx64;  // DispatchArgs::recv_topk_idx64: the indices as int64 instead
  float* recv_w;
  int* recv_src_counts;
  int* recv_src_token;
  int* tokens_per_expert;
  int* num_recv;
  int* num_dropped;
  int* group_max;
  const int* cum;
  const int* send_list;
  // records[(d * N + j) * M + w]: word w of the record of the j-th token routed to rank d, the
  // words meta_word gives (dispatch_records_kernel; FUSED_A2A_CUDA_RECORDS=1), or null: the
  // senders compute them per chunk.
  const uint32_t* records;
  int* hist;
  uint8_t* const* peers;
  HostError* host_error;
  unsigned long long timeout_ns;
  long long window;     // R
  int chunk;            // largest chunk rows (the kernel picks CR per receiver)
  int chunks_per_warp;  // CR ~ rows / (chunks_per_warp x sender warps), at most chunk
  int staging_rows;     // rows of a metadata staging buffer (>= any receiver's CR)
  int send_warps, recv_warps, stages;
  // kRecvPush: the first push_warps receiver warps of a block push rows with plain stores beside
  // the senders' bulk copies (claiming the same items), then receive (FUSED_A2A_CUDA_RECV_PUSH)
  int push_warps;
  uint32_t stage_bytes;
  bool flag_fence_sc;
  bool wait_acquire_first;    // LaunchConfig's
  int loads_ahead;            // TmaPipe A (FUSED_A2A_CUDA_LOADS_AHEAD; 0: stages - 2)
  unsigned long long* trace;  // host-mapped phase times or null (state.h, kTraceSlots)
  // fused_scan (kFusedScan kernels): route_mask_kernel ran the route scan's first pass and this
  // kernel runs the second (the send lists and cum[d][N]).
  ScanPass2 scan2;
  // The torch dynamic dispatch's speculative path through this (static) kernel, with the layout
  // notify and the fused scan (the default; FUSED_A2A_TORCH_SPECULATIVE): host_ticket != 0 with
  // pinned host_counts [4 + lpr]. Each rank's (token, local expert) pair counts (summed from the
  // first scan pass's tile_ecount [scan2.tiles][E]) travel with its layout; block 0 writes
  // dispatch_notify's host counts (num_recv, 0, group_max_tokens, tokens_per_expert, all true
  // counts) once every layout is in, then the ticket.
  int* host_counts;
  int host_ticket;
  const int* tile_ecount;
  // FUSED_A2A_CUDA_ABLATE (diagnostic build only, wrong results): bit 1 receivers copy no rows,
  // bit 2 senders stage only the tokens of the metadata records, bit 4 senders push no rows,
  // bit 8 no sender or receiver role at all.
  int ablate;
};

// Ablations exist only in a diagnostic build (-DFA2A_CUDA_ABLATE=1), so that the default kernel's
// registers are untouched.
#ifndef FA2A_CUDA_ABLATE
#define FA2A_CUDA_ABLATE 0
#endif
__device__ __forceinline__ bool ablated(const DispatchParams& p, int bit) {
  return FA2A_CUDA_ABLATE && (p.ablate & bit);
}

struct SmemLayout {
  size_t hist, ready, meta, meta_per_warp, pipes, per_warp, total;
};

__host__ __device__ inline SmemLayout smem_layout(int lpr, int send_warps, bool tma, int stages,
                                                  uint32_t stage_bytes, int chunk, int meta_words) {
  SmemLayout l;
  l.hist = 0;
  l.ready = align128(sizeof(int) * lpr);
  l.meta = l.ready + align128(sizeof(int) * kMaxRanks * send_warps);
  l.meta_per_warp = 2 * ((sizeof(int) * chunk * meta_words + 15) & ~size_t(15));
  l.pipes = l.meta + align128(l.meta_per_warp * send_warps);
  l.per_warp = tma ? align128(tma_pipe_bytes(stage_bytes, stages)) : 0;
  l.total = l.pipes + l.per_warp * send_warps;
  return l;
}

// A top-k choice's two record words as sent to rank d: expert e's index local to d, or -1 where
// d does not own e; its weight wt, or 0 there.
__device__ __forceinline__ uint32_t local_idx_word(const DispatchParams& p, long long e, int d) {
  const bool mine = owner_of(e, p.num_experts, p.lpr) == d;
  return static_cast<uint32_t>(mine ? static_cast<int>(e - d * static_cast<long long>(p.lpr)) : -1);
}
__device__ __forceinline__ uint32_t weight_word(const DispatchParams& p, long long e, float wt,
                                                int d) {
  return __float_as_uint(owner_of(e, p.num_experts, p.lpr) == d ? wt : 0.f);
}

// Metadata word w of token t as sent to rank d: [src token][K local idx][K weights][scales].
__device__ __forceinline__ uint32_t meta_word(const DispatchParams& p, int t, int d, int w) {
  const int K = p.num_topk;
  if (w == 0) return static_cast<uint32_t>(t);
  if (w >= p.meta_real) return 0u;
  if (w <= 2 * K) {
    const size_t tk = static_cast<size_t>(t) * K + (w - 1) % K;
    const long long e = load_idx(p.topk_idx, p.idx64, static_cast<long long>(tk));
    // The weight's load does not wait for the expert's: one load latency per word, not two.
    const float wt = (w > K && p.topk_w) ? __ldg(p.topk_w + tk) : 0.f;
    return w <= K ? local_idx_word(p, e, d) : weight_word(p, e, wt, d);
  }
  return __float_as_uint(__ldg(p.x_scales + static_cast<size_t>(t) * p.nsc + (w - 1 - 2 * K)));
}

// Words [0, words) of metadata, 32 x kMetaBatch at a time: every word's loads are issued before
// any is used, so the warp waits about one load latency per batch. One word per round cost a
// latency per 32 words: ~20 a 32-row chunk, 68-156 us per sender warp at EP 4 (run 22 trace,
// meta_cycles). load(i) runs in every lane, also for i >= words (it may shuffle; its value is
// dropped there); emit(i, value) only for i < words.
constexpr int kMetaBatch = 4;
template <typename Load, typename Emit>
__device__ __forceinline__ void batched_words(int words, int lane, Load&& load, Emit&& emit) {
  for (int i0 = 0; i0 < words; i0 += 32 * kMetaBatch) {
    uint32_t v[kMetaBatch];
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u) v[u] = load(i0 + u * 32 + lane);
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u) {
      const int i = i0 + u * 32 + lane;
      if (i < words) emit(i, v[u]);
    }
  }
}

// The index and weight words [1, 2K] of nb <= 32 rows for rank d (lane l holds row l's token;
// p.head_vec): an item is 4 of a row's K choices, loaded as 16-byte vectors (indices: one int4 or
// two longlong2; weights: one float4), every item of a lane's batch before any is used. A 32-row
// chunk of top-8 rows is 64 items, one batch: about one load latency, where the word-by-word
// loads (batched_words) took four batches of 128 words (session 23: the senders' metadata was 26%
// of a 12-SM sender warp's loop). Words are those of meta_word.
constexpr int kQuadBatch = 2;
template <typename Emit>
__device__ __forceinline__ void head_quads(const DispatchParams& p, int token, int nb, int d,
                                           int lane, Emit&& emit) {
  const int K = p.num_topk, qpr = K / 4, items = nb * qpr;
  for (int i0 = 0; i0 < items; i0 += 32 * kQuadBatch) {
    long long e[kQuadBatch][4];
    float4 wt[kQuadBatch];
#pragma unroll
    for (int u = 0; u < kQuadBatch; ++u) {
      const int i = i0 + u * 32 + lane;
      const int row = min(i / qpr, nb - 1);
      const int t = __shfl_sync(0xffffffffu, token, row);  // every lane: the shuffle's mask
      wt[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int c = 0; c < 4; ++c) e[u][c] = -1;
      if (i >= items) continue;
      const size_t base = static_cast<size_t>(t) * K + 4 * (i - row * qpr);
      if (p.idx64) {
        const auto* src = reinterpret_cast<const longlong2*>(
            reinterpret_cast<const long long*>(p.topk_idx) + base);
        const longlong2 a = __ldg(src), b = __ldg(src + 1);
        e[u][0] = a.x, e[u][1] = a.y, e[u][2] = b.x, e[u][3] = b.y;
      } else {
        const int4 a =
            __ldg(reinterpret_cast<const int4*>(reinterpret_cast<const int*>(p.topk_idx) + base));
        e[u][0] = a.x, e[u][1] = a.y, e[u][2] = a.z, e[u][3] = a.w;
      }
      if (p.topk_w) wt[u] = __ldg(reinterpret_cast<const float4*>(p.topk_w + base));
    }
#pragma unroll
    for (int u = 0; u < kQuadBatch; ++u) {
      const int i = i0 + u * 32 + lane;
      if (i >= items) continue;
      const int row = i / qpr, k0 = 4 * (i - row * qpr);
      const float w4[4] = {wt[u].x, wt[u].y, wt[u].z, wt[u].w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        emit(row, 1 + k0 + c, local_idx_word(p, e[u][c], d));
        emit(row, 1 + K + k0 + c, weight_word(p, e[u][c], w4[c], d));
      }
    }
  }
}

// The metadata words of nb <= 32 rows for rank d (lane l holds row l's token), batched
// (batched_words); the words past meta_real (padding) are not emitted. emit(row, word index,
// value). FP8 scales (p.scales_vec): 16-byte loads, the first batch issued before the other
// words' loads so that both wait about one latency together (run 39: FP8 records as single words
// cost 316K cycles a sender warp, twice bf16's). kHeadVec: the index and weight words through
// head_quads when p.head_vec (own instantiations: the vector path in the default kernels doubled
// their spills, 424 / 592 -> 792 / 1472 bytes at 48 SMs).
template <bool kHeadVec = false, typename Emit>
__device__ __forceinline__ void meta_words(const DispatchParams& p, int token, int nb, int d,
                                           int lane, Emit&& emit) {
  const int head = p.scales_vec ? 1 + 2 * p.num_topk : p.meta_real;  // words a row, word by word
  const int vpr = p.nsc / 4, vecs = p.scales_vec ? nb * vpr : 0;     // 16-byte scale loads
  auto load_vec = [&](int i) {
    const int row = min(i / max(vpr, 1), nb - 1);
    const int t = __shfl_sync(0xffffffffu, token, row);
    const float4* src =
        reinterpret_cast<const float4*>(p.x_scales + static_cast<size_t>(t) * p.nsc);
    return i < vecs ? __ldg(src + (i - row * vpr)) : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  auto emit_vec = [&](int i, const float4& v) {
    const int row = i / vpr, w = head + 4 * (i - row * vpr);
    emit(row, w, __float_as_uint(v.x));
    emit(row, w + 1, __float_as_uint(v.y));
    emit(row, w + 2, __float_as_uint(v.z));
    emit(row, w + 3, __float_as_uint(v.w));
  };
  auto load_batch = [&](int i0, float4* v) {
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u) v[u] = load_vec(i0 + u * 32 + lane);
  };
  float4 v[kMetaBatch];
  if (vecs > 0) load_batch(0, v);
  if (kHeadVec && p.head_vec) {  // head == 1 + 2K: the token word, then the index and weights
    if (lane < nb) emit(lane, 0, static_cast<uint32_t>(token));
    head_quads(p, token, nb, d, lane, emit);
  } else {
    const int words = nb * head;
    batched_words(
        words, lane,
        [&](int i) {
          const int row = min(i / head, nb - 1);
          const int t = __shfl_sync(0xffffffffu, token, row);
          return i < words ? meta_word(p, t, d, i - row * head) : 0u;
        },
        [&](int i, uint32_t v) {
          const int row = i / head;
          emit(row, i - row * head, v);
        });
  }
  for (int i0 = 0; i0 < vecs; i0 += 32 * kMetaBatch) {
    if (i0 > 0) load_batch(i0, v);  // batch 0 was loaded before the other words
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u)
      if (i0 + u * 32 + lane < vecs) emit_vec(i0 + u * 32 + lane, v[u]);
  }
}

// The metadata records of n rows (tokens list[0, n)) for rank d, into out[n * M] (shared
// memory), with one coalesced load of the list per 32 rows.
template <bool kHeadVec = false>
__device__ __forceinline__ void stage_chunk_meta(const DispatchParams& p, const int* list, int n,
                                                 int d, uint32_t* out, int lane) {
  const int M = p.meta_words;
  for (int b = 0; b < n; b += 32) {
    const int nb = min(32, n - b);
    const int token = lane < nb ? __ldg(list + b + lane) : 0;
    meta_words<kHeadVec>(p, token, nb, d, lane,
                         [&](int row, int w, uint32_t v) { out[(b + row) * M + w] = v; });
  }
}

// Writes metadata word w of received row P into the outputs.
__device__ __forceinline__ void scatter_meta(const DispatchParams& p, long long P, int w,
                                             uint32_t v, int* s_hist) {
  const int K = p.num_topk;
  if (w >= p.meta_real) return;
  if (w == 0) {
    if (p.recv_src_token) p.recv_src_token[P] = static_cast<int>(v);
  } else if (w <= K) {
    if (p.recv_idx) p.recv_idx[P * K + (w - 1)] = static_cast<int>(v);
    if (p.recv_idx64) p.recv_idx64[P * K + (w - 1)] = static_cast<int>(v);
    const int j = static_cast<int>(v);
    if (j >= 0 && j < p.lpr) atomicAdd(&s_hist[j], 1);
  } else if (w <= 2 * K) {
    if (p.recv_w) p.recv_w[P * K + (w - 1 - K)] = __uint_as_float(v);
  } else {
    p.recv_scales[P * p.nsc + (w - 1 - 2 * K)] = __uint_as_float(v);
  }
}

// n records of M = p.meta_words words (load(i): word i, i < n * M; every lane calls it, see
// batched_words) into the outputs of received rows [P0, P0 + n): a chunk's window records
// (receivers) or the own rows' precomputed records.
template <typename Load>
__device__ __forceinline__ void scatter_records(const DispatchParams& p, int M, int n, long long P0,
                                                int lane, int* s_hist, Load&& load) {
  batched_words(
      n * M, lane, [&](int i) { return i < n * M ? load(i) : 0u; },
      [&](int i, uint32_t v) {
        const int row = i / M;
        scatter_meta(p, P0 + row, i - row * M, v, s_hist);
      });
}

__device__ inline void zero_row(const DispatchParams& p, long long P, int lane) {
  if (p.recv_x) warp_zero(p.recv_x + P * p.row_bytes, p.row_bytes, lane);
  const int K = p.num_topk;
  for (int k = lane; k < K; k += 32) {
    if (p.recv_idx) p.recv_idx[P * K + k] = -1;
    if (p.recv_idx64) p.recv_idx64[P * K + k] = -1;
    if (p.recv_w) p.recv_w[P * K + k] = 0.f;
  }
  for (int i = lane; i < p.nsc; i += 32) p.recv_scales[P * p.nsc + i] = 0.f;
  if (lane == 0 && p.recv_src_token) p.recv_src_token[P] = -1;
}

struct Segment {            // rows [lo, hi) of one (src, dst) stream in window k
  long long lo, hi, start;  // start: slot of row lo in the window
  int base;                 // chunk-flag index of the first chunk
};

__host__ __device__ __forceinline__ Segment segment(long long qoff, long long kept, long long k,
                                                    long long R, int CR, int src) {
  Segment s;
  s.lo = max(k * R - qoff, 0ll);
  s.hi = min((k + 1) * R - qoff, kept);
  s.start = qoff + s.lo - k * R;
  s.base = static_cast<int>(s.start / CR) + src;
  return s;
}

// A receiver's placement of its sources' rows (protocol step 1): rows from source s land at
// P = poff[s] + j, kept[s] of them (the capacity drops rows from the end of the source order);
// returns the rows sent to it (total) and sets kept_total. cnt[s]: rows from source s.
__host__ __device__ inline long long place_sources(const int* cnt, int G, long long capacity,
                                                   int* poff, int* kept, int* kept_total) {
  long long before = 0;
  for (int s = 0; s < G; ++s) {
    const long long at = before < capacity ? before : capacity;
    poff[s] = static_cast<int>(at);
    const long long room = capacity - at;
    kept[s] = static_cast<int>(cnt[s] < room ? cnt[s] : room);
    before += cnt[s];
  }
  *kept_total = static_cast<int>(before < capacity ? before : capacity);
  return before;
}

// Q offset of source s's rows in receiver d's window: its P offset minus d's own rows (which go
// straight to recv_x, not through the window) when s > d.
__host__ __device__ inline int window_qoff(const int* poff, const int* kept, int s, int d) {
  return poff[s] - (s > d ? kept[d] : 0);
}

// Chunk rows of a receiver's window: about chunks_per_warp chunks per sender warp of the receiver
// (warps2 = chunks_per_warp x its sender warps), at most chunk_max, and few enough chunks for the
// flags of one window.
__host__ __device__ inline int window_chunk_rows(long long remote, long long warps2, int chunk_max,
                                                 long long window) {
  const long long per_warp = (remote + warps2 - 1) / warps2;
  long long cr = per_warp > 1 ? per_warp : 1;
  if (cr > chunk_max) cr = chunk_max;
  const long long used = remote < window ? remote : window;
  const long long flag_rows = (used + (kNumFlags - kMaxRanks) - 1) / (kNumFlags - kMaxRanks);
  if (cr < flag_rows) cr = flag_rows;
  return static_cast<int>(cr > 1 ? cr : 1);
}

// Where sender r's rows go at receiver d, from d's count column (col[s] = rows s -> d) and d's
// receive parameters (LayoutSlot), as d computes it for its ready message: Q offset, rows kept,
// d's chunk rows. Host-checked against the receiver's own computation
// (tests/cuda_host/layout_notify_check.cu).
struct SenderView {
  int qoff, kept, cr, poff;  // poff: P offset of r's rows at d (direct rows)
};
__host__ __device__ inline SenderView sender_view(const int* col, int G, int r, int d,
                                                  long long capacity, long long warps2,
                                                  int chunk_max, long long window) {
  int poff[kLayoutMaxRanks], kept[kLayoutMaxRanks], kept_total = 0;
  place_sources(col, G, capacity, poff, kept, &kept_total);
  SenderView v;
  v.qoff = window_qoff(poff, kept, r, d);
  v.poff = poff[r];
  v.kept = kept[r];
  v.cr = window_chunk_rows(kept_total - kept[d], warps2, chunk_max, window);
  return v;
}

struct Shared {
  int true_cnt[kMaxRanks], kept[kMaxRanks], poff[kMaxRanks], qoff[kMaxRanks];
  int dkept[kMaxRanks], dqoff[kMaxRanks], dcr[kMaxRanks], ntok[kMaxRanks];
  int cr_recv;  // chunk rows of this rank's window (chosen here, sent to the sources)
  // The layout notify (static, G <= kLayoutMaxRanks): every source's LayoutSlot (count rows and
  // receive parameters)
  int lay_count[kLayoutMaxRanks][kLayoutMaxRanks];
  int lay_warps2[kLayoutMaxRanks], lay_chunk[kLayoutMaxRanks];
  long long lay_capacity[kLayoutMaxRanks], lay_window[kLayoutMaxRanks];
  // Direct rows: where this rank's rows to destination d start in d's recv_x (row 0 of our
  // stream to d), or 0: into d's window. From d's layout notify or its ready message.
  unsigned long long drows[kMaxRanks];
  int sent[kMaxRanks];  // tokens routed to each rank (kFusedScan: from the tile counts)
  long long total;
  int kept_total, fail, last;
  unsigned long long seq;
  unsigned long long t0;  // globaltimer at kernel start (trace)
  // ns after t0 (trace): the send lists' grid barrier passed, every source's layout in
  unsigned long long t_marks[2];
};

// A receiver item: rows [a, a + rs) of the chunk whose rows start at jc (cr rows at most; the
// stream ends at row end): its first row j0 and its n rows (0: none). Host-callable for
// tests/cuda_host/recv_slices_check.cu.
struct RowSlice {
  long long j0;
  int n;
};
__host__ __device__ __forceinline__ RowSlice chunk_slice(long long jc, long long end, int cr,
                                                         int rs, int a) {
  const long long hi = jc + cr < end ? jc + cr : end;
  const long long j0 = jc + a;
  if (j0 >= hi) return RowSlice{j0, 0};
  return RowSlice{j0, static_cast<int>(hi - j0 < rs ? hi - j0 : rs)};
}

__host__ __device__ __forceinline__ long long chunks_of(const Segment& sg, int cr) {
  return sg.hi > sg.lo ? (sg.hi - sg.lo + cr - 1) / cr : 0;
}

}  // namespace fa2a::cuda::dispatch_impl
