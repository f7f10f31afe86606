// Per-platform implementations of the ops in fused_a2a/ops.h. core/ops.cc validates the arguments
// once and routes to one of these by the buffer's platform.
#pragma once

#include "fused_a2a/ops.h"

namespace fa2a::cpu {
void layout(const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
            int num_experts, int num_ranks, int32_t* num_tokens_per_rank,
            int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank);
void dispatch_notify(Buffer& buffer, const DispatchArgs& args);
void dispatch_data(Buffer& buffer, const DispatchArgs& args);
void combine(Buffer& buffer, const CombineArgs& args);
}  // namespace fa2a::cpu

namespace fa2a::cuda {
void layout(Stream stream, const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
            int num_experts, int num_ranks, int32_t* num_tokens_per_rank,
            int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank);
void dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream);
void dispatch_notify(Buffer& buffer, const DispatchArgs& args, Stream stream);
void dispatch_notify_wait(Buffer& buffer, const int32_t* host_counts, int num_local,
                          int32_t ticket);
void dispatch_data(Buffer& buffer, const DispatchArgs& args, Stream stream);
void dispatch_cached(Buffer& buffer, const DispatchArgs& args, Stream stream);
void combine(Buffer& buffer, const CombineArgs& args, Stream stream);
void read_clock(Stream stream, uint32_t* out);
// `waiter` waits for the work queued on `waited` so far (an event recorded there now); both
// streams of `device` (a null handle: its legacy default stream).
void stream_wait(int device, Stream waiter, Stream waited);
// The id of the CUDA graph capture `stream` (of `device`) takes part in, 0 when it is not
// capturing (the output arena's blocks for captures, fused_a2a/arena.h).
uint64_t capture_id(int device, Stream stream);
}  // namespace fa2a::cuda
