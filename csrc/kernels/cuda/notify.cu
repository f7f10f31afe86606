// dispatch_notify on CUDA (the dynamic path's phase 1): one block exchanges the token counts and
// per-expert counts with every peer, writes the true recv_src_counts, tokens_per_expert, num_recv
// and group_max_tokens (and host_counts, if given), and the host waits for it (the caller sizes
// the outputs from num_recv).
#include <algorithm>
#include <mutex>

#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

// What dispatch_notify publishes besides the counts with FUSED_A2A_CUDA_LAYOUT=dynamic: this
// rank's receive parameters for the dispatch_data that follows (LayoutSlot), so that its senders
// place their rows at every receiver without a ready message.
struct LayoutPublish {
  bool on;
  int warps2, chunk;
  long long capacity, window;
};

// dispatch_notify: one block exchanges the counts and per-expert counts and writes the true
// recv_src_counts, tokens_per_expert, num_recv, group_max_tokens.
__global__ void notify_kernel(uint8_t* const* peers, int rank, int num_ranks, int lpr, int N,
                              const int* cum, const int* ecount, int* recv_src_counts,
                              int* tokens_per_expert, int* num_recv, int* num_dropped,
                              int* group_max, int* host_counts, int host_ticket,
                              HostError* host_error, unsigned long long timeout_ns,
                              LayoutPublish publish) {
  __shared__ int s_cnt[kMaxRanks], s_ntok[kMaxRanks];
  __shared__ unsigned long long s_seq;
  __shared__ int s_fail;
  const int G = num_ranks, r = rank, tid = threadIdx.x;
  uint8_t* ctrl = peers[r];
  LocalState* ls = local_state(ctrl);
  const WaitCtx ctx{ls, host_error, timeout_ns, kOpNotify, r};
  if (tid == 0) {
    s_seq = *reinterpret_cast<volatile unsigned long long*>(&ls->seq);
    s_fail = aborted(ctx) ? 1 : 0;
  }
  __syncthreads();
  if (s_fail) return;
  const int parity = static_cast<int>(s_seq & 1ull);
  const unsigned long long e0 = epoch_of(s_seq, 0);
  for (int i = tid; i < G * lpr; i += blockDim.x) {
    const int d = i / lpr, j = i - d * lpr;
    notify_experts(peers[d], parity)[r * lpr + j] = ecount[d * lpr + j];
  }
  for (int d = tid; d < G; d += blockDim.x) {
    NotifySlot* slot = notify_slot(peers[d], parity, r);
    slot->count = cum[static_cast<size_t>(d) * (N + 1) + N];
    slot->n_tokens = N;
    if (publish.on)  // each receiver copies it into its stash below, for its dispatch_data
      store_layout(
          layout_slot(peers[d], parity, r), G,
          [&](int i) { return cum[static_cast<size_t>(i) * (N + 1) + N]; }, N, publish.warps2,
          publish.chunk, publish.capacity, publish.window);
  }
  __threadfence_system();
  __syncthreads();
  for (int d = tid; d < G; d += blockDim.x) {
    if (publish.on) st_release_sys(&layout_slot(peers[d], parity, r)->flag, e0);
    st_release_sys(&notify_slot(peers[d], parity, r)->flag, e0);
  }
  for (int s = tid; s < G; s += blockDim.x) {
    NotifySlot* slot = notify_slot(ctrl, parity, s);
    if (!wait_flag(&slot->flag, e0, ctx, kPhaseNotify, s)) s_fail = 1;
    s_cnt[s] = ld_volatile_int(&slot->count);
    s_ntok[s] = ld_volatile_int(&slot->n_tokens);
    if (publish.on)  // s's layout, released with its counts: into this rank's stash
      copy_layout(layout_stash(ctrl, s), layout_slot(ctrl, parity, s), G);
  }
  __syncthreads();
  if (s_fail) return;
  for (int j = tid; j < lpr; j += blockDim.x) {
    const int v = received_expert_pairs(ctrl, parity, G, lpr, j);
    tokens_per_expert[j] = v;
    if (host_counts) host_counts[3 + j] = v;
  }
  for (int s = tid; s < G; s += blockDim.x) recv_src_counts[s] = s_cnt[s];
  if (tid == 0) {
    const ExchangeTotals totals = exchange_totals(s_cnt, s_ntok, G);
    if (num_recv) *num_recv = totals.rows;
    if (num_dropped) *num_dropped = 0;
    if (group_max) *group_max = totals.max_tokens;
    if (host_counts) store_host_totals(host_counts, totals);
  }
  // host_ticket: the host waits for it instead of the stream (dispatch_notify_wait), so it goes
  // out after every other host entry is visible.
  if (host_ticket) __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    if (host_ticket) *reinterpret_cast<volatile int*>(&host_counts[3 + lpr]) = host_ticket;
    *reinterpret_cast<volatile unsigned long long*>(&ls->seq) = s_seq + 1;
  }
}

}  // namespace

void dispatch_notify(Buffer& buffer, const DispatchArgs& a, Stream stream) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  std::lock_guard<std::mutex> lock(buffer.op_mutex());
  DeviceGuard guard(buffer.device());
  const int G = buffer.num_ranks();
  FA2A_CHECK(a.num_experts <= kMaxExpertsNotify, "num_experts=", a.num_experts,
             " exceeds the CUDA count exchange's limit of ", kMaxExpertsNotify);
  FA2A_CHECK(G >= 1 && G <= kMaxRanks, "group size ", G, " is not supported");
  FA2A_CHECK(a.num_experts > 0 && a.num_experts % G == 0, "num_experts=", a.num_experts,
             " must be a positive multiple of the group size ", G);
  // The counts must reach the host, which a captured (not yet launched) kernel never does: fail
  // here rather than in a wait that can only time out.
  FA2A_CHECK(!capturing(s),
             "dispatch_notify: the stream is capturing a CUDA graph, and the dynamic dispatch "
             "needs its counts on the host; capture a dispatch with a static capacity instead");
  CudaState& st = cuda_state(buffer);
  check_no_error(st, buffer);
  if (a.host_ticket != 0) check_host_wait_env();  // dispatch_notify_wait's mode, before launching
  const int lpr = a.num_experts / G;
  // host_counts: written by the kernel when it can (pinned memory, UVA), else into device scratch
  // and copied after the sync below (e.g. memory pinned by cudaHostRegister on a device that
  // cannot use the pointer); the same values either way.
  const bool direct = a.host_counts && device_writable_host(a.host_counts);
  const Scratch& scratch =
      ensure_scratch(st, G, std::max<int64_t>(a.num_tokens, 1), a.num_experts, s);
  int* counts_out = a.host_counts ? (direct ? a.host_counts : scratch.counts_stage) : nullptr;
  // host_ticket with device-writable host_counts: no wait here (dispatch_notify_wait), so the
  // caller can queue the data kernel right behind the exchange.
  const bool no_wait = direct && a.host_ticket != 0;
  // With the send lists: dispatch_data reuses this scan (CudaState::notified), so that none runs
  // between the host sync and its data kernel (~9 us at N = 4096, run 51's kernel times).
  const bool idx64 = a.idx_dtype == DType::kI64;
  st.notified.topk_idx = nullptr;
  launch_route_scan(a.topk_idx, idx64, static_cast<int>(a.num_tokens), a.num_topk, a.num_experts, G,
                    scratch, true, s);
  // FUSED_A2A_CUDA_LAYOUT=dynamic: the receive parameters of the dispatch_data to follow (its
  // capacity: next_capacity, or none where it has num_recv rows, so that nothing is dropped)
  LayoutPublish publish{layout_dynamic_env() && G <= kLayoutMaxRanks, 0, 0, 0, 0};
  if (publish.on) {
    const DispatchGeometry geo = dispatch_geometry(st, buffer, a);
    publish.warps2 = geo.warps2;
    publish.chunk = geo.max_chunk;
    publish.window = geo.window;
    publish.capacity = a.next_capacity > 0 ? a.next_capacity : (1ll << 40);
  }
  notify_kernel<<<1, 256, 0, s>>>(
      reinterpret_cast<uint8_t* const*>(buffer.peer_table()), buffer.rank(), G, lpr,
      static_cast<int>(a.num_tokens), scratch.cum, scratch.ecount, a.recv_src_counts,
      a.tokens_per_expert, a.num_recv, a.num_dropped, a.group_max_tokens, counts_out,
      no_wait ? a.host_ticket : 0, st.host_error, timeout_ns(), publish);
  check_launch("dispatch_notify");
  if (!no_wait) sync_and_check(st, buffer, s, "dispatch_notify");
  st.notified = {a.topk_idx, a.num_tokens,   a.num_topk, a.num_experts,
                 idx64,      st.scratch_gen, publish.on};
  if (a.host_counts && !direct) {
    FA2A_CUDA_CHECK(
        cudaMemcpy(a.host_counts, scratch.counts_stage,
                   static_cast<size_t>(3 + lpr) * sizeof(int32_t), cudaMemcpyDeviceToHost),
        "dispatch_notify: copying the counts to host_counts");
  }
  if (a.host_ticket && !no_wait) a.host_counts[3 + lpr] = a.host_ticket;
}

void dispatch_notify_wait(Buffer& buffer, const int32_t* host_counts, int num_local,
                          int32_t ticket) {
  // The exchange reports a missing peer through host_error within timeout_ns(); the deadline
  // is a backstop for a kernel that never runs (e.g. queued behind a faulted one). No stream
  // query: the data kernel queued behind the exchange keeps the stream busy.
  wait_host_ticket(cuda_state(buffer), buffer, host_counts + 3 + num_local, ticket, nullptr,
                   "dispatch_notify_wait");
}

}  // namespace fa2a::cuda
