// Launchers shared between the files of the CUDA backend.
#pragma once

#include <cuda_runtime.h>

#include "state.h"

namespace fa2a::cuda {

// cum / send_list / ecount of `scratch` for this rank's routing: one block per destination up to
// 1024 tokens, two passes over tiles above (FUSED_A2A_CUDA_SCAN=block|tiles forces one).
void launch_route_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                       int num_experts, int num_ranks, const Scratch& scratch, bool want_list,
                       cudaStream_t stream);

// The device a stream belongs to (the current device for the legacy default stream).
int stream_device(cudaStream_t stream);

}  // namespace fa2a::cuda
