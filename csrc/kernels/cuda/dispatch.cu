// Normal-mode dispatch on CUDA: the count exchange (dispatch_notify) and the data kernel that
// serves the static dispatch (count exchange in the kernel), dispatch_data and cached dispatch.
//
// Protocol (see benchmarks/NOTES.md for the reasoning and the numbers):
// - Receive order is fixed by the counts: rows from source s land at P = poff[s] + j on the
//   receiver (j = rank of the token among s's tokens routed there); rows past the capacity are
//   dropped from the end of that order.
// - A receiver's data region is a window of R row slots (+ R metadata records). Remote rows are
//   numbered Q = P minus this rank's own rows; window k holds Q in [kR, (k+1)R). Own rows go
//   straight to recv_x. Senders push rows (bulk async copies, shared -> peer global) into the
//   receiver's window and release one flag per chunk of CR rows; receiver warps copy each chunk
//   to recv_x as soon as its flag is up, so the local copy overlaps the transfer.
// - Handshakes, all in peer memory with system-scope release/acquire, every wait bounded:
//   notify (sender -> receiver: counts), ready (receiver -> sender: "I am in this op, your rows
//   go to Q offset a, keep b rows"; later rounds re-release the same slot with a higher epoch once
//   the receiver drained the window), chunk flags (sender -> receiver).
// - Epochs derive from a per-buffer op counter in device memory, bumped by the last block of each
//   op, so the kernels are CUDA-graph capturable. Payload slots alternate by the op parity.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

struct DispatchParams {
  int rank, num_ranks, lpr, num_topk, num_experts, num_tokens, op;
  bool static_mode, idx64, tma;
  size_t row_bytes;
  int nsc, meta_words, meta_real;  // meta record: words (multiple of 4), words in use
  bool dst_major;
  bool self_recv;  // own rows copied to recv_x by the receiver warps (default), not the senders
  const uint8_t* x;
  const float* x_scales;
  const void* topk_idx;
  const float* topk_w;
  long long capacity;
  uint8_t* recv_x;
  float* recv_scales;
  int* recv_idx;
  float* recv_w;
  int* recv_src_counts;
  int* recv_src_token;
  int* tokens_per_expert;
  int* num_recv;
  int* num_dropped;
  int* group_max;
  const int* cum;
  const int* send_list;
  int* hist;
  uint8_t* const* peers;
  HostError* host_error;
  unsigned long long timeout_ns;
  long long window;  // R
  int chunk;         // largest chunk rows (the kernel picks CR per receiver)
  int staging_rows;  // rows of a metadata staging buffer (>= any receiver's CR)
  int send_warps, recv_warps, stages;
  uint32_t stage_bytes;
  bool flag_fence_sc;
  unsigned long long* trace;  // host-mapped phase times or null (state.h, kTraceSlots)
  bool enum_items;            // FUSED_A2A_CUDA_ITEMS=enum: enumerate_items instead of the scan
  // FUSED_A2A_CUDA_META=prepass (enum instantiation only): the records, written by meta_kernel
  // before the dispatch kernel, [G][N][M] in send order; pushed as ring pieces.
  bool meta_prepass;
  const uint32_t* meta_records;
};

struct SmemLayout {
  size_t hist, ready, meta, meta_per_warp, pipes, per_warp, total;
};

__host__ __device__ inline size_t align128(size_t b) { return (b + 127) & ~size_t(127); }

__host__ __device__ inline SmemLayout smem_layout(int lpr, int send_warps, bool tma, int stages,
                                                  uint32_t stage_bytes, int chunk, int meta_words) {
  SmemLayout l;
  l.hist = 0;
  l.ready = align128(sizeof(int) * lpr);
  l.meta = l.ready + align128(sizeof(int) * kMaxRanks * send_warps);
  l.meta_per_warp = 2 * ((sizeof(int) * chunk * meta_words + 15) & ~size_t(15));
  l.pipes = l.meta + align128(l.meta_per_warp * send_warps);
  l.per_warp = tma ? align128(static_cast<size_t>(stages) * (stage_bytes + 20)) : 0;
  l.total = l.pipes + l.per_warp * send_warps;
  return l;
}

__device__ __forceinline__ int owner_of(long long e, int num_experts, int lpr) {
  return (e >= 0 && e < num_experts) ? static_cast<int>(e / lpr) : -1;
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
    const bool mine = owner_of(e, p.num_experts, p.lpr) == d;
    if (w <= K)
      return static_cast<uint32_t>(mine ? static_cast<int>(e - d * (long long)p.lpr) : -1);
    return __float_as_uint(mine ? wt : 0.f);
  }
  return __float_as_uint(__ldg(p.x_scales + static_cast<size_t>(t) * p.nsc + (w - 1 - 2 * K)));
}

// The metadata records of n rows (tokens list[0, n)) for rank d, into out[n * M] (shared
// memory). One coalesced load of the list per 32 rows; the loads of all words are independent,
// so the warp waits about one load latency per 32 words instead of two per row.
__device__ __forceinline__ void stage_chunk_meta(const DispatchParams& p, const int* list, int n,
                                                 int d, uint32_t* out, int lane) {
  const int M = p.meta_words;
  for (int b = 0; b < n; b += 32) {
    const int nb = min(32, n - b);
    const int token = lane < nb ? __ldg(list + b + lane) : 0;
    const int words = nb * M;
    for (int i0 = 0; i0 < words; i0 += 32) {
      const int i = i0 + lane;
      const int row = min(i / M, nb - 1);
      const int t = __shfl_sync(0xffffffffu, token, row);
      if (i < words) out[b * M + i] = meta_word(p, t, d, i - row * M);
    }
  }
}

// FUSED_A2A_CUDA_META=prepass: records[(d * N + j) * M + w] = word w of the record of send
// position j to rank d (its token send_list[d * N + j]), for every j below d's count.
__global__ void meta_kernel(DispatchParams p, uint32_t* records) {
  const int N = p.num_tokens, M = p.meta_words;
  const long long total = static_cast<long long>(p.num_ranks) * N * M;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long dj = i / M;
    const int w = static_cast<int>(i - dj * M);
    const int d = static_cast<int>(dj / N),
              j = static_cast<int>(dj - static_cast<long long>(d) * N);
    if (j >= __ldg(p.cum + static_cast<size_t>(d) * (N + 1) + N)) continue;
    records[i] = meta_word(p, __ldg(p.send_list + dj), d, w);
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
    const int j = static_cast<int>(v);
    if (j >= 0 && j < p.lpr) atomicAdd(&s_hist[j], 1);
  } else if (w <= 2 * K) {
    if (p.recv_w) p.recv_w[P * K + (w - 1 - K)] = __uint_as_float(v);
  } else {
    p.recv_scales[P * p.nsc + (w - 1 - 2 * K)] = __uint_as_float(v);
  }
}

__device__ inline void zero_row(const DispatchParams& p, long long P, int lane) {
  if (p.recv_x) warp_zero(p.recv_x + P * p.row_bytes, p.row_bytes, lane);
  const int K = p.num_topk;
  for (int k = lane; k < K; k += 32) {
    if (p.recv_idx) p.recv_idx[P * K + k] = -1;
    if (p.recv_w) p.recv_w[P * K + k] = 0.f;
  }
  for (int i = lane; i < p.nsc; i += 32) p.recv_scales[P * p.nsc + i] = 0.f;
  if (lane == 0 && p.recv_src_token) p.recv_src_token[P] = -1;
}

struct Segment {            // rows [lo, hi) of one (src, dst) stream in window k
  long long lo, hi, start;  // start: slot of row lo in the window
  int base;                 // chunk-flag index of the first chunk
};

__device__ __forceinline__ Segment segment(long long qoff, long long kept, long long k, long long R,
                                           int CR, int src) {
  Segment s;
  s.lo = max(k * R - qoff, 0ll);
  s.hi = min((k + 1) * R - qoff, kept);
  s.start = qoff + s.lo - k * R;
  s.base = static_cast<int>(s.start / CR) + src;
  return s;
}

struct Shared {
  int true_cnt[kMaxRanks], kept[kMaxRanks], poff[kMaxRanks], qoff[kMaxRanks];
  int dkept[kMaxRanks], dqoff[kMaxRanks], dcr[kMaxRanks], ntok[kMaxRanks];
  int cr_recv;  // chunk rows of this rank's window (chosen here, sent to the sources)
  long long total;
  int kept_total, fail, last;
  unsigned long long seq;
  unsigned long long t0;  // globaltimer at kernel start (trace)
};

// Phase times of one warp (lane 0 keeps them; written to the host-mapped trace once, at the end
// of the role). Durations in SM cycles, times since kernel start in ns. Compiled in only with
// -DFA2A_CUDA_TRACE=1 (CMAKE_ARGS), so that the kernels' registers are untouched otherwise.
#ifndef FA2A_CUDA_TRACE
#define FA2A_CUDA_TRACE 0
#endif
struct WarpTrace {
#if FA2A_CUDA_TRACE
  unsigned long long v[kTraceSlots] = {};
  __device__ static long long now() { return clock64(); }
  __device__ void add(int slot, long long since) { v[slot] += clock64() - since; }
  __device__ void set(int slot, unsigned long long value) { v[slot] = value; }
  __device__ void count(int slot) { v[slot] += 1; }
  __device__ void flush(const DispatchParams& p, int warp, int lane) {
    if (!p.trace || lane != 0) return;
    unsigned long long* out = p.trace + (static_cast<size_t>(blockIdx.x) * 16 + warp) * kTraceSlots;
    for (int i = 0; i < kTraceSlots; ++i) out[i] += v[i];
  }
#else
  __device__ static long long now() { return 0; }
  __device__ void add(int, long long) {}
  __device__ void set(int, unsigned long long) {}
  __device__ void count(int) {}
  __device__ void flush(const DispatchParams&, int, int) {}
#endif
};

__device__ __forceinline__ long long chunks_of(const Segment& sg, int cr) {
  return sg.hi > sg.lo ? (sg.hi - sg.lo + cr - 1) / cr : 0;
}

// FUSED_A2A_CUDA_ITEMS=enum: the items of a round in the scan's order (chunk-major with the peers
// rot, rot + 1, ... innermost, or peer-major), visiting only existing ones: chunk c of peer q
// exists when c < its count (lane q holds peer q's count in lo, lane q - 32 in hi). Every nw-th
// existing item is this warp's (me), counted across rounds in slot (= the scan's it % nw), so the
// assignment is the scan's, without its per-item segment arithmetic and 64-bit modulo, which
// every warp otherwise pays for every item of the round, its own or not.
template <typename F>
__device__ __forceinline__ void enumerate_items(int G, int rot, bool peer_major, long long maxc,
                                                int count_lo, int count_hi, int nw, int me,
                                                int& slot, const bool& ok, F&& body) {
  auto count_of = [&](int q) {
    const int lo = __shfl_sync(0xffffffffu, count_lo, q & 31);
    const int hi = __shfl_sync(0xffffffffu, count_hi, q & 31);
    return q < 32 ? lo : hi;
  };
  auto visit = [&](int q, long long c) {
    const bool mine = slot == me;
    if (++slot == nw) slot = 0;
    if (mine) body(q, c);
  };
  if (peer_major) {
    for (int i = 0; i < G && ok; ++i) {
      const int q = (rot + i) % G;
      const int n = count_of(q);
      for (long long c = 0; c < n && ok; ++c) visit(q, c);
    }
  } else {
    for (long long c = 0; c < maxc && ok; ++c) {
      for (int i = 0; i < G && ok; ++i) {
        const int q = (rot + i) % G;
        if (c < count_of(q)) visit(q, c);
      }
    }
  }
}

// Items are (round, chunk c, destination), dealt round-robin to the sender warps of the grid.
// Interleaved order (default): the destination innermost, so the warps write to every peer at
// once and chunk c of every source reaches a receiver at about the same time. Destination-major
// order (FUSED_A2A_CUDA_ORDER=dst): all of one peer's chunks, then the next peer's.
// Remote rows: bulk copies x -> peer window; their metadata records are staged in shared memory
// and bulk-copied too, so a chunk's flag is released once its bulk groups are complete.
template <bool kEnum>
__device__ void sender_role(const DispatchParams& p, Shared& sh, uint8_t* smem, const SmemLayout& L,
                            const WaitCtx& ctx, int warp, int lane, int* s_hist) {
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens;
  const long long R = p.window;
  const int nsw = gridDim.x * p.send_warps;
  const int gw = blockIdx.x * p.send_warps + warp;
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  int* ready_round = reinterpret_cast<int*>(smem + L.ready) + warp * kMaxRanks;
  uint32_t* staging = reinterpret_cast<uint32_t*>(smem + L.meta + L.meta_per_warp * warp);
  const size_t staging_words = L.meta_per_warp / 8;  // two buffers
  for (int d = lane; d < G; d += 32) ready_round[d] = 0;
  TmaPipe pipe;
  if (p.tma && lane == 0) {
    uint8_t* base = smem + L.pipes + L.per_warp * warp;
    const size_t data = static_cast<size_t>(p.stages) * p.stage_bytes;
    pipe.init(base, reinterpret_cast<uint64_t*>(base + data),
              reinterpret_cast<uint8_t**>(base + data + 8 * p.stages),
              reinterpret_cast<uint32_t*>(base + data + 16 * p.stages), p.stage_bytes, p.stages,
              p.flag_fence_sc);
  }
  __syncwarp();
  long long nrounds = 1;
  for (int d = 0; d < G; ++d)
    if (d != r && sh.dkept[d] > 0) nrounds = max(nrounds, (sh.dqoff[d] + sh.dkept[d] + R - 1) / R);
  const int M = p.meta_words;
  const size_t rb = p.row_bytes;
  const int self_cr = sh.cr_recv;
  long long it = 0;
  int slot = 0;  // FUSED_A2A_CUDA_ITEMS=enum: it % nsw, kept incrementally
  int chunks_done = 0;
  bool ok = true;
  WarpTrace tr;
  // One item: chunk c of destination d in round k (if it exists and is this warp's).
  // mine: the caller enumerated it as this warp's (FUSED_A2A_CUDA_ITEMS=enum), else the scan
  // decides here.
  auto item = [&](long long k, int d, long long c, bool mine) {
    if (d == r) {               // own rows: straight to recv_x, round 0 only
      if (p.self_recv) return;  // the receiver warps copy them
      const long long j0 = c * self_cr;
      if (k != 0 || j0 >= sh.dkept[r] || (!mine && it++ % nsw != gw)) return;
      const int n = static_cast<int>(min(static_cast<long long>(self_cr), sh.dkept[r] - j0));
      for (int i = 0; i < n; ++i) {
        const int t = __ldg(p.send_list + static_cast<size_t>(r) * N + j0 + i);
        const long long P = sh.poff[r] + j0 + i;
        if (p.tma) {
          if (lane == 0) pipe.push_span(p.recv_x + P * rb, p.x + t * rb, rb);
        } else {
          warp_copy_ro(p.recv_x + P * rb, p.x + t * rb, rb, lane);
        }
        for (int w = lane; w < M; w += 32) scatter_meta(p, P, w, meta_word(p, t, r, w), s_hist);
      }
      return;
    }
    const int cr = sh.dcr[d];
    const Segment sg = segment(sh.dqoff[d], sh.dkept[d], k, R, cr, r);
    const long long j0 = sg.lo + c * cr;
    if (j0 >= sg.hi || (!mine && it++ % nsw != gw)) return;
    if (k > ready_round[d]) {
      const long long t_wait = WarpTrace::now();
      if (p.tma && lane == 0) pipe.drain();  // never hold a flag while waiting
      MsgSlot* m = msg_slot(p.peers[r], kMsgDispatch, parity, d);
      ok = warp_wait_flag(&m->epoch, epoch_of(seq, static_cast<int>(k)), ctx, kPhaseRound, d, lane);
      if (!ok) return;
      if (lane == 0) ready_round[d] = static_cast<int>(k);
      __syncwarp();
      tr.add(0, t_wait);
    }
    const int n = static_cast<int>(min(static_cast<long long>(cr), sg.hi - j0));
    const long long slot0 = sg.start + c * cr;
    uint8_t* dbase = p.peers[d] + kControlBytes;
    uint32_t* dmeta = reinterpret_cast<uint32_t*>(dbase + R * rb) + slot0 * M;
    unsigned long long* flag = chunk_flag(p.peers[d], sg.base + static_cast<int>(c));
    const unsigned long long v = epoch_of(seq, static_cast<int>(k));
    bool prepass = false;
    if constexpr (kEnum) prepass = p.meta_prepass && p.tma;
    if (prepass) {
      // The chunk's tokens (one coalesced load) for lane 0; its records (meta_kernel) go as one
      // more ring piece, so the lanes compute nothing. No bulk store reads this staging buffer.
      uint32_t* tokens = staging + (chunks_done & 1) * staging_words;
      const int* list = p.send_list + static_cast<size_t>(d) * N + j0;
      for (int i = lane; i < n; i += 32) tokens[i] = static_cast<uint32_t>(__ldg(list + i));
      __syncwarp();
      if (lane == 0) {
        const uint32_t* records = p.meta_records + (static_cast<size_t>(d) * N + j0) * M;
        pipe.push_span(dmeta, records, static_cast<size_t>(n) * M * 4);
        for (int i = 0; i < n; ++i) {
          pipe.push_span(dbase + (slot0 + i) * rb, p.x + static_cast<size_t>(tokens[i]) * rb, rb);
        }
        pipe.end_chunk(flag, v);
        tr.count(7);
      }
      __syncwarp();
      ++chunks_done;
    } else if (p.tma) {
      // Metadata first (word 0 of each record is the token), stored as one group; then lane 0
      // issues the chunk's row copies back to back, with no global load between them.
      uint32_t* stage_meta = staging + (chunks_done & 1) * staging_words;
      long long t_phase = WarpTrace::now();
      if (lane == 0) bulk_wait_read<1>();  // this staging buffer's store (2 chunks ago) has read
      __syncwarp();
      tr.add(1, t_phase);
      t_phase = WarpTrace::now();
      stage_chunk_meta(p, p.send_list + static_cast<size_t>(d) * N + j0, n, d, stage_meta, lane);
      fence_proxy_async_smem();
      __syncwarp();
      tr.add(2, t_phase);
      if (lane == 0) {
        t_phase = WarpTrace::now();
        pipe.store_staged(dmeta, stage_meta, static_cast<uint32_t>(n * M * 4));
        for (int i = 0; i < n; ++i) {
          const size_t t = stage_meta[i * M];
          pipe.push_span(dbase + (slot0 + i) * rb, p.x + t * rb, rb);
        }
        tr.add(3, t_phase);
        t_phase = WarpTrace::now();
        pipe.end_chunk(flag, v);
        tr.add(4, t_phase);
        tr.count(7);
      }
      __syncwarp();
      ++chunks_done;
    } else {
      for (int i = 0; i < n; ++i) {
        const int t = __ldg(p.send_list + static_cast<size_t>(d) * N + j0 + i);
        warp_copy_ro(dbase + (slot0 + i) * rb, p.x + t * rb, rb, lane);
        for (int w = lane; w < M; w += 32) dmeta[i * M + w] = meta_word(p, t, d, w);
      }
      warp_release_flag(flag, v, lane);
    }
  };
  for (long long k = 0; k < nrounds && ok; ++k) {
    long long maxc = k == 0 ? (sh.dkept[r] + self_cr - 1) / self_cr : 0;
    for (int d = 0; d < G; ++d)
      if (d != r)
        maxc =
            max(maxc, chunks_of(segment(sh.dqoff[d], sh.dkept[d], k, R, sh.dcr[d], r), sh.dcr[d]));
    if constexpr (kEnum) {
      auto chunks = [&](int d) -> int {  // items of destination d in round k
        if (d >= G) return 0;
        if (d == r) return (p.self_recv || k != 0) ? 0 : (sh.dkept[r] + self_cr - 1) / self_cr;
        const Segment sg = segment(sh.dqoff[d], sh.dkept[d], k, R, sh.dcr[d], r);
        return static_cast<int>(chunks_of(sg, sh.dcr[d]));
      };
      enumerate_items(G, r + 1, p.dst_major, maxc, chunks(lane), chunks(lane + 32), nsw, gw, slot,
                      ok, [&](int d, long long c) { item(k, d, c, true); });
    } else if (p.dst_major) {
      for (int di = 0; di < G && ok; ++di)
        for (long long c = 0; c < maxc && ok; ++c) item(k, (r + 1 + di) % G, c, false);
    } else {
      for (long long c = 0; c < maxc && ok; ++c)
        for (int di = 0; di < G && ok; ++di) item(k, (r + 1 + di) % G, c, false);
    }
  }
  const long long t_drain = WarpTrace::now();
  if (p.tma && lane == 0) pipe.drain();
  __syncwarp();
  tr.add(5, t_drain);
  tr.set(6, globaltimer() - sh.t0);
  tr.flush(p, warp, lane);
}

// Own rows [j0, j0 + n) of this rank's send list -> recv_x rows [P0, P0 + n), metadata included.
// records: this chunk's metadata records from meta_kernel, or null (computed here).
__device__ __forceinline__ void copy_own_chunk(const DispatchParams& p, long long j0, long long P0,
                                               int n, int lane, int* s_hist,
                                               const uint32_t* records) {
  const size_t rb = p.row_bytes;
  const int M = p.meta_words;
  const int* list = p.send_list + static_cast<size_t>(p.rank) * p.num_tokens + j0;
  for (int b = 0; b < n; b += 32) {
    const int token = b + lane < n ? __ldg(list + b + lane) : 0;  // one coalesced load
    const int nb = min(32, n - b);
    for (int i = 0; i < nb; ++i) {
      const int t = __shfl_sync(0xffffffffu, token, i);
      warp_copy_ro(p.recv_x + (P0 + b + i) * rb, p.x + static_cast<size_t>(t) * rb, rb, lane);
    }
    if (records) {
      for (int i = lane; i < nb * M; i += 32) {
        const int row = i / M;
        scatter_meta(p, P0 + b + row, i - row * M, __ldg(records + static_cast<size_t>(b) * M + i),
                     s_hist);
      }
      continue;
    }
    // The metadata words of the nb rows, 32 at a time, every load independent.
    for (int i0 = 0; i0 < nb * M; i0 += 32) {
      const int i = i0 + lane;
      const int row = min(i / M, nb - 1);
      const int t = __shfl_sync(0xffffffffu, token, row);
      if (i < nb * M)
        scatter_meta(p, P0 + b + row, i - row * M, meta_word(p, t, p.rank, i - row * M), s_hist);
    }
  }
}

template <bool kEnum>
__device__ void receiver_role(const DispatchParams& p, Shared& sh, const WaitCtx& ctx, int rwarp,
                              int lane, int* s_hist) {
  const int G = p.num_ranks, r = p.rank;
  const long long R = p.window;
  const int CR = sh.cr_recv, M = p.meta_words;
  const size_t rb = p.row_bytes;
  const int nrw = gridDim.x * p.recv_warps;
  const int gr = blockIdx.x * p.recv_warps + rwarp;
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  uint8_t* ctrl = p.peers[r];
  WarpTrace tr;
  tr.set(5, globaltimer() - sh.t0);
  long long t_phase = WarpTrace::now();
  for (long long P = sh.kept_total + gr; P < p.capacity; P += nrw) zero_row(p, P, lane);
  tr.add(3, t_phase);
  const long long remote = sh.kept_total - sh.kept[r];
  // Own rows (p.self_recv): chunks of CR rows x -> recv_x, dealt with the remote chunks of round
  // 0 in the same order, so the local copy overlaps the transfer and the senders only push.
  const long long own = p.self_recv ? sh.dkept[r] : 0;
  const long long nrounds = max((remote + R - 1) / R, own > 0 ? 1ll : 0ll);
  long long it = 0;
  int slot = 0;  // FUSED_A2A_CUDA_ITEMS=enum: it % nrw, kept incrementally
  bool ok = true;
  for (long long k = 0; k < nrounds && ok; ++k) {
    const unsigned long long e = epoch_of(seq, static_cast<int>(k));
    long long maxc = k == 0 ? (own + CR - 1) / CR : 0;
    for (int s = 0; s < G; ++s)
      if (s != r) maxc = max(maxc, chunks_of(segment(sh.qoff[s], sh.kept[s], k, R, CR, s), CR));
    auto item = [&](int s, long long c, bool mine) {
      if (s == r) {
        const long long j0 = c * CR;
        if (k != 0 || j0 >= own || (!mine && it++ % nrw != gr)) return;
        const int n = static_cast<int>(min(static_cast<long long>(CR), own - j0));
        const long long t_own = WarpTrace::now();
        const uint32_t* records = nullptr;
        if constexpr (kEnum) {
          if (p.meta_prepass) {
            records = p.meta_records + (static_cast<size_t>(r) * p.num_tokens + j0) * M;
          }
        }
        copy_own_chunk(p, j0, sh.poff[r] + j0, n, lane, s_hist, records);
        tr.add(2, t_own);
        return;
      }
      const Segment sg = segment(sh.qoff[s], sh.kept[s], k, R, CR, s);
      const long long j0 = sg.lo + c * CR;
      if (j0 >= sg.hi || (!mine && it++ % nrw != gr)) return;
      const long long t_wait = WarpTrace::now();
      ok = warp_wait_flag(chunk_flag(ctrl, sg.base + static_cast<int>(c)), e, ctx, kPhaseData, s,
                          lane);
      tr.add(0, t_wait);
      if (!ok) return;
      const long long t_copy = WarpTrace::now();
      const int n = static_cast<int>(min(static_cast<long long>(CR), sg.hi - j0));
      const long long slot0 = sg.start + c * CR;
      const long long P = sh.poff[s] + j0;
      const uint8_t* src = ctrl + kControlBytes + slot0 * rb;
      warp_copy_cg(p.recv_x + P * rb, src, n * rb, lane);
      const uint32_t* ms =
          reinterpret_cast<const uint32_t*>(ctrl + kControlBytes + R * rb) + slot0 * M;
      for (int i = lane; i < n * M; i += 32) {
        const int row = i / M;
        scatter_meta(p, P + row, i - row * M, __ldcg(ms + i), s_hist);
      }
      tr.add(1, t_copy);
      tr.count(7);
    };
    if constexpr (kEnum) {
      auto chunks = [&](int s) -> int {  // items of source s in round k
        if (s >= G) return 0;
        if (s == r) return k != 0 ? 0 : static_cast<int>((own + CR - 1) / CR);
        return static_cast<int>(chunks_of(segment(sh.qoff[s], sh.kept[s], k, R, CR, s), CR));
      };
      enumerate_items(G, 0, p.dst_major, maxc, chunks(lane), chunks(lane + 32), nrw, gr, slot, ok,
                      [&](int s, long long c) { item(s, c, true); });
    } else if (p.dst_major) {
      for (int s = 0; s < G && ok; ++s)
        for (long long c = 0; c < maxc && ok; ++c) item(s, c, false);
    } else {
      for (long long c = 0; c < maxc && ok; ++c)
        for (int s = 0; s < G && ok; ++s) item(s, c, false);
    }
    if (ok && k + 1 < nrounds) {
      __syncwarp();
      int good = 1;
      const long long t_round = WarpTrace::now();
      if (lane == 0) {
        good = round_barrier(
                   &local_state(ctrl)->round_done, static_cast<unsigned int>((k + 1) * nrw), ctx,
                   [&] {
                     __threadfence_system();
                     for (int s = 0; s < G; ++s)
                       if (s != r)
                         st_release_sys(&msg_slot(p.peers[s], kMsgDispatch, parity, r)->epoch,
                                        epoch_of(seq, static_cast<int>(k + 1)));
                   })
                   ? 1
                   : 0;
      }
      ok = __shfl_sync(0xffffffffu, good, 0) != 0;
      tr.add(4, t_round);
    }
  }
  tr.set(6, globaltimer() - sh.t0);
  tr.flush(p, p.send_warps + rwarp, lane);
}

// kEnum: FUSED_A2A_CUDA_ITEMS=enum (enumerate_items); a separate instantiation, so that the
// default kernel's registers are untouched.
template <bool kEnum>
__global__ void __launch_bounds__(kMaxThreads, 1) dispatch_kernel(DispatchParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ Shared sh;
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint8_t* ctrl = p.peers[r];
  LocalState* ls = local_state(ctrl);
  const WaitCtx ctx{ls, p.host_error, p.timeout_ns, p.op, r};
  const SmemLayout L = smem_layout(p.lpr, p.send_warps, p.tma, p.stages, p.stage_bytes,
                                   p.staging_rows, p.meta_words);
  int* s_hist = reinterpret_cast<int*>(smem + L.hist);
  for (int j = tid; j < p.lpr; j += blockDim.x) s_hist[j] = 0;
  if (tid == 0) {
    sh.t0 = globaltimer();
    sh.seq = *reinterpret_cast<volatile unsigned long long*>(&ls->seq);
    sh.fail = aborted(ctx) ? 1 : 0;
    sh.last = 0;
  }
  __syncthreads();
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  const unsigned long long e0 = epoch_of(seq, 0);
  if (!sh.fail) {
    // 1. True counts per source: exchanged here (static) or from the notify / the handle.
    if (p.static_mode) {
      if (blockIdx.x == 0) {
        for (int d = tid; d < G; d += blockDim.x) {
          NotifySlot* slot = notify_slot(p.peers[d], parity, r);
          slot->count = p.cum[static_cast<size_t>(d) * (N + 1) + N];
          slot->n_tokens = N;
          __threadfence_system();
          st_release_sys(&slot->flag, e0);
        }
      }
      for (int s = tid; s < G; s += blockDim.x) {
        NotifySlot* slot = notify_slot(ctrl, parity, s);
        if (!wait_flag(&slot->flag, e0, ctx, kPhaseNotify, s)) sh.fail = 1;
        sh.true_cnt[s] = ld_volatile_int(&slot->count);
        sh.ntok[s] = ld_volatile_int(&slot->n_tokens);
      }
    } else {
      for (int s = tid; s < G; s += blockDim.x) sh.true_cnt[s] = p.recv_src_counts[s];
    }
    __syncthreads();
    if (tid == 0) {
      long long before = 0;
      for (int s = 0; s < G; ++s) {
        const long long poff = min(before, p.capacity);
        sh.poff[s] = static_cast<int>(poff);
        sh.kept[s] =
            static_cast<int>(min(static_cast<long long>(sh.true_cnt[s]), p.capacity - poff));
        before += sh.true_cnt[s];
      }
      sh.total = before;
      sh.kept_total = static_cast<int>(min(before, p.capacity));
      for (int s = 0; s < G; ++s) sh.qoff[s] = sh.poff[s] - (s > r ? sh.kept[r] : 0);
      // Chunk rows: about two chunks per sender warp, at most p.chunk, and few enough chunks
      // for the flags of one window.
      const long long remote = sh.kept_total - sh.kept[r];
      const long long warps2 = 2ll * gridDim.x * p.send_warps;
      long long cr = min(static_cast<long long>(p.chunk), max(1ll, (remote + warps2 - 1) / warps2));
      const long long used = min(remote, p.window);
      cr = max(cr, (used + (kNumFlags - kMaxRanks) - 1) / (kNumFlags - kMaxRanks));
      sh.cr_recv = static_cast<int>(max(cr, 1ll));
    }
    __syncthreads();
    // 2. Ready: tell every source where its rows go; learn where ours go.
    if (!sh.fail) {
      if (blockIdx.x == 0) {
        for (int s = tid; s < G; s += blockDim.x) {
          if (s == r) continue;
          MsgSlot* m = msg_slot(p.peers[s], kMsgDispatch, parity, r);
          m->a = sh.qoff[s];
          m->b = sh.kept[s];
          m->c = sh.cr_recv;
          __threadfence_system();
          st_release_sys(&m->epoch, e0);
        }
      }
      for (int d = tid; d < G; d += blockDim.x) {
        const int sent = p.cum[static_cast<size_t>(d) * (N + 1) + N];
        if (d == r) {
          sh.dqoff[d] = sh.poff[r];
          sh.dkept[d] = min(sh.kept[r], sent);
          sh.dcr[d] = sh.cr_recv;
          continue;
        }
        MsgSlot* m = msg_slot(ctrl, kMsgDispatch, parity, d);
        if (!wait_flag(&m->epoch, e0, ctx, kPhaseReady, d)) {
          sh.fail = 1;
          continue;
        }
        sh.dqoff[d] = ld_volatile_int(&m->a);
        sh.dkept[d] = min(ld_volatile_int(&m->b), sent);
        sh.dcr[d] = max(ld_volatile_int(&m->c), 1);
      }
    }
    __syncthreads();
    // 3. Move the rows.
    if (!sh.fail) {
      if (warp < p.send_warps) {
        sender_role<kEnum>(p, sh, smem, L, ctx, warp, lane, s_hist);
      } else {
        receiver_role<kEnum>(p, sh, ctx, warp - p.send_warps, lane, s_hist);
      }
    }
  }
  // 4. Epilogue: the last block publishes the handle and bumps the op counter.
  __syncthreads();
  for (int j = tid; j < p.lpr; j += blockDim.x)
    if (s_hist[j]) atomicAdd(&p.hist[j], s_hist[j]);
  __threadfence();
  __syncthreads();
  if (tid == 0) sh.last = atomicAdd(&ls->blocks_done, 1u) == gridDim.x - 1 ? 1 : 0;
  __syncthreads();
  if (!sh.last) return;
  __threadfence();
  const bool good = !sh.fail && !aborted(ctx);
  for (int j = tid; j < p.lpr; j += blockDim.x) {
    const int v = atomicExch(&p.hist[j], 0);
    if (good && p.tokens_per_expert) p.tokens_per_expert[j] = v;
  }
  if (good) {
    if (p.recv_src_counts)
      for (int s = tid; s < G; s += blockDim.x) p.recv_src_counts[s] = sh.kept[s];
    if (tid == 0) {
      if (p.num_recv) *p.num_recv = sh.kept_total;  // as the CPU backend: the kept rows
      if (p.num_dropped) *p.num_dropped = static_cast<int>(sh.total - sh.kept_total);
      if (p.static_mode && p.group_max) {
        int m = 0;
        for (int s = 0; s < G; ++s) m = max(m, sh.ntok[s]);
        *p.group_max = m;
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    ls->round_done = 0;
    ls->blocks_done = 0;
    __threadfence();
    *reinterpret_cast<volatile unsigned long long*>(&ls->seq) = seq + 1;
  }
}

struct Prepared {
  CudaState* st;
  const Scratch* scratch;
  int lpr, nsc;
  size_t row_bytes;
};

Prepared prepare(Buffer& buffer, const DispatchArgs& a, cudaStream_t stream, bool want_list) {
  const int G = buffer.num_ranks();
  FA2A_CHECK(G >= 1 && G <= kMaxRanks, "group size ", G, " is not supported (1..", kMaxRanks, ")");
  FA2A_CHECK(a.num_experts > 0 && a.num_experts % G == 0, "num_experts=", a.num_experts,
             " must be a positive multiple of the group size ", G);
  FA2A_CHECK(a.num_tokens >= 0 && a.num_tokens < (1ll << 30), "num_tokens=", a.num_tokens,
             " out of range");
  Prepared pr;
  pr.st = &cuda_state(buffer);
  check_no_error(*pr.st, buffer);
  pr.lpr = a.num_experts / G;
  const bool fp8 = a.x_scales != nullptr;
  pr.nsc = fp8 ? static_cast<int>(a.hidden / kFp8BlockSize) : 0;
  pr.row_bytes = static_cast<size_t>(a.hidden) * (fp8 ? 1 : dtype_size(a.x_dtype));
  FA2A_CHECK(pr.row_bytes % 16 == 0, "hidden * element size = ", pr.row_bytes,
             " bytes must be a multiple of 16");
  check_aligned(a.x, "x");
  check_aligned(a.recv_x, "recv_x");
  pr.scratch =
      &ensure_scratch(*pr.st, G, std::max<int64_t>(a.num_tokens, 1), a.num_experts, stream);
  launch_route_scan(a.topk_idx, a.idx_dtype == DType::kI64, static_cast<int>(a.num_tokens),
                    a.num_topk, a.num_experts, G, *pr.scratch, want_list, stream);
  return pr;
}

void run_dispatch(Buffer& buffer, const DispatchArgs& a, Stream stream, int op, bool static_mode) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  std::lock_guard<std::mutex> lock(buffer.op_mutex());
  DeviceGuard guard(buffer.device());
  const Prepared pr = prepare(buffer, a, s, true);
  const int G = buffer.num_ranks();
  DispatchParams p{};
  p.rank = buffer.rank();
  p.num_ranks = G;
  p.lpr = pr.lpr;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.num_tokens = static_cast<int>(a.num_tokens);
  p.op = op;
  p.static_mode = static_mode;
  p.idx64 = a.idx_dtype == DType::kI64;
  p.row_bytes = pr.row_bytes;
  p.nsc = pr.nsc;
  p.meta_real = 1 + 2 * a.num_topk + pr.nsc;
  p.meta_words = (p.meta_real + 3) & ~3;
  p.x = static_cast<const uint8_t*>(a.x);
  p.x_scales = a.x_scales;
  p.topk_idx = a.topk_idx;
  p.topk_w = a.topk_weights;
  p.capacity = a.capacity;
  p.recv_x = static_cast<uint8_t*>(a.recv_x);
  p.recv_scales = a.recv_x_scales;
  p.recv_idx = a.recv_topk_idx;
  p.recv_w = a.recv_topk_weights;
  p.recv_src_counts = a.recv_src_counts;
  p.recv_src_token = a.recv_src_token;
  p.tokens_per_expert = a.tokens_per_expert;
  p.num_recv = a.num_recv;
  p.num_dropped = a.num_dropped;
  p.group_max = a.group_max_tokens;
  p.cum = pr.scratch->cum;
  p.send_list = pr.scratch->send_list;
  p.hist = pr.scratch->hist;
  p.peers = reinterpret_cast<uint8_t* const*>(buffer.peer_table());
  p.host_error = pr.st->host_error;
  p.timeout_ns = timeout_ns();
  const size_t slot_bytes = pr.row_bytes + 4 * static_cast<size_t>(p.meta_words);
  const long long R = static_cast<long long>(buffer.data_bytes() / slot_bytes);
  FA2A_CHECK(G == 1 || R >= 1, "the communication buffer (", buffer.data_bytes(),
             " data bytes) cannot hold one row of ", slot_bytes, " bytes: create a larger one");
  p.window = std::max(R, 1ll);
  const int max_chunk = std::max(1, std::min(64, chunk_rows_env()));
  const long long flag_rows = (p.window + kNumFlags - kMaxRanks - 1) / (kNumFlags - kMaxRanks);
  p.staging_rows = static_cast<int>(std::max<long long>(max_chunk, flag_rows));
  LaunchConfig cfg =
      launch_config(*pr.st, a.num_sms, pr.row_bytes, sizeof(int) * pr.lpr,
                    sizeof(int) * kMaxRanks + 2 * (4 * p.staging_rows * p.meta_words + 16), 0);
  p.chunk = max_chunk;  // the largest chunk (rows)
  p.dst_major = order_dst_major();
  {
    const char* v = std::getenv("FUSED_A2A_CUDA_SELF");  // "send": senders copy own rows (old)
    p.self_recv = !(v && std::strcmp(v, "send") == 0);
  }
  p.send_warps = cfg.send_warps;
  p.recv_warps = cfg.recv_warps;
  p.tma = cfg.tma;
  p.stages = cfg.stages;
  p.stage_bytes = cfg.stage_bytes;
  p.flag_fence_sc = cfg.flag_fence_sc;
  p.trace = pr.st->trace;
  {
    const char* v = std::getenv("FUSED_A2A_CUDA_ITEMS");
    p.enum_items = v && std::strcmp(v, "enum") == 0;
  }
  const SmemLayout L = smem_layout(p.lpr, p.send_warps, p.tma, p.stages, p.stage_bytes,
                                   p.staging_rows, p.meta_words);
  FA2A_CHECK(L.total <= pr.st->smem_optin, "dispatch needs ", L.total,
             " bytes of shared memory (local experts ", p.lpr, "), the device has ",
             pr.st->smem_optin);
  {
    const char* v = std::getenv("FUSED_A2A_CUDA_META");
    p.meta_prepass = p.enum_items && p.tma && v && std::strcmp(v, "prepass") == 0;
  }
  if (p.meta_prepass) {
    const size_t bytes = static_cast<size_t>(G) * std::max(p.num_tokens, 1) * p.meta_words * 4;
    uint32_t* records = ensure_meta_records(*pr.st, bytes, s);
    p.meta_records = records;
    if (p.num_tokens > 0) {
      const long long words = static_cast<long long>(G) * p.num_tokens * p.meta_words;
      const int blocks = static_cast<int>(std::min<long long>((words + 255) / 256, 2048));
      meta_kernel<<<blocks, 256, 0, s>>>(p, records);
      check_launch("dispatch metadata records");
    }
  }
  auto* kernel = p.enum_items ? dispatch_kernel<true> : dispatch_kernel<false>;
  FA2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(L.total)),
                  "dispatch shared memory");
  kernel<<<cfg.blocks, 32 * (p.send_warps + p.recv_warps), L.total, s>>>(p);
  check_launch("dispatch");
}

}  // namespace

void dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  run_dispatch(buffer, args, stream, kOpDispatch, true);
}

void dispatch_data(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  run_dispatch(buffer, args, stream, kOpDispatchData, false);
}

}  // namespace fa2a::cuda
