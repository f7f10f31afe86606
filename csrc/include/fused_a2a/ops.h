// The C++ API of fused_a2a: normal-mode (DeepEP-style) MoE dispatch / combine on raw pointers.
// Semantics: ../shared/docs/SEMANTICS.md section 1. Every pointer lives in the memory of the
// buffer's platform (host memory for kCPU, device memory for kCUDA); `stream` is a cudaStream_t
// for kCUDA and ignored for kCPU. Notation: G ranks, this rank r, N tokens here, H hidden, K top-k,
// E experts, L = E / G local experts, C = capacity (rows of the receive-side outputs).
//
// Optional inputs are "absent" when their pointer is null; with N = 0 a present input must still
// pass a non-null pointer (never dereferenced), since presence must agree across ranks.
//
// Every op is collective over the buffer's group: all ranks call the same ops in the same order.
// A peer that does not arrive within timeout_seconds() makes the op throw ErrorKind::kTimeout
// naming the op, the phase and the missing ranks.
#pragma once

#include <cstdint>
#include <vector>

#include "fused_a2a/buffer.h"
#include "fused_a2a/config.h"

namespace fa2a {

struct Stream {
  void* handle = nullptr;  // cudaStream_t on kCUDA
};

// Local (no communication). topk_idx [N,K] i32|i64 with -1 = no expert.
// Outputs: num_tokens_per_rank [G] i32, num_tokens_per_expert [E] i32, is_token_in_rank [N,G]
// bool (one byte). A token counts once per rank however many of its experts it picked.
void layout(Platform platform, Stream stream, const void* topk_idx, DType idx_dtype,
            int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
            int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert,
            uint8_t* is_token_in_rank);

// Dispatch. Receive order: source rank ascending, then source token ascending. Rows that do not
// fit the capacity C are dropped from the end of that order (highest source rank / token first).
struct DispatchArgs {
  // Inputs of this rank.
  const void* x = nullptr;  // [N,H] x_dtype (f32, f16, bf16; e4m3 with x_scales)
  DType x_dtype = DType::kBF16;
  int64_t num_tokens = 0;           // N (may differ between ranks)
  int64_t hidden = 0;               // H (equal on all ranks)
  const float* x_scales = nullptr;  // [N, H/128] f32 for e4m3 rows, else null
  const void* topk_idx = nullptr;   // [N,K] idx_dtype, -1 = none, else in [0, E)
  DType idx_dtype = DType::kI64;
  int num_topk = 0;                     // K
  const float* topk_weights = nullptr;  // [N,K] f32; null: weights not carried
  int num_experts = 0;                  // E (multiple of G)

  // Outputs of this rank (receive side). Rows >= num_recv are zeros; their indices -1, weights 0.
  int64_t capacity = 0;              // C
  void* recv_x = nullptr;            // [C,H] x_dtype
  float* recv_x_scales = nullptr;    // [C,H/128] when x_scales
  int32_t* recv_topk_idx = nullptr;  // [C,K] expert - r*L where owned, else -1; null: not wanted
  // The same indices as int64, instead of recv_topk_idx (at most one of the two): torch returns
  // them in topk_idx's dtype, and this saves a conversion kernel after the dispatch.
  int64_t* recv_topk_idx64 = nullptr;
  float* recv_topk_weights = nullptr;  // [C,K]; null: not wanted (needs topk_weights)

  // Handle (receive side), written by dispatch / dispatch_notify, read by combine and by a cached
  // dispatch. recv_src_counts [G] i32: rows from each source (after the notify: true counts; after
  // the data phase: kept counts). recv_src_token [C] i32: source token index of each row, -1 past
  // the end. tokens_per_expert [L] i32 (kept pairs). num_recv, num_dropped, group_max_tokens: [1]
  // i32 (group_max_tokens = max N over the group).
  int32_t* recv_src_counts = nullptr;
  int32_t* recv_src_token = nullptr;
  int32_t* tokens_per_expert = nullptr;
  int32_t* num_recv = nullptr;
  int32_t* num_dropped = nullptr;
  int32_t* group_max_tokens = nullptr;
  // dispatch_notify only, optional: [3 + L] i32 in host memory the device can write (CUDA:
  // pinned, e.g. cudaHostAlloc; CPU: any), filled with num_recv, num_dropped (0),
  // group_max_tokens and tokens_per_expert by the time the call returns, so that the caller sizes
  // its outputs without a device-to-host copy and a second sync.
  int32_t* host_counts = nullptr;
  // dispatch_notify: nonzero with host_counts of [4 + L] entries: host_counts[3 + L] is set to
  // host_ticket after the other entries, and on CUDA (with device-writable host_counts) the call
  // returns once the exchange is launched, without waiting: the caller may launch dispatch_data
  // (with a capacity no source can overflow) and then dispatch_notify_wait.
  // dispatch (static) too: the same host counts (the true ones, as dispatch_notify's) and ticket,
  // written by the kernel once the counts are exchanged (CUDA: pinned host_counts, G <= 8 with
  // the layout notify), so dispatch_notify_wait returns before the rows have moved. Torch's
  // speculative path uses it by default (FUSED_A2A_TORCH_SPECULATIVE, README).
  int32_t host_ticket = 0;
  // dispatch_notify on CUDA with FUSED_A2A_CUDA_LAYOUT=dynamic: the capacity of the
  // dispatch_data that follows, published to every rank (0: its exact size, nothing dropped).
  int64_t next_capacity = 0;
  // dispatch_data: false lets the backend leave rows >= num_recv unwritten (the caller drops
  // them; the CUDA kernel skips them, the CPU backend still zeroes them).
  bool zero_padding = true;

  int num_sms = 0;        // CUDA: SMs the communication kernels may use (0: the default, 24)
  uint64_t call_tag = 0;  // the frontend's id of the call site (0: none); ranks must agree
};

// Static shapes (JAX; torch with a worst-case size): notify + data in one collective call.
void dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream);
// Dynamic shapes (torch default): phase 1 exchanges counts only and writes recv_src_counts (true),
// tokens_per_expert (true), num_recv (true total) and group_max_tokens; the caller reads num_recv,
// allocates C = num_recv rows and calls phase 2.
void dispatch_notify(Buffer& buffer, const DispatchArgs& args, Stream stream);
// Waits (timeout_seconds(), then ErrorKind::kTimeout) until host_counts [4 + L] of a
// dispatch_notify with host_ticket = ticket holds its counts, i.e. host_counts[3 + L] == ticket;
// a timeout the exchange itself reported is raised as that error.
void dispatch_notify_wait(Buffer& buffer, const int32_t* host_counts, int num_local,
                          int32_t ticket);
// Phase 2, and the cached dispatch (combine's backward): moves the rows. Needs recv_src_counts and
// group_max_tokens filled in (by dispatch_notify or from a handle); clips recv_src_counts to the
// kept counts in place. A cached dispatch passes the handle's topk_idx and no weights.
void dispatch_data(Buffer& buffer, const DispatchArgs& args, Stream stream);
// The cached dispatch (combine's backward): x sent where the handle's dispatch sent its rows, into
// recv_x [C,H] with the handle's capacity C; the args as dispatch_data's, plus tokens_per_expert,
// num_recv and num_dropped (scratch the op may overwrite with the values the handle holds). CPU:
// dispatch_data. CUDA: a static dispatch of the same topk_idx and capacity where the static
// kernel's count exchange runs (G <= 8, FUSED_A2A_CUDA_LAYOUT not "ready"): it recounts the
// handle's counts and places the same rows (the order is a function of every rank's topk_idx and
// C), with the static path's receivers (fused route scan, pushing warps) and direct rows without a
// ready message; FUSED_A2A_CUDA_CACHED=data keeps dispatch_data.
void cached_dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream);

// Combine: out[t] = sum over ranks rho ascending of y_rho[row of t on rho], fp32 accumulation from
// 0.0f, one rounding to y's dtype; a token routed nowhere (or whose rows were all dropped) gets 0.
struct CombineArgs {
  const void* y = nullptr;  // [C,H] y_dtype (f32, f16, bf16)
  DType y_dtype = DType::kBF16;
  int64_t num_rows = 0;  // C (rows of y; only the first num_recv are read)
  int64_t hidden = 0;
  const float* weights = nullptr;  // [C,K] f32 carried back slot by slot; null: none
  int num_topk = 0;
  // false: out_weights[t,k] = sum over ranks (ascending, fp32 from 0.0f).
  // true (dispatch backward): out_weights[t,k] = the value from the rank that owns topk_idx[t,k],
  // 0 where topk_idx[t,k] = -1 or that row was dropped.
  bool weights_owner_only = false;

  // The dispatch handle of this rank.
  const int32_t* recv_src_counts = nullptr;   // [G] kept counts
  const int32_t* recv_src_token = nullptr;    // [C]
  const int32_t* group_max_tokens = nullptr;  // [1]
  const void* topk_idx = nullptr;             // [N,K] this rank's routing (send side)
  DType idx_dtype = DType::kI64;
  int num_experts = 0;

  int64_t num_tokens = 0;        // N of this rank (rows of out)
  void* out = nullptr;           // [N,H] y_dtype
  float* out_weights = nullptr;  // [N,K] when weights

  int num_sms = 0;        // CUDA: SMs the communication kernels may use (0: the default, 24)
  uint64_t call_tag = 0;  // the frontend's id of the call site (0: none); ranks must agree
};

// Throws ErrorKind::kValue naming the first entry of topk_idx [N,K] (host memory) that is neither
// -1 nor in [0, E).
void check_topk_values(const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
                       int num_experts);

void combine(Buffer& buffer, const CombineArgs& args, Stream stream);

// Benchmarks: out [2] u32 = the low and high 32 bits of a nanosecond clock read when the stream
// reaches this call: the host's steady clock on kCPU (read now), the GPU's %globaltimer on kCUDA
// (a one-thread kernel). The difference of two reads on one device times the work between them.
void read_clock(Platform platform, Stream stream, uint32_t* out);

// Issue 7's link ceiling on the first num_gpus GPUs of this process: each pushes bytes_per_peer
// to every other at once (`sms` blocks, every block of every GPU released together:
// csrc/kernels/cuda/link_probe.cuh), the faster of two ways: bulk async copies, 4 warps x 3
// stages of 16 KB a block; the same with 12 plain-store warps beside them, every warp claiming
// 14 KB rows. The slowest GPU's egress GB/s, median of reps. CUDA only.
double link_ceiling_gbps(int num_gpus, int sms, size_t bytes_per_peer, int reps);

// What was compiled in: {"cuda": bool, "cuda_arch": "...", "cuda_version": int, ...} as text.
// Diagnostics (CUDA, FUSED_A2A_CUDA_TRACE=1 when the buffer's first CUDA op ran): per-warp phase
// times in ns of the dispatch kernels since the last reset, kTraceWords words (layout in
// csrc/kernels/cuda/state.h); empty when tracing is off. reset: zero them after reading.
std::vector<uint64_t> cuda_dispatch_trace(Buffer& buffer, bool reset);
// Host time of this buffer's CUDA op calls since the last reset: 8 words, the dispatch's (static,
// data and cached calls) then the combine's: calls, then ns to the route scan's launch, to the
// kernel's parameters, of the kernel's launch (csrc/kernels/cuda/state.h, HostPhaseTimer);
// empty for a buffer with no CUDA op yet, or without CUDA.
std::vector<uint64_t> cuda_host_phases(Buffer& buffer, bool reset);

bool build_has_cuda();
const char* build_cuda_arch();
int build_cuda_version();
int cuda_device_count();  // 0 without a GPU or a driver (never throws)

}  // namespace fa2a
