// Per-platform implementations of the HybridEP ops in fused_a2a/hybrid.h. core/hybrid_ops.cc
// validates the arguments once and routes to one of these by the buffer's platform.
#pragma once

#include "fused_a2a/hybrid.h"

namespace fa2a::cpu {
int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& args);
// cached: the combine-backward re-dispatch (reads the handle, never writes it).
void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& args, bool cached);
void hybrid_combine(Buffer& buffer, const HybridCombineArgs& args);
// Bytes of one dispatched row in a CPU message, and of one combine row.
size_t hybrid_dispatch_row_bytes(int64_t hidden, size_t value_bytes, bool scales, bool probs,
                                 int num_local_experts);
size_t hybrid_combine_row_bytes(int64_t hidden, size_t value_bytes);
}  // namespace fa2a::cpu

// Defined by the CUDA backend (csrc/kernels/cuda/) once HybridEP kernels exist; until then
// core/hybrid_cuda_stubs.cc provides stubs that raise NotImplementedError.
namespace fa2a::cuda {
void hybrid_dispatch(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
void hybrid_dispatch_cached(Buffer& buffer, const HybridDispatchArgs& args, Stream stream);
void hybrid_combine(Buffer& buffer, const HybridCombineArgs& args, Stream stream);
}  // namespace fa2a::cuda
