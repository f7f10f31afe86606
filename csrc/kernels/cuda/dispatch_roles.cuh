// Normal-mode dispatch on CUDA: the sender and receiver warp roles of the data kernel (included
// by dispatch.cu only). Protocol: dispatch.cu.
#pragma once

#include "dispatch_common.cuh"

namespace fa2a::cuda::dispatch_impl {

// The metadata of own rows j0 + [0, n) of this rank's send list (list = send_list + r * N + j0)
// straight into the outputs of recv_x rows [P0, P0 + n): from the precomputed records when there
// are (coalesced loads, batched as the receivers' window records), else computed here.
__device__ __forceinline__ void own_chunk_meta(const DispatchParams& p, const int* list,
                                               long long j0, long long P0, int n, int lane,
                                               int* s_hist) {
  if (p.records) {
    const int M = p.meta_words;
    const uint32_t* rec = p.records + (static_cast<size_t>(p.rank) * p.num_tokens + j0) * M;
    scatter_records(p, M, n, P0, lane, s_hist, [&](int i) { return __ldg(rec + i); });
    return;
  }
  for (int b = 0; b < n; b += 32) {
    const int token = b + lane < n ? __ldg(list + b + lane) : 0;  // one coalesced load
    meta_words(p, token, min(32, n - b), p.rank, lane,
               [&](int row, int w, uint32_t v) { scatter_meta(p, P0 + b + row, w, v, s_hist); });
  }
}

// Own rows [j0, j0 + n) of this rank's send list -> recv_x rows [P0, P0 + n), metadata included,
// by the warp's lanes (no bulk copies).
__device__ __forceinline__ void copy_own_chunk(const DispatchParams& p, long long j0, long long P0,
                                               int n, int lane, int* s_hist) {
  const size_t rb = p.row_bytes;
  const int* list = p.send_list + static_cast<size_t>(p.rank) * p.num_tokens + j0;
  for (int b = 0; b < n; b += 32) {
    const int token = b + lane < n ? __ldg(list + b + lane) : 0;  // one coalesced load
    for (int i = 0; i < min(32, n - b); ++i) {
      const int t = __shfl_sync(0xffffffffu, token, i);
      warp_copy_ro(p.recv_x + (P0 + b + i) * rb, p.x + static_cast<size_t>(t) * rb, rb, lane);
    }
  }
  own_chunk_meta(p, list, j0, P0, n, lane, s_hist);
}

template <int kCopyUnroll, int kRecvItems>
__device__ void receiver_role(const DispatchParams& p, Shared& sh, const WaitCtx& ctx, int rwarp,
                              int lane, int* s_hist, TmaPipe* pipe = nullptr);

// Items are (round, chunk c, destination), dealt round-robin to the sender warps of the grid.
// Interleaved order (default): the destination innermost, so the warps write to every peer at
// once and chunk c of every source reaches a receiver at about the same time. Destination-major
// order (FUSED_A2A_CUDA_ORDER=dst): all of one peer's chunks, then the next peer's.
// Remote rows: bulk copies x -> peer window; their metadata records are staged in shared memory
// and bulk-copied too, so a chunk's flag is released once its bulk groups are complete.
// kLeanEnd: TmaPipe::end_chunk<true> (FUSED_A2A_CUDA_CHUNK_END=lean).
// kRecvItems == kRecvHelp: once its items are sent, the warp claims receiver items (receiver_role
// with rwarp -1) and copies their rows window -> recv_x through its own bulk-copy ring.
// bulk == false (kRecvPush): a receiver warp (warp: its index in the block) pushing with plain
// stores beside the senders, claiming the same items but the round's last ones, in a one-round
// op only (it never waits for a round's ready message, so it holds up no peer's round barrier);
// no ring, no trace.
template <bool kLeanEnd, int kCopyUnroll = 8, int kRecvItems = kRecvDealt, bool kHeadVec = false>
__device__ void sender_role(const DispatchParams& p, Shared& sh, uint8_t* smem, const SmemLayout& L,
                            const WaitCtx& ctx, int warp, int lane, int* s_hist, bool bulk = true) {
  const bool tma = p.tma && bulk;  // this warp's rows through its bulk-copy ring
  WarpTrace tr;
  tr.stamp(8, sh.t0);
  tr.marks(sh.t_marks);
  const long long t_loop = WarpTrace::now();
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens;
  const long long R = p.window;
  const int nsw = gridDim.x * p.send_warps;
  const int gw = blockIdx.x * p.send_warps + warp;
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  // a later round's ready messages seen (senders only: a pushing receiver has one round)
  int* ready_round = bulk ? reinterpret_cast<int*>(smem + L.ready) + warp * kMaxRanks : nullptr;
  uint32_t* staging = reinterpret_cast<uint32_t*>(smem + L.meta + L.meta_per_warp * warp);
  const size_t staging_words = L.meta_per_warp / 8;  // two buffers
  if (bulk)
    for (int d = lane; d < G; d += 32) ready_round[d] = 0;
  TmaPipe pipe;
  if (tma && lane == 0) {
    pipe.init(smem + L.pipes + L.per_warp * warp, p.stage_bytes, p.stages, p.flag_fence_sc,
              p.loads_ahead);
  }
  __syncwarp();
  long long nrounds = 1;
  for (int d = 0; d < G; ++d)
    if (d != r && sh.dkept[d] > 0) nrounds = max(nrounds, (sh.dqoff[d] + sh.dkept[d] + R - 1) / R);
  if (!bulk && nrounds != 1) return;  // the same in every block: the senders take every item
  const int M = p.meta_words;
  const size_t rb = p.row_bytes;
  const int self_cr = sh.cr_recv;
  int chunks_done = 0;
  bool ok = true;
  // One item of this warp: chunk c of destination d in round k (if it exists).
  auto item = [&](long long k, int d, long long c) {
    if (d == r) {  // own rows (the chunks the senders copy): straight to recv_x, round 0
      if (k != 0 || !own_chunk_by_senders(p.own_rows, c)) return;
      const RowSlice own = chunk_slice(c * self_cr, sh.dkept[r], self_cr, self_cr, 0);
      if (own.n == 0) return;
      const long long j0 = own.j0, P0 = sh.poff[r] + j0;
      const int n = own.n;
      if (!tma) {
        copy_own_chunk(p, j0, P0, n, lane, s_hist);
        return;
      }
      // As a remote chunk: the records in batches (one load latency per batch, not two a row:
      // run 39's untraced ~340K cycles a sender warp were these rows), then lane 0 pushes the
      // rows back to back.
      const int* list = p.send_list + static_cast<size_t>(r) * N + j0;
      long long t_phase = WarpTrace::now();
      own_chunk_meta(p, list, j0, P0, n, lane, s_hist);
      tr.add(2, t_phase);
      if (lane == 0) {
        t_phase = WarpTrace::now();
        for (int i = 0; i < n; ++i) {
          const size_t t = __ldg(list + i);  // an L1 hit: own_chunk_meta loaded the list
          pipe.push_span(p.recv_x + (P0 + i) * rb, p.x + t * rb, rb);
        }
        tr.add(3, t_phase);
      }
      __syncwarp();
      return;
    }
    const int cr = sh.dcr[d];
    const Segment sg = segment(sh.dqoff[d], sh.dkept[d], k, R, cr, r);
    const long long j0 = sg.lo + c * cr;
    if (j0 >= sg.hi) return;
    if (k > 0 && k > ready_round[d]) {  // (k is 0 for a pushing receiver)
      const long long t_wait = WarpTrace::now();
      if (tma && lane == 0) pipe.drain();  // never hold a flag while waiting
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
    // The chunk's rows: straight into d's recv_x (direct rows), else into its window
    uint8_t* drows =
        sh.drows[d] ? reinterpret_cast<uint8_t*>(sh.drows[d]) + j0 * rb : dbase + slot0 * rb;
    unsigned long long* flag = chunk_flag(p.peers[d], sg.base + static_cast<int>(c));
    const unsigned long long v = epoch_of(seq, static_cast<int>(k));
    if (tma) {
      // The chunk's records first, as one bulk group: precomputed (p.records: one piece through
      // the ring; the staging buffer holds only the tokens, read by lane 0 alone, so no bulk read
      // to wait for), or staged here (word 0 of each record is the token). Then lane 0 issues the
      // chunk's row copies back to back, with no global load between them.
      uint32_t* stage = staging + (chunks_done & 1) * staging_words;
      const int stride = p.records ? 1 : M;  // words between two rows' tokens in `stage`
      const int* list = p.send_list + static_cast<size_t>(d) * N + j0;
      long long t_phase = WarpTrace::now();
      if (!p.records) {
        if (lane == 0) bulk_wait_read<1>();  // this staging buffer's store (2 chunks ago) has read
        __syncwarp();
        tr.add(1, t_phase);
        t_phase = WarpTrace::now();
      }
      if (p.records || ablated(p, 2)) {
        for (int i = lane; i < n; i += 32)
          stage[i * stride] = static_cast<uint32_t>(__ldg(list + i));
      } else {
        stage_chunk_meta<kHeadVec>(p, list, n, d, stage, lane);
      }
      if (!p.records) fence_proxy_async_smem();
      __syncwarp();
      tr.add(2, t_phase);
      if (lane == 0) {
        t_phase = WarpTrace::now();
        const uint32_t record_bytes = static_cast<uint32_t>(n * M * 4);
        if (p.records) {
          pipe.push_span(dmeta, p.records + (static_cast<size_t>(d) * N + j0) * M, record_bytes);
        } else {
          pipe.store_staged(dmeta, stage, record_bytes);
        }
        for (int i = 0; i < n && !ablated(p, 4); ++i) {
          const size_t t = stage[i * stride];
          pipe.push_span(drows + i * rb, p.x + t * rb, rb);
        }
        tr.add(3, t_phase);
        t_phase = WarpTrace::now();
        pipe.template end_chunk<kLeanEnd>(flag, v);
        tr.add(4, t_phase);
        tr.count(7);
      }
      __syncwarp();
      ++chunks_done;
    } else {  // plain stores (FUSED_A2A_CUDA_COPY=simt, or a pushing receiver)
      const int* list = p.send_list + static_cast<size_t>(d) * N + j0;
      for (int b = 0; b < n; b += 32) {
        const int token = b + lane < n ? __ldg(list + b + lane) : 0;  // one coalesced load
        for (int i = b; i < min(n, b + 32); ++i) {
          const int t = __shfl_sync(0xffffffffu, token, i - b);
          warp_copy_ro(drows + i * rb, p.x + static_cast<size_t>(t) * rb, rb, lane);
          for (int w = lane; w < M; w += 32) dmeta[i * M + w] = meta_word(p, t, d, w);
        }
      }
      warp_release_flag(flag, v, lane);
    }
  };
  // Own chunks are items of the senders only when they copy (some of) the own rows
  // (FUSED_A2A_CUDA_SELF).
  const bool own_col = senders_have_own(p.own_rows);
  // Items claimed by default (run 32: standard static dispatch 668 us dealt, 576 claimed, NCCL 568
  // in the same call); FUSED_A2A_CUDA_CLAIM=0 deals them (next_item).
  unsigned int* claim_counter = &local_state(p.peers[r])->items_claimed;
  auto claim = [&](long long after) {  // the next item number
    return traced_next_item(tr, p.claim_items, claim_counter, after, nsw, lane);
  };
  // The round's items as a maxc x cols rectangle (destinations r + 1, r + 2, ... as columns;
  // r itself only when the senders copy own rows), claimed or dealt (next_item): this warp
  // visits its own items only. Walking every item of the round in every warp cost ~1000 cycles
  // an item, and the gaps delayed the release of each chunk's flag (session 5, run 17).
  const int cols = own_col ? G : G - 1;
  auto rect_rows = [&](long long k) {  // maxc of round k
    long long maxc = (k == 0 && own_col) ? (sh.dkept[r] + self_cr - 1) / self_cr : 0;
    for (int d = 0; d < G; ++d)
      if (d != r)
        maxc =
            max(maxc, chunks_of(segment(sh.dqoff[d], sh.dkept[d], k, R, sh.dcr[d], r), sh.dcr[d]));
    return maxc;
  };
  // A pushing receiver leaves the round's last items to the senders' rings: plain stores move a
  // chunk several times slower than a ring (4 KB in flight against ~28), so its last chunk would
  // end the op late. It claims no item once at most 2 per sender warp of the grid are left.
  auto push_done = [&](long long rect) {
    if (bulk) return false;
    unsigned int claimed = 0;
    if (lane == 0) claimed = *reinterpret_cast<volatile unsigned int*>(claim_counter);
    claimed = __shfl_sync(0xffffffffu, claimed, 0);
    return static_cast<long long>(claimed) + 2ll * nsw >= rect;
  };
  if (push_done(rect_rows(0) * cols)) return;  // (a pushing receiver's op has one round)
  long long q = claim(gw - nsw);               // this warp's first item
  long long round_base = 0;                    // number of round k's first item
  for (long long k = 0; k < nrounds && ok; ++k) {
    const long long maxc = rect_rows(k);
    const long long rect = maxc * cols;
    for (; q - round_base < rect && ok; q = claim(q)) {
      const RectItem it = rect_item(q - round_base, maxc, cols, p.dst_major);
      item(k, (r + 1 + it.col) % G, it.chunk);
      if (push_done(rect)) break;  // before its next claim
    }
    round_base += rect;
  }
  tr.add(9, t_loop);
  const long long t_drain = WarpTrace::now();
  if (tma && lane == 0) pipe.drain();
  __syncwarp();
  tr.add(5, t_drain);
  tr.stamp(6, sh.t0);
  if (bulk) tr.flush(p.trace, warp, lane);  // a pushing receiver's slot is its receiver role's
  if constexpr (kRecvItems == kRecvHelp) {
    receiver_role<kCopyUnroll, kRecvItems>(p, sh, ctx, -1, lane, s_hist, p.tma ? &pipe : nullptr);
    if (p.tma && lane == 0) pipe.drain();  // the helped rows are written before the kernel ends
    __syncwarp();
  }
}

// pipe (helpers only, with bulk copies): lane 0's ring that copies the remote rows.
template <int kCopyUnroll, int kRecvItems>
__device__ void receiver_role(const DispatchParams& p, Shared& sh, const WaitCtx& ctx, int rwarp,
                              int lane, int* s_hist, TmaPipe* pipe) {
  const int G = p.num_ranks, r = p.rank;
  const long long R = p.window;
  const int CR = sh.cr_recv, M = p.meta_words;
  // Rows of a receiver item: a chunk's rows are copied by ceil(CR / RS) warps in parallel, so the
  // copy after the last flag (run 41: 33-48 us, one warp's ~3.5 GB/s over a 115 KB chunk) shrinks.
  const int RS = p.recv_rows > 0 && p.recv_rows < CR ? p.recv_rows : CR;
  const int nsub = (CR + RS - 1) / RS;
  const size_t rb = p.row_bytes;
  // rwarp < 0: a sender warp whose own items are sent (FUSED_A2A_CUDA_RECV_ITEMS=help) claims the
  // items left, in a one-round op only: no padding rows, no round barrier, no trace of its own.
  constexpr bool kClaim = kRecvItems != kRecvDealt;
  const bool helper = kRecvItems == kRecvHelp && rwarp < 0;
  const int nrw = gridDim.x * p.recv_warps;
  const int gr = blockIdx.x * p.recv_warps + rwarp;
  const unsigned long long seq = sh.seq;
  uint8_t* ctrl = p.peers[r];
  WarpTrace tr;
  tr.stamp(8, sh.t0);
  tr.marks(sh.t_marks);
  const long long t_loop = WarpTrace::now();
  // Padding rows [kept_total, capacity): this warp's are kept_total + gr + i * nzw. Zeroed one at
  // a time while a chunk's flag is not up yet and the rest after the loop, so that the zeroing
  // fills the flag waits (a capacity of 4 x N rows, JAX's default, cost the static dispatch
  // 10.5 us in run 46), or here before the first flag (FUSED_A2A_CUDA_ZERO=first).
  // kRecvPush: the pushing warps (rwarp < push_warps) zero none, the others all while they wait
  // for flags, so that no padding is left for after the pushes (JAX's capacity of G x N rows)
  const int zero_skip = kRecvItems == kRecvPush ? p.push_warps : 0;
  const int nzw = gridDim.x * (p.recv_warps - zero_skip);  // warps that zero padding rows
  long long zero_next =
      helper || rwarp < zero_skip
          ? p.zero_end
          : sh.kept_total + blockIdx.x * (p.recv_warps - zero_skip) + rwarp - zero_skip;
  long long t_phase = WarpTrace::now();
  if (!p.zero_while_waiting)
    for (; zero_next < p.zero_end; zero_next += nzw) zero_row(p, zero_next, lane);
  tr.add(3, t_phase);
  auto zero_until_up = [&](const unsigned long long* flag, unsigned long long target) {
    while (zero_next < p.zero_end) {
      int up = 0;
      if (lane == 0) up = ld_relaxed_sys(flag) >= target ? 1 : 0;
      if (__shfl_sync(0xffffffffu, up, 0)) return;
      zero_row(p, zero_next, lane);
      zero_next += nzw;
    }
  };
  const long long remote = sh.kept_total - sh.kept[r];
  // Own rows (unless the senders copy them all): chunks of CR rows x -> recv_x, dealt with the
  // remote chunks of round 0 in the same order, so the local copy overlaps the transfer.
  const long long own = receivers_have_own(p.own_rows) ? sh.dkept[r] : 0;
  const long long nrounds = max((remote + R - 1) / R, own > 0 ? 1ll : 0ll);
  if (helper && nrounds != 1) return;
  // Claimed items (FUSED_A2A_CUDA_RECV_ITEMS): numbered over the rounds as the senders' are
  // (next_item), so a warp's claim past round k's items is its first item of round k + 1. The
  // numbers a warp claims grow, so every item of round k is taken before any of round k + 1.
  unsigned int* claim_counter = &local_state(ctrl)->recv_claimed;
  long long q = kClaim ? next_item(true, claim_counter, 0, 0, lane) : 0;
  long long round_base = 0;
  bool ok = true;
  for (long long k = 0; k < nrounds && ok; ++k) {
    const unsigned long long e = epoch_of(seq, static_cast<int>(k));
    long long maxc = k == 0 ? (own + CR - 1) / CR : 0;
    for (int s = 0; s < G; ++s)
      if (s != r) maxc = max(maxc, chunks_of(segment(sh.qoff[s], sh.kept[s], k, R, CR, s), CR));
    // One item of this warp, if it exists: rows [a, a + RS) of chunk c from source s.
    auto item = [&](int s, long long c, int a) {
      if (s == r) {
        if (k != 0 || !own_chunk_by_receivers(p.own_rows, c)) return;
        const RowSlice sl = chunk_slice(c * CR, own, CR, RS, a);
        if (sl.n == 0) return;
        const long long t_own = WarpTrace::now();
        if (!ablated(p, 1)) copy_own_chunk(p, sl.j0, sh.poff[r] + sl.j0, sl.n, lane, s_hist);
        tr.add(2, t_own);
        return;
      }
      const Segment sg = segment(sh.qoff[s], sh.kept[s], k, R, CR, s);
      const RowSlice sl = chunk_slice(sg.lo + c * CR, sg.hi, CR, RS, a);
      if (sl.n == 0) return;
      const unsigned long long* flag = chunk_flag(ctrl, sg.base + static_cast<int>(c));
      if (p.zero_while_waiting) {
        const long long t_zero = WarpTrace::now();
        zero_until_up(flag, e);
        tr.add(3, t_zero);
      }
      const long long t_wait = WarpTrace::now();
      ok = warp_wait_flag(flag, e, ctx, kPhaseData, s, lane);
      tr.add(0, t_wait);
      if (!ok) return;
      tr.stamp(5, sh.t0);  // the latest flag: the copy after it is this warp's tail
      const long long t_copy = WarpTrace::now();
      const int n = sl.n;
      const long long slot0 = sg.start + c * CR + a;
      const long long P = sh.poff[s] + sl.j0;
      const uint8_t* src = ctrl + kControlBytes + slot0 * rb;
      if (ablated(p, 1) || p.direct_recv) {  // direct rows: the senders wrote them to recv_x
      } else if (kRecvItems == kRecvHelp && pipe) {  // the flag wait fenced the async proxy
        if (lane == 0) pipe->push_span(p.recv_x + P * rb, src, n * rb);
        __syncwarp();
      } else {
        warp_copy_cg<kCopyUnroll>(p.recv_x + P * rb, src, n * rb, lane);
      }
      const uint32_t* ms =
          reinterpret_cast<const uint32_t*>(ctrl + kControlBytes + R * rb) + slot0 * M;
      if (!ablated(p, 1))  // the chunk's records (written by the peer: coherent loads)
        scatter_records(p, M, n, P, lane, s_hist, [&](int i) { return __ldcg(ms + i); });
      tr.add(1, t_copy);
      tr.count(7);
    };
    // The round's items as a (maxc x nsub) x cols rectangle (sources r + 1, r + 2, ... as
    // columns, r itself only when the receivers copy own rows; a chunk's nsub row slices next to
    // each other), dealt round-robin: this warp visits its own items only (see sender_role).
    // With nrw a multiple of cols every warp keeps one column, so an empty own column idled a
    // quarter of the receiver warps at EP 4 and half at EP 2 (session 11's traces).
    const int cols = receivers_have_own(p.own_rows) || p.recv_own_column ? G : G - 1;
    const long long rect = maxc * nsub * cols;
    auto visit = [&](long long idx) {
      const RectItem it = rect_item(idx, maxc * nsub, cols, p.dst_major);
      item((r + 1 + it.col) % G, it.chunk / nsub, static_cast<int>(it.chunk % nsub) * RS);
    };
    if constexpr (kClaim) {
      // The next claim is issued before this item's flag wait and copy and read after them, so
      // its atomic's round trip overlaps them (a warp holds two claims: this item and the next).
      while (q - round_base < rect && ok) {
        unsigned int next = 0;
        if (lane == 0) next = atomicAdd(claim_counter, 1u);
        visit(q - round_base);
        q = static_cast<long long>(__shfl_sync(0xffffffffu, next, 0));
      }
      round_base += rect;
    } else {
      for (long long idx = gr; idx < rect && ok; idx += nrw) visit(idx);
    }
    if (ok && k + 1 < nrounds) {
      const long long t_round = WarpTrace::now();
      ok = warp_next_round(ctx, ctrl, p.peers, G, r, kMsgDispatch, seq, k, nrw, lane);
      tr.add(4, t_round);
    }
  }
  t_phase = WarpTrace::now();
  for (; zero_next < p.zero_end; zero_next += nzw) zero_row(p, zero_next, lane);  // the rest
  tr.add(3, t_phase);
  tr.add(9, t_loop);
  tr.stamp(6, sh.t0);
  if (!helper) tr.flush(p.trace, p.send_warps + rwarp, lane);
}

}  // namespace fa2a::cuda::dispatch_impl
