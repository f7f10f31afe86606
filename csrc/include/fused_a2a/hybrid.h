// The C++ API of fused_a2a, HybridEP mode: dispatch with permute (rows arrive grouped by local
// expert, padded for grouped GEMMs) and combine with unpermute. Semantics: SEMANTICS.md section 2.
// Notation as in ops.h: G ranks, this rank r, N tokens per rank (equal on every rank), H hidden,
// E = G * L experts, L local experts (rank r owns [r*L, (r+1)*L)), P rows of the permuted outputs,
// p = pad_multiple (0: no padding). Global token id g = src_rank * N + t.
//
// Row layout on rank r (expert-major): for j = 0..L-1, every global token g (ascending) with
// routing_map[g, r*L + j], then zero rows up to a multiple of p. With a static P, rows past the
// padded total are zeros and rows at positions >= P are dropped (overflow flag set); nothing is
// ever written out of bounds.
//
// Every pointer lives in the memory of the buffer's platform; `stream` as in ops.h. All ops are
// collective over the buffer's group. Static P (JAX, CUDA graphs): hybrid_dispatch does everything
// in one call with no host synchronisation. Dynamic P (torch default): hybrid_dispatch_notify, the
// host reads meta[kHybridMetaTotalRows], allocates P rows, then hybrid_dispatch_data.
//
// The handle is a set of caller-owned arrays written by the dispatch and read by combine and by
// the cached re-dispatch (combine's backward):
//   src_expert_counts [G*L] i32  rows from source rank s for local expert j (true counts, before
//                                padding or clipping), at s*L + j
//   row_token         [P] i32    global token g of each row, -1 on padding rows and the tail
//   meta              [4] i32    see kHybridMeta* below
// plus the forward's routing_map (the cached re-dispatch sends rows where it says) and the
// forward's N, L, p, P.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_a2a/buffer.h"
#include "fused_a2a/config.h"
#include "fused_a2a/ops.h"

namespace fa2a {

// Entries of the handle's meta array (int32).
constexpr int kHybridMetaTotalRows = 0;  // padded rows the layout needs (sum over j, unclipped)
constexpr int kHybridMetaOverflow = 1;   // 1 when that total exceeds P (rows were dropped), else 0
constexpr int kHybridMetaNumTokens = 2;  // N, the same on every rank (checked by the notify)
constexpr int kHybridMetaMaxFanout = 3;  // max over all ranks' tokens and destination ranks of the
                                         // number of that rank's local experts the token picked
                                         // (>= 1); sizes the combine rounds
constexpr int kHybridMetaSize = 4;

struct HybridDispatchArgs {
  // Inputs of this rank.
  const void* x = nullptr;  // [N,H] x_dtype: f32, f16, bf16; or e4m3 with x_scales
  DType x_dtype = DType::kBF16;
  int64_t num_tokens = 0;                // N (must be equal on every rank)
  int64_t hidden = 0;                    // H
  const float* x_scales = nullptr;       // [N, H/128] f32 for e4m3 x (passed through), else null
  const uint8_t* routing_map = nullptr;  // [N,E] bool (one byte; nonzero = routed)
  const float* probs = nullptr;          // [N,E] f32; null: probs not carried
  int num_experts = 0;                   // E = G * L
  int num_local_experts = 0;             // L
  int64_t pad_multiple = 0;              // p >= 0 (0: no padding)
  // Quantise f32/f16/bf16 rows to e4m3 per 1x128 block on the send side (H % 128 == 0):
  //   amax = max(max |x_block|, 1e-4f); scale = amax / 448.0f; q = e4m3_rne(x / scale)
  // (all f32, as tests/reference.py fp8_quantize). permuted_x is then e4m3 and permuted_scales
  // holds the scales.
  bool quantize_fp8 = false;

  // Outputs of this rank (receive side), P rows. Padding rows and rows past the padded total are
  // zeros (scales and probs included).
  int64_t num_rows = 0;                  // P
  void* permuted_x = nullptr;            // [P,H] x_dtype, or e4m3 with quantize_fp8
  float* permuted_probs = nullptr;       // [P] probs[g, r*L + j] of each row; needs probs
  float* permuted_scales = nullptr;      // [P, H/128] f32 with quantize_fp8 or e4m3 x, else null
  int32_t* tokens_per_expert = nullptr;  // [L] padded counts, clipped greedily in expert order
                                         // so that they sum to at most P
  // [L] host memory or null; dynamic P only: hybrid_dispatch_notify copies the padded counts
  // there before it returns. They equal the data phase's tokens_per_expert (P is their sum, so
  // nothing is clipped): the caller has them on the host without waiting for the data phase.
  int32_t* tokens_per_expert_host = nullptr;

  // Handle (see above). The notify writes src_expert_counts and meta[TotalRows, NumTokens,
  // MaxFanout]; the data phase writes row_token, tokens_per_expert and meta[Overflow].
  int32_t* src_expert_counts = nullptr;  // [G*L]
  int32_t* row_token = nullptr;          // [P]
  int32_t* meta = nullptr;               // [kHybridMetaSize]

  int num_sms = 0;  // CUDA: SMs the communication kernels may use (0: the default, 24)
};

// Static P: notify + data in one collective call (no host synchronisation).
void hybrid_dispatch(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
// Dynamic P, phase 1: exchanges counts only. Writes src_expert_counts, tokens_per_expert (padded,
// unclipped) and meta (overflow 0). Fails on every rank, with the same ValueError-kind message
// naming each rank's N, when the ranks' N differ. num_rows and the row outputs are not used.
// Returns the padded total P (meta's total rows), already on the host: the caller sizes the
// outputs of phase 2 with it without reading meta back; fills tokens_per_expert_host if given.
int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
// Dynamic P, phase 2: moves the rows, with the handle written by hybrid_dispatch_notify.
void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
// Cached re-dispatch (combine's backward): x [N,H] (f32/f16/bf16) sent where the handle's dispatch
// sent the forward's rows; rows land in the same positions, padding rows and the tail are zeros.
// Reads src_expert_counts and meta, never writes the handle (row_token, tokens_per_expert are
// ignored); probs, if given, are carried as in the forward. quantize_fp8 must be false.
void hybrid_dispatch_cached(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);

// Combine with unpermute: out[t] = sum over ranks rho ascending, then local experts j ascending,
// of y_rho[row(t, j)], fp32 accumulation from 0.0f, one rounding to y's dtype; padding and dropped
// rows are ignored, a token routed nowhere gets +0.0.
struct HybridCombineArgs {
  const void* y = nullptr;  // [P,H] y_dtype (f32, f16, bf16)
  DType y_dtype = DType::kBF16;
  int64_t num_rows = 0;  // P (the dispatch's P on this rank)
  int64_t hidden = 0;
  const float* probs = nullptr;  // [P] f32 carried back; null: none

  // The dispatch handle of this rank.
  const int32_t* src_expert_counts = nullptr;  // [G*L]
  const int32_t* row_token = nullptr;          // [P]
  const int32_t* meta = nullptr;               // [kHybridMetaSize]
  int num_local_experts = 0;                   // L
  int64_t pad_multiple = 0;                    // p of the dispatch

  int64_t num_tokens = 0;      // N (rows of out; must equal meta[kHybridMetaNumTokens])
  void* out = nullptr;         // [N,H] y_dtype
  float* out_probs = nullptr;  // [N,E] f32 when probs: the prob of row(t, j) on rank rho at
                               // column rho*L + j, 0 where (t, e) was not routed or dropped

  int num_sms = 0;  // CUDA: SMs the communication kernels may use (0: the default, 24)
};

void hybrid_combine(Buffer& buffer, const HybridCombineArgs& args, Stream stream);

// Data bytes a buffer needs so that one CPU round carries `rows` tokens of `hidden` values of up
// to `bytes_per_value` bytes (plus FP8 scales, L probs and the routing bits) to each of num_ranks
// ranks, and a combine round at least a few tokens even when a token picks all L local experts of
// a rank. rows <= 0: default_buffer_rows(platform) (buffer.h).
size_t hybrid_buffer_bytes(int64_t hidden, int64_t bytes_per_value, int num_local_experts,
                           int num_ranks, Platform platform, int64_t rows);

}  // namespace fa2a
