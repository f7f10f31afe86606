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
//   the receiver drained the window), chunk flags (sender -> receiver). The static dispatch at
//   G <= kLayoutMaxRanks skips round 0's ready: every rank's count row and receive parameters go
//   to every rank (LayoutSlot), so each sender computes each receiver's placement (sender_view;
//   FUSED_A2A_CUDA_LAYOUT=ready restores the message).
// - Epochs derive from a per-buffer op counter in device memory, bumped by the last block of each
//   op, so the kernels are CUDA-graph capturable. Payload slots alternate by the op parity.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "dispatch_roles.cuh"
#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

using namespace dispatch_impl;

// The speculative torch dispatch (DispatchParams::host_ticket), block 0, before its layouts'
// flags: this rank's (token, expert) pairs of each rank's local experts to that rank, at the
// notify's place (notify_experts, this op's parity), fenced for the flags' release after them.
__device__ inline void send_expert_pairs(const DispatchParams& p, int parity) {
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int v = 0;
#pragma unroll 8  // the tiles' loads in flight together: this is on the layouts' critical path
    for (int t = 0; t < p.scan2.tiles; ++t) v += p.tile_ecount[static_cast<size_t>(t) * E + e];
    const int d = e / p.lpr;
    notify_experts(p.peers[d], parity)[p.rank * p.lpr + (e - d * p.lpr)] = v;
  }
  __threadfence_system();
  __syncthreads();
}

// Direct rows: recv_x minus this rank's buffer base, which a peer adds to its own mapping of
// that base (the same address in this process; another process's mapping of the output arena).
// Never 0: recv_x is not the buffer's control region.
__device__ inline unsigned long long direct_rows_delta(const DispatchParams& p) {
  return reinterpret_cast<uintptr_t>(p.recv_x) - reinterpret_cast<uintptr_t>(p.peers[p.rank]);
}
// Where this rank's rows to d start in d's recv_x: d's published delta plus d's base as mapped
// here plus our P offset there; 0 (into d's window) when d published none.
__device__ inline unsigned long long direct_rows_at(const DispatchParams& p, int d,
                                                    unsigned long long delta, int poff) {
  if (!delta) return 0ull;
  return delta + reinterpret_cast<uintptr_t>(p.peers[d]) +
         static_cast<unsigned long long>(poff) * p.row_bytes;
}

// The speculative torch dispatch, block 0, once every source's layout (and with it its expert
// pairs) is in: dispatch_notify's host counts, then the ticket the host waits for.
__device__ inline void write_host_counts(const DispatchParams& p, const Shared& sh, uint8_t* ctrl,
                                         int parity) {
  const int G = p.num_ranks, tid = threadIdx.x;
  for (int j = tid; j < p.lpr; j += blockDim.x)
    p.host_counts[3 + j] = received_expert_pairs(ctrl, parity, G, p.lpr, j);
  if (tid == 0) store_host_totals(p.host_counts, exchange_totals(sh.true_cnt, sh.ntok, G));
  __threadfence_system();  // every entry is visible before the ticket
  __syncthreads();
  if (tid == 0) *reinterpret_cast<volatile int*>(&p.host_counts[3 + p.lpr]) = p.host_ticket;
}

// kCopyUnroll: 16-byte loads in flight per lane of the receivers' copy to recv_x (8, or 16 with
// FUSED_A2A_CUDA_RECV_UNROLL=16: a second instantiation, so the default keeps its registers).
// kLeanEnd: the senders' chunk ends release an earlier chunk as soon as its own writes are
// complete (FUSED_A2A_CUDA_CHUNK_END=lean, with the default copy unroll only). kRecvItems: the
// receivers' items dealt (kRecvDealt), claimed, or claimed by the senders too once their items
// are sent (FUSED_A2A_CUDA_RECV_ITEMS=claim / help; own instantiations, as the claims cost the
// default kernel ~100 / 180 bytes of spills), or claimed after some receiver warps pushed rows
// beside the senders (kRecvPush, FUSED_A2A_CUDA_RECV_PUSH). kFusedScan: the route scan's second
// pass runs here (fused_scan, scan_pass2.cuh; static dispatch with the layout notify). kLayoutDyn:
// dispatch_data after a dispatch_notify that published every rank's layout
// (FUSED_A2A_CUDA_LAYOUT=dynamic). kHeadVec: the senders' records through vector loads
// (by default where K % 4 == 0, with the fused scan only; FUSED_A2A_CUDA_META_VEC=0: off).
template <int kCopyUnroll, bool kLeanEnd = false, int kRecvItems = kRecvDealt,
          bool kFusedScan = false, bool kLayoutDyn = false, bool kHeadVec = false>
__global__ void __launch_bounds__(kMaxThreads, 1) dispatch_kernel(DispatchParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ Shared sh;
  griddep_wait();  // FUSED_A2A_CUDA_PDL: the route scan (or records kernel) before is complete
  const int G = p.num_ranks, r = p.rank, N = p.num_tokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint8_t* ctrl = p.peers[r];
  LocalState* ls = local_state(ctrl);
  const WaitCtx ctx{ls, p.host_error, p.timeout_ns, p.op, r, p.wait_acquire_first};
  const SmemLayout L = smem_layout(p.lpr, p.send_warps, p.tma, p.stages, p.stage_bytes,
                                   p.staging_rows, p.meta_words);
  int* s_hist = reinterpret_cast<int*>(smem + L.hist);
  for (int j = tid; j < p.lpr; j += blockDim.x) s_hist[j] = 0;
  for (int d = tid; d < kMaxRanks; d += blockDim.x) sh.drows[d] = 0;
  if (tid == 0) {
    sh.t0 = globaltimer();
    sh.t_marks[0] = sh.t_marks[1] = 0;
    sh.seq = *reinterpret_cast<volatile unsigned long long*>(&ls->seq);
    sh.fail = aborted(ctx) ? 1 : 0;
    sh.last = 0;
  }
  __syncthreads();
  const unsigned long long seq = sh.seq;
  const int parity = static_cast<int>(seq & 1ull);
  const unsigned long long e0 = epoch_of(seq, 0);
  if constexpr (kFusedScan) {
    // The route scan's first pass here (FUSED_A2A_CUDA_SCAN_PASS1=fused: its pairs per expert
    // in the rings' shared memory, which no ring uses yet), then the tokens per destination
    // from its tile counts
    if (!scan_pass1(p.scan2, N, G, e0, ctx, reinterpret_cast<int*>(smem + L.pipes))) sh.fail = 1;
    for (int d = tid; d < G; d += blockDim.x) sh.sent[d] = tiles_count(p.scan2, d, p.scan2.tiles);
    __syncthreads();
  }
  // Tokens routed to rank d (cum[d][N] of the route scan).
  auto sent_to = [&](int d) {
    if constexpr (kFusedScan) return sh.sent[d];
    return p.cum[static_cast<size_t>(d) * (N + 1) + N];
  };
  if (!sh.fail) {
    // 1. True counts per source: exchanged here (static) or from the notify / the handle. With
    // the layout notify, every rank's count row and receive parameters go to every rank.
    const bool lay = p.static_mode && p.layout_notify;
    // dispatch_data after a dispatch_notify that published every rank's layout
    // (FUSED_A2A_CUDA_LAYOUT=dynamic): the notify kernel copied them into this rank's stash
    constexpr bool lay_dyn = kLayoutDyn;
    auto read_layouts = [&](bool stash) {
      for (int s = tid; s < G; s += blockDim.x) {
        LayoutSlot* slot = stash ? layout_stash(ctrl, s) : layout_slot(ctrl, parity, s);
        if (!stash && !wait_flag(&slot->flag, e0, ctx, kPhaseNotify, s)) sh.fail = 1;
        const volatile LayoutSlot* v = slot;
        for (int i = 0; i < G; ++i) sh.lay_count[s][i] = v->count[i];
        sh.true_cnt[s] = sh.lay_count[s][r];
        sh.ntok[s] = v->n_tokens;
        sh.lay_warps2[s] = v->warps2;
        sh.lay_chunk[s] = v->chunk;
        sh.lay_capacity[s] = v->capacity;
        sh.lay_window[s] = v->window;
        sh.drows[s] = stash ? 0ull : v->direct_rows;  // s's delta (step 2 makes it an address)
      }
    };
    const unsigned lay_block = handshake_block<kFusedScan>(p.scan2);  // layouts, host counts
    if (lay) {
      if (blockIdx.x == lay_block) {
        if constexpr (kFusedScan) {  // (the default kernels' registers stay as they were)
          if (p.host_ticket) send_expert_pairs(p, parity);
        }
        for (int d = tid; d < G; d += blockDim.x) {
          LayoutSlot* slot = layout_slot(p.peers[d], parity, r);
          store_layout(slot, G, sent_to, N, p.chunks_per_warp * gridDim.x * p.send_warps, p.chunk,
                       p.capacity, p.window, p.direct_recv ? direct_rows_delta(p) : 0ull);
          __threadfence_system();
          st_release_sys(&slot->flag, e0);
        }
      }
      // The send lists, while the peers' layouts travel (all blocks, then a grid-wide barrier).
      if constexpr (kFusedScan) {
        scan_pass2(p.scan2, N, G);
        if (!scan_barrier(ls, ctx)) sh.fail = 1;
        if (tid == 0) WarpTrace::mark(&sh.t_marks[0], sh.t0);
      }
      read_layouts(false);
    } else if (lay_dyn) {
      read_layouts(true);
      // "In this op" to every peer: no one waits for it here, but the op's last block waits
      // for every peer's before the op ends (see the epilogue)
      if (blockIdx.x == 0) {
        for (int s = tid; s < G; s += blockDim.x) {
          if (s == r) continue;
          MsgSlot* m = msg_slot(p.peers[s], kMsgDispatch, parity, r);
          __threadfence_system();
          st_release_sys(&m->epoch, e0);
        }
      }
    } else if (p.static_mode) {
      if (blockIdx.x == 0) {
        for (int d = tid; d < G; d += blockDim.x) {
          NotifySlot* slot = notify_slot(p.peers[d], parity, r);
          slot->count = sent_to(d);
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
    if (tid == 0) WarpTrace::mark(&sh.t_marks[1], sh.t0);
    if constexpr (kFusedScan) {
      if (lay && p.host_ticket && blockIdx.x == lay_block && !sh.fail)
        write_host_counts(p, sh, ctrl, parity);
    }
    if (tid == 0) {
      int kept_total = 0;
      sh.total = place_sources(sh.true_cnt, G, p.capacity, sh.poff, sh.kept, &kept_total);
      sh.kept_total = kept_total;
      for (int s = 0; s < G; ++s) sh.qoff[s] = window_qoff(sh.poff, sh.kept, s, r);
      sh.cr_recv =
          window_chunk_rows(sh.kept_total - sh.kept[r],
                            1ll * p.chunks_per_warp * gridDim.x * p.send_warps, p.chunk, p.window);
    }
    __syncthreads();
    // 2. Ready: tell every source where its rows go; learn where ours go. With the layout
    // notify, every destination's placement of our rows is computed here (sender_view) instead.
    if (!sh.fail) {
      if (!lay && !lay_dyn && blockIdx.x == 0) {
        for (int s = tid; s < G; s += blockDim.x) {
          if (s == r) continue;
          MsgSlot* m = msg_slot(p.peers[s], kMsgDispatch, parity, r);
          m->a = sh.qoff[s];
          m->b = sh.kept[s];
          m->c = sh.cr_recv;
          m->d = sh.poff[s];
          m->wide = p.direct_recv ? direct_rows_delta(p) : 0ull;
          __threadfence_system();
          st_release_sys(&m->epoch, e0);
        }
      }
      for (int d = tid; d < G; d += blockDim.x) {
        const int sent = sent_to(d);
        if (d == r) {
          sh.dqoff[d] = sh.poff[r];
          sh.dkept[d] = min(sh.kept[r], sent);
          sh.dcr[d] = sh.cr_recv;
          continue;
        }
        if (lay || lay_dyn) {
          int col[kLayoutMaxRanks];
          for (int s = 0; s < G; ++s) col[s] = sh.lay_count[s][d];
          const SenderView v = sender_view(col, G, r, d, sh.lay_capacity[d], sh.lay_warps2[d],
                                           sh.lay_chunk[d], sh.lay_window[d]);
          sh.dqoff[d] = v.qoff;
          sh.dkept[d] = min(v.kept, sent);
          sh.dcr[d] = max(v.cr, 1);
          sh.drows[d] = direct_rows_at(p, d, sh.drows[d], v.poff);
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
        // direct rows (FUSED_A2A_CUDA_DIRECT_READY): as with the layout notify
        const unsigned long long delta = *reinterpret_cast<volatile unsigned long long*>(&m->wide);
        if (delta) sh.drows[d] = direct_rows_at(p, d, delta, ld_volatile_int(&m->d));
      }
    }
    __syncthreads();
    // 3. Move the rows (ablation bit 8: not at all, which times launch + handshakes + epilogue).
    if (!sh.fail && !ablated(p, 8)) {
      if (warp < p.send_warps) {
        // FUSED_A2A_CUDA_RECV_ITEMS=help: then the receivers' items still unclaimed (runs 53-55:
        // with more SMs or sender warps the senders finish 40-170 us before the receivers)
        sender_role<kLeanEnd, kCopyUnroll, kRecvItems, kHeadVec>(p, sh, smem, L, ctx, warp, lane,
                                                                 s_hist);
      } else {
        if constexpr (kRecvItems == kRecvPush) {  // rows first, beside the senders (one round)
          if (warp - p.send_warps < p.push_warps) {
            sender_role<kLeanEnd, kCopyUnroll, kRecvItems, kHeadVec>(p, sh, smem, L, ctx, warp,
                                                                     lane, s_hist, false);
          }
        }
        receiver_role<kCopyUnroll, kRecvItems>(p, sh, ctx, warp - p.send_warps, lane, s_hist);
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
  // FUSED_A2A_CUDA_LAYOUT=dynamic: this op waited for no peer at its start, so it ends only once
  // every peer is in it too. Else a rank that receives nothing from a peer could finish this op
  // and start the next one, whose LayoutSlot / message writes reuse this parity's slots, while
  // that peer is still in dispatch_notify (which copies the slots it reads into its stash).
  if constexpr (kLayoutDyn) {
    for (int s = tid; s < G; s += blockDim.x)
      if (s != r &&
          !wait_flag(&msg_slot(ctrl, kMsgDispatch, parity, s)->epoch, e0, ctx, kPhaseReady, s))
        sh.fail = 1;
    __syncthreads();
  }
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
    ls->items_claimed = 0;  // every warp of this op is past its last claim
    ls->recv_claimed = 0;
    ls->scan_done = 0;
    __threadfence();
    *reinterpret_cast<volatile unsigned long long*>(&ls->seq) = seq + 1;
  }
}

// The metadata records of every (destination, send-list position), from the route scan's send
// lists (FUSED_A2A_CUDA_RECORDS=1): one warp per 32 positions of one destination, batched loads
// (meta_words). The senders then push a chunk's records as one bulk piece instead of computing
// them between the chunk's row pushes (runs 39-44: 20-35% of a sender warp's loop, FP8 most).
constexpr int kRecordThreads = 256;
__global__ void __launch_bounds__(kRecordThreads)
    dispatch_records_kernel(DispatchParams p, uint32_t* records) {
  const int N = p.num_tokens, G = p.num_ranks, M = p.meta_words;
  const int lane = threadIdx.x & 31;
  const long long per_dest = (N + 31) / 32;  // warp items of one destination
  const long long nwarps = static_cast<long long>(gridDim.x) * (kRecordThreads / 32);
  for (long long wi = (static_cast<long long>(blockIdx.x) * kRecordThreads + threadIdx.x) / 32;
       wi < per_dest * G; wi += nwarps) {
    const int d = static_cast<int>(wi / per_dest);
    const int j0 = static_cast<int>(wi - d * per_dest) * 32;
    const int routed = __ldg(p.cum + static_cast<size_t>(d) * (N + 1) + N);
    if (j0 >= routed) continue;  // warp-uniform
    const int nb = min(32, routed - j0);
    const int token = lane < nb ? __ldg(p.send_list + static_cast<size_t>(d) * N + j0 + lane) : 0;
    uint32_t* out = records + (static_cast<size_t>(d) * N + j0) * M;
    meta_words<true>(p, token, nb, d, lane,
                     [&](int row, int w, uint32_t v) { out[row * M + w] = v; });
  }
}

// A dispatched row of `a`: its value bytes (FP8: one byte a value), FP8 scales, and its metadata
// record [src token][K local idx][K weights][scales] in words (meta_real, padded to meta_words).
struct RowFormat {
  int nsc, meta_real, meta_words;
  size_t row_bytes;
};
RowFormat row_format(const DispatchArgs& a) {
  const bool fp8 = a.x_scales != nullptr;
  RowFormat f;
  f.nsc = fp8 ? static_cast<int>(a.hidden / kFp8BlockSize) : 0;
  f.row_bytes = static_cast<size_t>(a.hidden) * (fp8 ? 1 : dtype_size(a.x_dtype));
  f.meta_real = 1 + 2 * a.num_topk + f.nsc;
  f.meta_words = (f.meta_real + 3) & ~3;
  return f;
}

// Null (no weights) or 16-byte aligned: the 16-byte vector loads of the records (head_quads) and
// of the FP8 scales
bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

}  // namespace

DispatchGeometry dispatch_geometry(const CudaState& st, const Buffer& buffer,
                                   const DispatchArgs& a) {
  const RowFormat f = row_format(a);
  const size_t slot_bytes = f.row_bytes + 4 * static_cast<size_t>(f.meta_words);
  const long long R = static_cast<long long>(buffer.data_bytes() / slot_bytes);
  FA2A_CHECK(buffer.num_ranks() == 1 || R >= 1, "the communication buffer (", buffer.data_bytes(),
             " data bytes) cannot hold one row of ", slot_bytes, " bytes: create a larger one");
  // The window is capped so that one flag covers at most kMaxFlagRows rows: the metadata
  // staging of every sender warp is sized for max(chunk, rows a flag covers), in shared memory.
  // Uncapped, narrow rows in a buffer sized for wide ones made windows of millions of rows (run
  // 63: the whole bench's 224-byte check rows in a buffer of 8192 rows of 14 KB needed 259 KB of
  // shared memory). 32 rows a flag: 129,024 rows a round, more than any rank receives in one
  // round of a buffer sized for 14 KB rows at EP <= 8.
  constexpr long long kMaxFlagRows = 32;
  DispatchGeometry g;
  g.window = std::max(std::min(R, kMaxFlagRows * (kNumFlags - kMaxRanks)), 1ll);
  const int blocks = comm_blocks(st, a.num_sms);
  g.max_chunk = std::max(1, std::min(64, dispatch_chunk_rows(blocks, f.nsc > 0)));
  g.warps2 = chunks_per_warp_env() * blocks * send_warps_env();
  return g;
}

namespace {

struct Prepared {
  CudaState* st;
  const Scratch* scratch;
  int lpr;
  RowFormat row;
  ScanPass2 scan2;                // tiles > 0: the data kernel runs the route scan (fused_scan)
  bool notified_layouts = false;  // the op just before was the dispatch_notify for these args,
                                  // and it published every rank's layout
};

// after_notify (dispatch_data): the route scan of the dispatch_notify just before is reused when
// it is still in the scratch (CudaState::notified). fuse_scan: the data kernel runs the route
// scan's second pass (launch_fused_scan: maybe its first too, counting the pairs per expert with
// pairs).
Prepared prepare(Buffer& buffer, const DispatchArgs& a, cudaStream_t stream, bool want_list,
                 bool after_notify, bool fuse_scan = false, bool pairs = false) {
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
  pr.row = row_format(a);
  FA2A_CHECK(pr.row.row_bytes % 16 == 0, "hidden * element size = ", pr.row.row_bytes,
             " bytes must be a multiple of 16");
  check_aligned(a.x, "x");
  check_aligned(a.recv_x, "recv_x");
  const bool idx64 = a.idx_dtype == DType::kI64;
  const CudaState::NotifiedScan ns = pr.st->notified;
  // The notify for these args ran just before (every op bumps scratch_gen in ensure_scratch).
  const bool adjacent = after_notify && ns.gen == pr.st->scratch_gen && ns.topk_idx == a.topk_idx &&
                        ns.num_tokens == a.num_tokens && ns.num_topk == a.num_topk &&
                        ns.num_experts == a.num_experts && ns.idx64 == idx64;
  pr.notified_layouts = adjacent && ns.layouts;
  const bool reuse = adjacent && want_list && !env_is("FUSED_A2A_CUDA_RESCAN", "1");
  pr.st->notified.topk_idx = nullptr;  // one use
  const int* cum_before = pr.st->scratch.cum;
  pr.scratch =
      &ensure_scratch(*pr.st, G, std::max<int64_t>(a.num_tokens, 1), a.num_experts, stream);
  if (fuse_scan) {
    pr.scan2 = launch_fused_scan(a.topk_idx, idx64, static_cast<int>(a.num_tokens), a.num_topk,
                                 a.num_experts, G, *pr.scratch, /*list=*/true, /*cum=*/false, pairs,
                                 stream);
  } else if (!reuse || pr.scratch->cum != cum_before) {
    launch_route_scan(a.topk_idx, idx64, static_cast<int>(a.num_tokens), a.num_topk, a.num_experts,
                      G, *pr.scratch, want_list, stream);
  }
  return pr;
}

void run_dispatch(Buffer& buffer, const DispatchArgs& a, Stream stream, int op, bool static_mode) {
  HostPhaseTimer timer;
  auto s = static_cast<cudaStream_t>(stream.handle);
  std::lock_guard<std::mutex> lock(buffer.op_mutex());
  DeviceGuard guard(buffer.device());
  const int G = buffer.num_ranks();
  const bool layout_notify = static_mode && G <= kLayoutMaxRanks && layout_notify_env();
  // host_ticket (torch's speculative path, ops.h): the kernel writes the host counts, which only
  // the fused scan's instantiations do, so it runs the fused scan at every N and no records.
  // The dynamic path's data phase (kOpDispatchData) gets the same args with the ticket, which
  // its dispatch_notify wrote: there the ticket means nothing to the data kernel.
  const bool host_counts = a.host_ticket != 0 && op == kOpDispatch;
  const bool records =
      !host_counts && records_env(a.x_scales != nullptr, a.num_tokens) && a.num_tokens > 0;
  // The scan's second pass in the kernel (fused_scan): the static dispatch with the layout
  // notify and without the records kernel (which reads the send lists before the data kernel)
  const bool fuse_scan =
      (host_counts || fused_scan(a.num_tokens)) && op == kOpDispatch && layout_notify && !records;
  if (host_counts) {  // checked before anything is launched
    // as dispatch_notify: the host waits for counts a captured kernel never writes
    FA2A_CHECK(!capturing(s),
               "dispatch: the stream is capturing a CUDA graph, and the dynamic dispatch needs its "
               "counts on the host; capture a dispatch with a static capacity instead");
    FA2A_CHECK(fuse_scan,
               "dispatch: host_ticket needs the static dispatch with the layout notify (G <= ",
               kLayoutMaxRanks, ", FUSED_A2A_CUDA_LAYOUT not 'ready'); group size ", G);
    FA2A_CHECK(a.host_counts && device_writable_host(a.host_counts),
               "dispatch: host_ticket needs host_counts in pinned host memory");
    FA2A_CHECK(a.num_experts <= kMaxExpertsNotify, "num_experts=", a.num_experts,
               " exceeds the CUDA count exchange's limit of ", kMaxExpertsNotify);
    check_host_wait_env();
  }
  // the pairs per expert only for the host counts (send_expert_pairs)
  const Prepared pr = prepare(buffer, a, s, true, op == kOpDispatchData, fuse_scan, host_counts);
  timer.mark(1);
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
  p.row_bytes = pr.row.row_bytes;
  p.nsc = pr.row.nsc;
  p.meta_real = pr.row.meta_real;
  p.meta_words = pr.row.meta_words;
  p.x = static_cast<const uint8_t*>(a.x);
  p.x_scales = a.x_scales;
  p.scales_vec = p.nsc > 0 && p.nsc % 4 == 0 && aligned16(a.x_scales);
  p.topk_idx = a.topk_idx;
  p.topk_w = a.topk_weights;
  p.head_vec = meta_vec_env() && a.num_topk % 4 == 0 && aligned16(a.topk_idx) &&
               aligned16(a.topk_weights) && (p.nsc == 0 || p.scales_vec);
  p.capacity = a.capacity;
  p.zero_end = a.zero_padding ? a.capacity : 0;
  p.recv_x = static_cast<uint8_t*>(a.recv_x);
  p.recv_scales = a.recv_x_scales;
  p.recv_idx = a.recv_topk_idx;
  p.recv_idx64 = reinterpret_cast<long long*>(a.recv_topk_idx64);
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
  const DispatchGeometry geo = dispatch_geometry(*pr.st, buffer, a);
  p.window = geo.window;
  const int max_chunk = geo.max_chunk;
  const long long flag_rows = (p.window + kNumFlags - kMaxRanks - 1) / (kNumFlags - kMaxRanks);
  p.staging_rows = static_cast<int>(std::max<long long>(max_chunk, flag_rows));
  LaunchConfig cfg =
      launch_config(*pr.st, a.num_sms, pr.row.row_bytes, sizeof(int) * pr.lpr,
                    sizeof(int) * kMaxRanks + 2 * (4 * p.staging_rows * p.meta_words + 16), 0);
  p.chunk = max_chunk;  // the largest chunk (rows)
  p.chunks_per_warp = chunks_per_warp_env();
  p.dst_major = order_dst_major();
  {
    // Who copies the own rows x -> recv_x (a choice of this rank alone): the receiver warps
    // ("recv"), the senders with bulk copies ("send"), or both, chunk by chunk ("split": the
    // senders' pipes also carry the remote rows, the receivers' copies are latency-bound).
    // Unset: the receivers up to kSelfRecvMaxTokens tokens, where the senders' items are few and
    // serial, else the senders (runs 18-20: decode N = 128 faster with "recv", the standard N =
    // 4096 with "send", both with 32-row chunks).
    constexpr int64_t kSelfRecvMaxTokens = 512;
    const char* v = std::getenv("FUSED_A2A_CUDA_SELF");
    if (v && std::strcmp(v, "split") == 0) {
      p.own_rows = kOwnSplit;
    } else if (v) {
      p.own_rows = std::strcmp(v, "recv") == 0 ? kOwnByReceivers : kOwnBySenders;
    } else {
      p.own_rows = a.num_tokens <= kSelfRecvMaxTokens ? kOwnByReceivers : kOwnBySenders;
    }
  }
  p.claim_items = claim_items_env();
  p.recv_rows = recv_rows_env();
  p.recv_own_column = env_is("FUSED_A2A_CUDA_RECV_COLS", "all");
  p.zero_while_waiting = zero_while_waiting_env();
  p.layout_notify = layout_notify;
  const int direct = direct_rows_env();
  // The receive placement reaches the sources by the layout notify, or by the ready message
  // (FUSED_A2A_CUDA_DIRECT_READY); dispatch_data after a dispatch_notify that published every
  // layout sends neither
  const bool lay_dyn = !static_mode && op == kOpDispatchData && pr.notified_layouts;
  const bool placed = layout_notify || (!lay_dyn && direct_ready_env());
  if (placed && p.recv_x && a.capacity > 0 && G > 1 && direct != kDirectOff) {
    // Every peer reaches recv_x: it is in this process (peer access), or in this rank's output
    // arena, which every peer has mapped (torch's processes, FUSED_A2A_TORCH_ARENA_MB)
    p.direct_recv = group_in_process(*pr.st, buffer) ||
                    buffer.in_own_arena(p.recv_x, static_cast<size_t>(a.capacity) * p.row_bytes);
    FA2A_CHECK(p.direct_recv || direct != kDirectRequire,
               "FUSED_A2A_CUDA_DIRECT=require: the dispatch's group of ", G,
               " ranks is not all in this process and recv_x is not in this rank's output arena, "
               "so its rows cannot go straight to recv_x");
  }
  p.send_warps = cfg.send_warps;
  p.recv_warps = cfg.recv_warps;
  p.tma = cfg.tma;
  p.stages = cfg.stages;
  p.stage_bytes = cfg.stage_bytes;
  p.flag_fence_sc = cfg.flag_fence_sc;
  p.wait_acquire_first = cfg.wait_acquire_first;
  p.loads_ahead = cfg.loads_ahead;
  p.trace = pr.st->trace;
  p.ablate = ablate_env();
  p.scan2 = pr.scan2;
  if (host_counts) {  // the speculative torch dispatch through this kernel (ops.h)
    p.host_counts = a.host_counts;
    p.host_ticket = a.host_ticket;
    p.tile_ecount = pr.scratch->tile_ecount;
  }
  if (p.tma && records) {
    const size_t words = static_cast<size_t>(G) * p.num_tokens * p.meta_words;
    uint32_t* records = ensure_records(*pr.st, words, s);
    p.records = records;
    const long long warps = static_cast<long long>(G) * ((p.num_tokens + 31) / 32);
    const int blocks = static_cast<int>(std::min<long long>(
        (warps + kRecordThreads / 32 - 1) / (kRecordThreads / 32), 4ll * pr.st->sm_count));
    dispatch_records_kernel<<<blocks, kRecordThreads, 0, s>>>(p, records);
    check_launch("dispatch records");
  }
  const SmemLayout L = smem_layout(p.lpr, p.send_warps, p.tma, p.stages, p.stage_bytes,
                                   p.staging_rows, p.meta_words);
  // The first pass in the kernel counts the pairs per expert in the senders' rings' shared
  // memory, before any ring is set up (dispatch_kernel)
  const size_t smem_bytes = p.scan2.pass1.tile_ecount
                                ? std::max(L.total, L.pipes + sizeof(int) * a.num_experts)
                                : L.total;
  FA2A_CHECK(smem_bytes <= pr.st->smem_optin, "dispatch needs ", smem_bytes,
             " bytes of shared memory (local experts ", p.lpr, "), the device has ",
             pr.st->smem_optin);
  // The receivers' items (recv_items_env: dealt, claimed, or helped) pick a kernel instantiation;
  // with the fused scan or the dynamic layout only dealt or helped ones, 8 loads a lane, whole
  // chunk ends.
  const int recv_items = recv_items_env(cfg.blocks);
  const bool help = recv_items == kRecvHelp, claim = recv_items == kRecvClaim;
  const bool u16 = recv_unroll_env() == 16;
  const bool fused = p.scan2.tiles > 0;
  const bool vec = fused && p.head_vec;
  // Receiver warps pushing rows too (FUSED_A2A_CUDA_RECV_PUSH): the fused scan's vector kernel
  // with claimed sender items only, at least one warp a block not pushing (it zeroes the padding
  // rows while the others push); elsewhere the setting does nothing
  p.push_warps =
      vec && p.claim_items ? std::min(recv_push_env(), std::max(p.recv_warps - 1, 0)) : 0;
  const bool push = p.push_warps > 0;
  auto kernel = push                 ? dispatch_kernel<8, false, kRecvPush, true, false, true>
                : vec && help        ? dispatch_kernel<8, false, kRecvHelp, true, false, true>
                : vec                ? dispatch_kernel<8, false, kRecvDealt, true, false, true>
                : fused && help      ? dispatch_kernel<8, false, kRecvHelp, true>
                : fused              ? dispatch_kernel<8, false, kRecvDealt, true>
                : lay_dyn && help    ? dispatch_kernel<8, false, kRecvHelp, false, true>
                : lay_dyn            ? dispatch_kernel<8, false, kRecvDealt, false, true>
                : help && u16        ? dispatch_kernel<16, false, kRecvHelp>
                : help               ? dispatch_kernel<8, false, kRecvHelp>
                : claim              ? dispatch_kernel<8, false, kRecvClaim>
                : u16                ? dispatch_kernel<16>
                : cfg.lean_chunk_end ? dispatch_kernel<8, true>
                                     : dispatch_kernel<8>;
  timer.mark(2);
  FA2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem_bytes)),
                  "dispatch shared memory");
  launch_kernel(kernel, cfg.blocks, 32 * (p.send_warps + p.recv_warps), smem_bytes, s,
                pdl_env("dispatch", cfg.blocks, p.records != nullptr), p);
  check_launch("dispatch");
  timer.done(pr.st->host_phases[kHostDispatch]);
}

}  // namespace

void dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  run_dispatch(buffer, args, stream, kOpDispatch, true);
}

void dispatch_data(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  run_dispatch(buffer, args, stream, kOpDispatchData, false);
}

// Session 29 (bench_normal, 4x H200, EP 4): the cached dispatch through dispatch_data took 532.6
// us at 24 SMs against the static dispatch's 507.8 (560.1 / 522.7 at 12, 519.8 / 501.6 at 48):
// that path has no fused scan, so no pushing receiver warps (session 26: 522 -> 507), and its
// receivers' ready message comes before any row. As a static dispatch (run 168): 514.4 (528.9 /
// 507.0 at 12 / 48), EP 2 216.3 against 230.0.
void dispatch_cached(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  const bool as_static =
      buffer.num_ranks() <= kLayoutMaxRanks && layout_notify_env() && cached_static_env();
  run_dispatch(buffer, args, stream, as_static ? kOpDispatch : kOpDispatchData, as_static);
}

}  // namespace fa2a::cuda
