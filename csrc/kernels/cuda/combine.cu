// Normal-mode combine on CUDA.
//
// Every rank rho holds rows y[P] for tokens of other ranks (its dispatch handle says which).
// It pushes the rows of source rank s, in order, into region rho of s's data region (bulk async
// copies, one flag per chunk of CR rows). Rank s reduces its own tokens: out[t] = sum over rho
// ascending of the row of t on rho (its own rows straight from y), fp32 from +0.0f, one rounding.
// Rounds are windows of W of s's tokens (W = rows per region), so every contribution to a token
// arrives in the same round and the sum order never depends on the chunking.
// Handshake: at the start each rank tells each peer "I am in this combine; I kept b of your
// rows" (the peer needs b to tell a dropped row from a missing one); later rounds re-release the
// same slot with a higher epoch once the rank has reduced the previous window.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <mutex>

#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

struct CombineParams {
  int rank, num_ranks, lpr, num_topk, num_experts, num_tokens;
  bool idx64, tma, owner_only;
  bool claim_items;  // senders claim items (FUSED_A2A_CUDA_COMBINE_CLAIM, default 1), else dealt
  size_t row_bytes;
  const uint8_t* y;
  const float* weights;
  const int* recv_src_counts;
  const int* recv_src_token;
  const int* group_max;
  const void* topk_idx;
  uint8_t* out;
  float* out_w;
  const int* cum;
  uint8_t* const* peers;
  HostError* host_error;
  unsigned long long timeout_ns;
  long long window;     // W: tokens per round = rows per region
  int chunk;            // largest chunk rows (the kernel picks CR per owner rank)
  int chunks_per_warp;  // CR ~ rows / (chunks_per_warp x sender warps), at most chunk
  int flags_per_region;
  int kw;  // weight words per row: K with weights, else 0
  int send_warps, recv_warps, stages;
  bool bulk_weights;  // the weights through the rings where aligned (combine_weights_bulk_env)
  uint32_t stage_bytes;
  bool flag_fence_sc;
  bool wait_acquire_first;  // LaunchConfig's
  int loads_ahead;          // TmaPipe A (FUSED_A2A_CUDA_LOADS_AHEAD; 0: stages - 2)
  bool reduce_prefetch;     // reducers prefetch their next token's rows to L2 (state.h)
  // fused_scan (kFusedScan kernels): route_mask_kernel ran the route scan's first pass and this
  // kernel runs the second (every cum[d][t]).
  ScanPass2 scan2;
  unsigned long long* trace;  // host-mapped phase times or null (state.h, the combine's slots)
};

struct Shared {
  int kept[kMaxRanks], off[kMaxRanks], kept_from[kMaxRanks], dcr[kMaxRanks];
  int cr_own;  // chunk rows of the regions in this rank's buffer (chosen here, sent to peers)
  long long nrounds;
  int fail, last;
  unsigned long long seq;
  unsigned long long t0;  // globaltimer at kernel start (trace)
  // ns after t0 (trace): the route scan's grid barrier passed, every peer's message in
  unsigned long long t_marks[2];
};

struct SmemLayout {
  size_t ready, srcs, pipes, per_warp, total;
};

__host__ __device__ inline SmemLayout smem_layout(int send_warps, int recv_warps, bool tma,
                                                  int stages, uint32_t stage_bytes) {
  SmemLayout l;
  l.ready = 0;
  l.srcs = align128(sizeof(int) * 3 * kMaxRanks * send_warps);  // ready round, jlo, jhi
  // Per receiver warp: kMaxRanks row pointers + kMaxRanks weight pointers.
  l.pipes = l.srcs + align128(sizeof(void*) * 2 * kMaxRanks * recv_warps);
  l.per_warp = tma ? align128(tma_pipe_bytes(stage_bytes, stages)) : 0;
  l.total = l.pipes + l.per_warp * send_warps;
  return l;
}

__device__ __forceinline__ int region_of(int rho, int owner) { return rho < owner ? rho : rho - 1; }

__device__ __forceinline__ int lower_bound(const int* a, int n, long long v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(a + mid) < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

__device__ void sender_role(const CombineParams& p, Shared& sh, uint8_t* smem, const SmemLayout& L,
                            const WaitCtx& ctx, int warp, int lane) {
  const int G = p.num_ranks, r = p.rank;
  const long long W = p.window;
  const int K = p.num_topk;
  const size_t rb = p.row_bytes;
  const int nsw = gridDim.x * p.send_warps;
  const int gw = blockIdx.x * p.send_warps + warp;
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  int* ready_round = reinterpret_cast<int*>(smem + L.ready) + warp * kMaxRanks;
  for (int d = lane; d < G; d += 32) ready_round[d] = 0;
  TmaPipe pipe;
  if (p.tma && lane == 0) {
    pipe.init(smem + L.pipes + L.per_warp * warp, p.stage_bytes, p.stages, p.flag_fence_sc,
              p.loads_ahead);
  }
  __syncwarp();
  int* jlo = reinterpret_cast<int*>(smem + L.ready) + (p.send_warps + warp) * kMaxRanks;
  int* jhi = reinterpret_cast<int*>(smem + L.ready) + (2 * p.send_warps + warp) * kMaxRanks;
  // A chunk's weights (the dispatch backward's) through the ring as one more piece where they
  // are 16-byte aligned spans (K % 4 == 0), so no lane stores them and waits for a system fence
  // before the flag (session 26: the dispatch backward at 24 SMs 581 us against the combine's
  // 532; 8-row chunks, so one fence round trip every 8 rows of a sender warp)
  const bool bulk_weights = p.tma && p.kw != 0 && p.bulk_weights && K % 4 == 0 &&
                            (reinterpret_cast<uintptr_t>(p.weights) & 15u) == 0;
  bool ok = true;
  WarpTrace tr;
  tr.stamp(8, sh.t0);
  const long long t_loop = WarpTrace::now();
  unsigned int* claim_counter = &local_state(p.peers[r])->items_claimed;
  auto claim = [&](long long after) {  // the next item number
    return traced_next_item(tr, p.claim_items, claim_counter, after, nsw, lane);
  };
  long long q = claim(gw - nsw);  // this warp's item
  long long round_base = 0;       // number of round k's first item
  for (long long k = 0; k < sh.nrounds && ok; ++k) {
    // Rows of each destination's tokens in its window k: [jlo, jhi) of that source's segment.
    for (int d = lane; d < G; d += 32) {
      const int* toks = p.recv_src_token + sh.off[d];
      jlo[d] = d == r ? 0 : lower_bound(toks, sh.kept[d], k * W);
      jhi[d] = d == r ? 0 : lower_bound(toks, sh.kept[d], (k + 1) * W);
    }
    __syncwarp();
    int maxc = 0;
    for (int d = 0; d < G; ++d) maxc = max(maxc, (jhi[d] - jlo[d] + sh.dcr[d] - 1) / sh.dcr[d]);
    // The round's items as a maxc x (G - 1) rectangle (destinations r + 1, r + 2, ... as
    // columns), dealt round-robin or claimed (default; FUSED_A2A_CUDA_COMBINE_CLAIM=0 deals them;
    // see next_item).
    const long long rect = static_cast<long long>(maxc) * (G - 1);
    if (!p.claim_items) q = round_base + gw;  // dealt: every round from the warp's own column
    for (; q - round_base < rect && ok; q = claim(q)) {
      const RectItem it = rect_item(q - round_base, maxc, G - 1, false);
      const int c = static_cast<int>(it.chunk);
      const int d = (r + 1 + it.col) % G;
      const int cr = sh.dcr[d];
      const int j0 = jlo[d] + c * cr;
      if (j0 >= jhi[d]) continue;
      if (k > ready_round[d]) {
        const long long t_wait = WarpTrace::now();
        if (p.tma && lane == 0) pipe.drain();
        MsgSlot* m = msg_slot(p.peers[r], kMsgCombine, parity, d);
        ok = warp_wait_flag(&m->epoch, epoch_of(seq, static_cast<int>(k)), ctx, kPhaseRound, d,
                            lane);
        if (!ok) break;
        if (lane == 0) ready_round[d] = static_cast<int>(k);
        __syncwarp();
        tr.add(0, t_wait);
      }
      const int reg = region_of(r, d);
      uint8_t* dbase = p.peers[d] + kControlBytes;
      uint8_t* ddata = dbase + static_cast<size_t>(reg) * W * rb;
      float* dw = reinterpret_cast<float*>(dbase + static_cast<size_t>(G - 1) * W * rb) +
                  static_cast<size_t>(reg) * W * p.kw;
      const int n = min(cr, jhi[d] - j0);
      const size_t row0 = static_cast<size_t>(sh.off[d]) + j0;
      const size_t slot0 = static_cast<size_t>(c) * cr;
      if (p.tma) {
        const long long t_push = WarpTrace::now();
        if (lane == 0) {
          pipe.push_span(ddata + slot0 * rb, p.y + row0 * rb, n * rb);
          if (bulk_weights) {
            pipe.push_span(dw + slot0 * K, p.weights + row0 * K, sizeof(float) * n * K);
          }
        }
        tr.add(3, t_push);
      } else {
        warp_copy_ro(ddata + slot0 * rb, p.y + row0 * rb, n * rb, lane);
      }
      if (p.kw && !bulk_weights) {
        for (int i = lane; i < n * K; i += 32) dw[slot0 * K + i] = __ldg(p.weights + row0 * K + i);
      }
      unsigned long long* flag = chunk_flag(p.peers[d], reg * p.flags_per_region + c);
      const unsigned long long v = epoch_of(seq, static_cast<int>(k));
      if (p.tma) {
        // the lanes' weight stores, before the flag
        if (p.kw && !bulk_weights) __threadfence_system();
        __syncwarp();
        const long long t_end = WarpTrace::now();
        if (lane == 0) pipe.end_chunk(flag, v);
        __syncwarp();
        tr.add(4, t_end);
        tr.count(7);
      } else {
        warp_release_flag(flag, v, lane);
      }
    }
    round_base += rect;
    __syncwarp();
  }
  tr.add(9, t_loop);
  const long long t_drain = WarpTrace::now();
  if (p.tma && lane == 0) pipe.drain();
  __syncwarp();
  tr.add(5, t_drain);
  tr.stamp(6, sh.t0);
  tr.marks(sh.t_marks);  // thread 0 wrote them before the roles' start
  tr.flush(p.trace, warp, lane);
}

template <typename T>
struct Vec;  // 16 bytes of T <-> fp32
template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ static void add(float* acc, int4 v) {
    acc[0] = acc[0] + __int_as_float(v.x);
    acc[1] = acc[1] + __int_as_float(v.y);
    acc[2] = acc[2] + __int_as_float(v.z);
    acc[3] = acc[3] + __int_as_float(v.w);
  }
  __device__ static int4 pack(const float* a) {
    return make_int4(__float_as_int(a[0]), __float_as_int(a[1]), __float_as_int(a[2]),
                     __float_as_int(a[3]));
  }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void add2(float* acc, int w) {
    acc[0] = acc[0] + __uint_as_float(static_cast<unsigned>(w) << 16);
    acc[1] = acc[1] + __uint_as_float(static_cast<unsigned>(w) & 0xffff0000u);
  }
  __device__ static void add(float* acc, int4 v) {
    add2(acc, v.x);
    add2(acc + 2, v.y);
    add2(acc + 4, v.z);
    add2(acc + 6, v.w);
  }
  __device__ static int pk(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<int*>(&h);
  }
  __device__ static int4 pack(const float* a) {
    return make_int4(pk(a[0], a[1]), pk(a[2], a[3]), pk(a[4], a[5]), pk(a[6], a[7]));
  }
};
template <>
struct Vec<__half> {
  static constexpr int kN = 8;
  __device__ static void add2(float* acc, int w) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    acc[0] = acc[0] + f.x;
    acc[1] = acc[1] + f.y;
  }
  __device__ static void add(float* acc, int4 v) {
    add2(acc, v.x);
    add2(acc + 2, v.y);
    add2(acc + 4, v.z);
    add2(acc + 6, v.w);
  }
  __device__ static int pk(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<int*>(&h);
  }
  __device__ static int4 pack(const float* a) {
    return make_int4(pk(a[0], a[1]), pk(a[2], a[3]), pk(a[4], a[5]), pk(a[6], a[7]));
  }
};

// out[t] = sum over the ns sources (ascending rank) of their rows, fp32, one rounding. The loads
// of up to kBatch sources are issued together (one latency per batch, not per source); the adds
// stay in ascending source order.
template <typename T>
__device__ __forceinline__ void reduce_row(uint8_t* out, const uint8_t* const* srcs, int ns,
                                           size_t row_bytes, int lane) {
  constexpr int U = 4;
  constexpr int kBatch = 4;
  constexpr int E = Vec<T>::kN;
  const int nvec = static_cast<int>(row_bytes / 16);
  int4* o = reinterpret_cast<int4*>(out);
  for (int v0 = lane; v0 < nvec; v0 += 32 * U) {
    float acc[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[u][e] = 0.0f;
    for (int i0 = 0; i0 < ns; i0 += kBatch) {
      int4 raw[kBatch][U];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (i0 + b >= ns) break;
        const int4* s = reinterpret_cast<const int4*>(srcs[i0 + b]);
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v0 + u * 32 < nvec) raw[b][u] = __ldcg(s + v0 + u * 32);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (i0 + b >= ns) break;
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v0 + u * 32 < nvec) Vec<T>::add(acc[u], raw[b][u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (v0 + u * 32 < nvec) o[v0 + u * 32] = Vec<T>::pack(acc[u]);
  }
}

template <typename T>
struct TypeTag {  // a kernel's element type, through a generic lambda (combine's launch_typed)
  using type = T;
};

// As reduce_row for ns <= kSrc sources, in one batch: every source's U vectors a lane loaded at
// once, then summed vector by vector, so no accumulators live across the loads and U can grow as
// the sources shrink (kSrc x U = 16 vectors a lane in flight at any kSrc). A lane's loop takes
// 16 / kSrc x 32 vectors a step: EP 2's tokens (one remote source and their own) need half the
// dependent load latencies of reduce_row's 4 x 32 (session 26: EP 2's combine slows with fewer
// SMs, 250 / 278 / 375 us at 48 / 24 / 12, while its dispatch holds at 210: the reducers bound
// it). The same adds in the same order, so the same bits.
template <typename T, int kSrc>
__device__ __forceinline__ void reduce_row_once(uint8_t* out, const uint8_t* const* srcs, int ns,
                                                size_t row_bytes, int lane) {
  constexpr int U = 16 / kSrc;
  constexpr int E = Vec<T>::kN;
  const int nvec = static_cast<int>(row_bytes / 16);
  const int4* src[kSrc];
#pragma unroll
  for (int b = 0; b < kSrc; ++b) src[b] = reinterpret_cast<const int4*>(srcs[b < ns ? b : 0]);
#pragma unroll 1
  for (int v0 = lane; v0 < nvec; v0 += 32 * U) {
    // (the vectors v0 + 32 u as constant offsets from one address a source)
    int4 raw[kSrc][U];
#pragma unroll
    for (int b = 0; b < kSrc; ++b) {
      const int4* sp = src[b] + v0;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (b < ns && v0 + u * 32 < nvec) raw[b][u] = __ldcg(sp + u * 32);
    }
    int4* op = reinterpret_cast<int4*>(out) + v0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float acc[E];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = 0.0f;
#pragma unroll
      for (int b = 0; b < kSrc; ++b)
        if (b < ns) Vec<T>::add(acc, raw[b][u]);
      if (v0 + u * 32 < nvec) op[u * 32] = Vec<T>::pack(acc);
    }
  }
}

// kMaxSrc: 2 where no token has more sources (EP 2): every row through reduce_row_once<T, 2>;
// 0: reduce_row. (A token-by-token choice between the two, in one kernel, doubled its spills.)
template <typename T, int kMaxSrc>
__device__ void reducer_role(const CombineParams& p, Shared& sh, uint8_t* smem, const SmemLayout& L,
                             const WaitCtx& ctx, int rwarp, int lane) {
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens, K = p.num_topk;
  const long long W = p.window;
  const int CR = sh.cr_own;
  const size_t rb = p.row_bytes;
  const int nrw = gridDim.x * p.recv_warps;
  const int gr = blockIdx.x * p.recv_warps + rwarp;
  const unsigned long long seq = sh.seq;
  uint8_t* ctrl = p.peers[r];
  uint8_t* data = ctrl + kControlBytes;
  const float* wbase = reinterpret_cast<const float*>(data + static_cast<size_t>(G - 1) * W * rb);
  const uint8_t** srcs =
      reinterpret_cast<const uint8_t**>(smem + L.srcs) + static_cast<size_t>(rwarp) * 2 * kMaxRanks;
  const float** wsrc = reinterpret_cast<const float**>(srcs + kMaxRanks);
  bool ok = true;
  WarpTrace tr;
  tr.stamp(8, sh.t0);
  const long long t_loop = WarpTrace::now();
  for (long long k = 0; k < sh.nrounds && ok; ++k) {
    const unsigned long long e = epoch_of(seq, static_cast<int>(k));
    const long long t0 = k * W, t1 = min((k + 1) * W, static_cast<long long>(N));
    int last0 = -1, last1 = -1;  // newest chunk known complete, sources lane and lane + 32
    for (long long t = t0 + gr; t < t1 && ok; t += nrw) {
      // Lane rho (and rho + 32) finds its source row, waiting for its chunk if remote.
      const long long t_wait = WarpTrace::now();
      int good = 1;
      unsigned valid_bits[2] = {0u, 0u};
      int next_j[2] = {0, 0}, next_end[2] = {0, 0}, next_base[2] = {0, 0};
      const uint8_t* my_src[2] = {nullptr, nullptr};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rho = lane + 32 * h;
        bool valid = false;
        const float* ws = nullptr;
        if (rho < G) {
          const int* c = p.cum + static_cast<size_t>(rho) * (N + 1);
          if (p.reduce_prefetch && t + nrw < t1) {  // loaded now, used after this token's waits
            next_j[h] = c[t + nrw];
            next_end[h] = c[t + nrw + 1];
            next_base[h] = c[t0];
          }
          const int j = c[t];
          valid = c[t + 1] > j && j < sh.kept_from[rho];
          if (valid && rho == r) {
            my_src[h] = p.y + (static_cast<size_t>(sh.off[r]) + j) * rb;
            ws = p.weights ? p.weights + (static_cast<size_t>(sh.off[r]) + j) * K : nullptr;
          } else if (valid) {
            const int slot = j - c[t0];
            const size_t row = static_cast<size_t>(region_of(rho, r)) * W + slot;
            my_src[h] = data + row * rb;
            ws = p.kw ? wbase + row * K : nullptr;
            const int chunk = slot / CR;
            int& last = h == 0 ? last0 : last1;
            if (chunk > last) {
              unsigned long long* f =
                  chunk_flag(ctrl, region_of(rho, r) * p.flags_per_region + chunk);
              if (wait_flag(f, e, ctx, kPhaseData, rho)) {
                last = chunk;
              } else {
                good = 0;
              }
            }
          }
          wsrc[rho] = ws;
        }
        valid_bits[h] = __ballot_sync(0xffffffffu, valid);
      }
      if (!__all_sync(0xffffffffu, good)) {
        ok = false;
        break;
      }
      tr.add(0, t_wait);
      // The next token's rows to L2 while this one is reduced, so that its reduce's steps after
      // the first hit L2: a step (16 vectors a lane) took ~2.4-2.6 us in runs 141 and 151, a
      // token 4 (EP 2) to 7 (EP 4) steps. A remote row not yet in is fetched again by its
      // writes (L2 is where the peers' writes land), so an early prefetch costs bytes, not bits.
      if (p.reduce_prefetch && t + nrw < t1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int rho = lane + 32 * h;
          if (rho < G && next_end[h] > next_j[h] && next_j[h] < sh.kept_from[rho]) {
            const size_t row =
                rho == r ? static_cast<size_t>(sh.off[r]) + next_j[h]
                         : static_cast<size_t>(region_of(rho, r)) * W + (next_j[h] - next_base[h]);
            bulk_prefetch_l2((rho == r ? p.y : data) + row * rb, static_cast<uint32_t>(rb));
          }
        }
      }
      if (FA2A_CUDA_TRACE) {  // slot 5: the latest token with a remote row
        const int own = static_cast<int>((valid_bits[r >> 5] >> (r & 31)) & 1u);
        if (__popc(valid_bits[0]) + __popc(valid_bits[1]) > own) tr.stamp(5, sh.t0);
      }
      // Compact the valid sources in ascending rank order.
      const unsigned below = (1u << lane) - 1u;
      const int nlo = __popc(valid_bits[0]);
      const int ns = nlo + __popc(valid_bits[1]);
      if ((valid_bits[0] >> lane) & 1u) srcs[__popc(valid_bits[0] & below)] = my_src[0];
      if ((valid_bits[1] >> lane) & 1u) srcs[nlo + __popc(valid_bits[1] & below)] = my_src[1];
      __syncwarp();
      if (p.out_w) {
        for (int kk = lane; kk < K; kk += 32) {
          float v = 0.0f;
          if (p.owner_only) {
            const long long ex = load_idx(p.topk_idx, p.idx64, t * K + kk);
            const int o = owner_of(ex, p.num_experts, p.lpr);
            const bool have = o >= 0 && ((valid_bits[o >> 5] >> (o & 31)) & 1u);
            if (have && wsrc[o]) v = __ldcg(wsrc[o] + kk);
          } else {
            for (int rho = 0; rho < G; ++rho) {
              const bool have = (valid_bits[rho >> 5] >> (rho & 31)) & 1u;
              if (have && wsrc[rho]) v = v + __ldcg(wsrc[rho] + kk);
            }
          }
          p.out_w[t * K + kk] = v;
        }
      }
      const long long t_reduce = WarpTrace::now();
      if constexpr (kMaxSrc == 2) {
        reduce_row_once<T, 2>(p.out + t * rb, srcs, ns, rb, lane);
      } else {
        reduce_row<T>(p.out + t * rb, srcs, ns, rb, lane);
      }
      __syncwarp();
      tr.add(1, t_reduce);
      tr.count(7);
    }
    if (ok && k + 1 < sh.nrounds) {
      const long long t_round = WarpTrace::now();
      ok = warp_next_round(ctx, ctrl, p.peers, G, r, kMsgCombine, seq, k, nrw, lane);
      tr.add(4, t_round);
    }
  }
  tr.add(9, t_loop);
  tr.stamp(6, sh.t0);
  tr.marks(sh.t_marks);
  tr.flush(p.trace, p.send_warps + rwarp, lane);
}

// kFusedScan: the route scan's second pass runs here (fused_scan, scan_pass2.cuh). kMaxSrc: as
// reducer_role's.
template <typename T, bool kFusedScan = false, int kMaxSrc = 0>
__global__ void __launch_bounds__(kMaxThreads, 1) combine_kernel(CombineParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ Shared sh;
  griddep_wait();  // FUSED_A2A_CUDA_PDL: the route scan before is complete
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint8_t* ctrl = p.peers[r];
  LocalState* ls = local_state(ctrl);
  const WaitCtx ctx{ls, p.host_error, p.timeout_ns, kOpCombine, r, p.wait_acquire_first};
  const SmemLayout L = smem_layout(p.send_warps, p.recv_warps, p.tma, p.stages, p.stage_bytes);
  if (tid == 0) {
    sh.t0 = globaltimer();
    sh.t_marks[0] = sh.t_marks[1] = 0;
    sh.seq = *reinterpret_cast<volatile unsigned long long*>(&ls->seq);
    sh.fail = aborted(ctx) ? 1 : 0;
    sh.last = 0;
    int before = 0;
    for (int s = 0; s < G; ++s) {
      sh.kept[s] = p.recv_src_counts[s];
      sh.off[s] = before;
      before += sh.kept[s];
    }
    const long long gmax =
        max(static_cast<long long>(p.group_max ? *p.group_max : N), static_cast<long long>(N));
    sh.nrounds = (gmax + p.window - 1) / p.window;
    // Chunk rows of our regions: about p.chunks_per_warp chunks per sender warp toward us, at most
    // p.chunk.
    const long long rows = static_cast<long long>(N) * max(G - 1, 1);
    const long long warps2 = 1ll * p.chunks_per_warp * gridDim.x * p.send_warps;
    long long cr = min(static_cast<long long>(p.chunk), max(1ll, (rows + warps2 - 1) / warps2));
    const long long used = min(static_cast<long long>(N), p.window);
    cr = max(cr, (used + p.flags_per_region - 1) / p.flags_per_region);
    sh.cr_own = static_cast<int>(max(cr, 1ll));
  }
  __syncthreads();
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  const unsigned long long e0 = epoch_of(seq, 0);
  if (!sh.fail) {
    if (blockIdx.x == handshake_block<kFusedScan>(p.scan2)) {
      for (int s = tid; s < G; s += blockDim.x) {
        if (s == r) continue;
        MsgSlot* m = msg_slot(p.peers[s], kMsgCombine, parity, r);
        m->a = sh.kept[s];
        m->b = sh.cr_own;
        __threadfence_system();
        st_release_sys(&m->epoch, e0);
      }
    }
    // cum, while the peers' messages travel (all blocks, then a grid-wide barrier); the first
    // pass too with FUSED_A2A_CUDA_SCAN_PASS1=fused (no pairs per expert here)
    if constexpr (kFusedScan) {
      if (scan_pass1(p.scan2, N, G, e0, ctx, nullptr)) {
        scan_pass2(p.scan2, N, G);
      } else {
        sh.fail = 1;
      }
      if (!scan_barrier(ls, ctx)) sh.fail = 1;
      if (tid == 0) WarpTrace::mark(&sh.t_marks[0], sh.t0);
    }
    for (int rho = tid; rho < G; rho += blockDim.x) {
      const int routed = p.cum[static_cast<size_t>(rho) * (N + 1) + N];
      if (rho == r) {
        sh.kept_from[rho] = min(sh.kept[r], routed);
        sh.dcr[rho] = sh.cr_own;
        continue;
      }
      MsgSlot* m = msg_slot(ctrl, kMsgCombine, parity, rho);
      if (!wait_flag(&m->epoch, e0, ctx, kPhaseReady, rho)) {
        sh.fail = 1;
        continue;
      }
      sh.kept_from[rho] = min(ld_volatile_int(&m->a), routed);
      sh.dcr[rho] = max(ld_volatile_int(&m->b), 1);
    }
    __syncthreads();
    if (tid == 0) WarpTrace::mark(&sh.t_marks[1], sh.t0);  // the roles read it at their end
    if (!sh.fail) {
      if (warp < p.send_warps) {
        sender_role(p, sh, smem, L, ctx, warp, lane);
      } else {
        reducer_role<T, kMaxSrc>(p, sh, smem, L, ctx, warp - p.send_warps, lane);
      }
    }
  }
  __syncthreads();
  __threadfence();
  if (tid == 0) sh.last = atomicAdd(&ls->blocks_done, 1u) == gridDim.x - 1 ? 1 : 0;
  __syncthreads();
  if (sh.last && tid == 0) {
    __threadfence();
    ls->round_done = 0;
    ls->blocks_done = 0;
    ls->items_claimed = 0;  // every warp of this op is past its last claim
    ls->scan_done = 0;
    __threadfence();
    *reinterpret_cast<volatile unsigned long long*>(&ls->seq) = seq + 1;
  }
}

}  // namespace

void combine(Buffer& buffer, const CombineArgs& a, Stream stream) {
  HostPhaseTimer timer;
  auto s = static_cast<cudaStream_t>(stream.handle);
  std::lock_guard<std::mutex> lock(buffer.op_mutex());
  DeviceGuard guard(buffer.device());
  const int G = buffer.num_ranks();
  FA2A_CHECK(G >= 1 && G <= kMaxRanks, "group size ", G, " is not supported (1..", kMaxRanks, ")");
  FA2A_CHECK(a.num_experts > 0 && a.num_experts % G == 0, "num_experts=", a.num_experts,
             " must be a positive multiple of the group size ", G);
  FA2A_CHECK_TYPE(a.y_dtype == DType::kF32 || a.y_dtype == DType::kF16 || a.y_dtype == DType::kBF16,
                  "combine: y must be f32, f16 or bf16, got ", dtype_name(a.y_dtype));
  CudaState& st = cuda_state(buffer);
  check_no_error(st, buffer);
  const size_t rb = static_cast<size_t>(a.hidden) * dtype_size(a.y_dtype);
  FA2A_CHECK(rb % 16 == 0, "hidden * element size = ", rb, " bytes must be a multiple of 16");
  check_aligned(a.y, "y");
  check_aligned(a.out, "out");
  const Scratch& scratch =
      ensure_scratch(st, G, std::max<int64_t>(a.num_tokens, 1), a.num_experts, s);
  // fused_scan: the kernel runs the scan's second pass (launch_fused_scan: maybe its first too)
  const bool fused = fused_scan(a.num_tokens);
  const bool idx64 = a.idx_dtype == DType::kI64;
  const int num_tokens = static_cast<int>(a.num_tokens);
  ScanPass2 scan2;
  if (fused) {
    scan2 = launch_fused_scan(a.topk_idx, idx64, num_tokens, a.num_topk, a.num_experts, G, scratch,
                              /*list=*/false, /*cum=*/true, /*pairs=*/false, s);
  } else {
    launch_route_scan(a.topk_idx, idx64, num_tokens, a.num_topk, a.num_experts, G, scratch, false,
                      s);
  }
  timer.mark(1);
  CombineParams p{};
  p.rank = buffer.rank();
  p.num_ranks = G;
  p.lpr = a.num_experts / G;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.num_tokens = static_cast<int>(a.num_tokens);
  p.idx64 = a.idx_dtype == DType::kI64;
  p.owner_only = a.weights_owner_only;
  p.row_bytes = rb;
  p.y = static_cast<const uint8_t*>(a.y);
  p.weights = a.weights;
  p.recv_src_counts = a.recv_src_counts;
  p.recv_src_token = a.recv_src_token;
  p.group_max = a.group_max_tokens;
  p.topk_idx = a.topk_idx;
  p.out = static_cast<uint8_t*>(a.out);
  p.out_w = a.weights ? a.out_weights : nullptr;
  p.cum = scratch.cum;
  p.peers = reinterpret_cast<uint8_t* const*>(buffer.peer_table());
  p.host_error = st.host_error;
  p.timeout_ns = timeout_ns();
  p.kw = a.weights ? a.num_topk : 0;
  const size_t slot_bytes = rb + 4 * static_cast<size_t>(p.kw);
  long long W = G > 1 ? static_cast<long long>(buffer.data_bytes() / ((G - 1) * slot_bytes))
                      : std::max<long long>(a.num_tokens, 1);
  FA2A_CHECK(W >= 1, "the communication buffer (", buffer.data_bytes(),
             " data bytes) cannot hold one row of ", slot_bytes,
             " bytes per peer: create a "
             "larger one");
  p.window = W;
  LaunchConfig cfg = launch_config(st, a.num_sms, rb, 0, 3 * sizeof(int) * kMaxRanks,
                                   2 * sizeof(void*) * kMaxRanks,
                                   combine_send_warps(G, comm_blocks(st, a.num_sms)));
  p.flags_per_region = kNumFlags / std::max(G - 1, 1);
  p.chunk = chunk_rows_env();  // the largest chunk (rows)
  p.chunks_per_warp = chunks_per_warp_env();
  p.claim_items = combine_claim_env();
  p.send_warps = cfg.send_warps;
  p.recv_warps = cfg.recv_warps;
  p.bulk_weights = combine_weights_bulk_env();
  p.tma = cfg.tma;
  p.stages = cfg.stages;
  p.stage_bytes = cfg.stage_bytes;
  p.flag_fence_sc = cfg.flag_fence_sc;
  p.wait_acquire_first = cfg.wait_acquire_first;
  p.loads_ahead = cfg.loads_ahead;
  p.reduce_prefetch = reduce_prefetch_env();
  p.scan2 = scan2;
  p.trace = st.trace;
  const SmemLayout L = smem_layout(p.send_warps, p.recv_warps, p.tma, p.stages, p.stage_bytes);
  FA2A_CHECK(L.total <= st.smem_optin, "combine needs ", L.total, " bytes of shared memory");
  auto launch = [&](auto kernel) {
    FA2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(L.total)),
                    "combine shared memory");
    launch_kernel(kernel, cfg.blocks, 32 * (p.send_warps + p.recv_warps), L.total, s,
                  pdl_env("combine", cfg.blocks), p);
  };
  // EP 2: a token has at most 2 sources, so its reducers load 8 vectors a source a step
  const bool two_sources = G == 2 && reduce_few_env();
  timer.mark(2);
  auto launch_typed = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    if (two_sources) {
      fused ? launch(combine_kernel<T, true, 2>) : launch(combine_kernel<T, false, 2>);
    } else {
      fused ? launch(combine_kernel<T, true>) : launch(combine_kernel<T>);
    }
  };
  switch (a.y_dtype) {
    case DType::kBF16:
      launch_typed(TypeTag<__nv_bfloat16>{});
      break;
    case DType::kF16:
      launch_typed(TypeTag<__half>{});
      break;
    default:
      launch_typed(TypeTag<float>{});
      break;
  }
  check_launch("combine");
  timer.done(st.host_phases[kHostCombine]);
}

}  // namespace fa2a::cuda
