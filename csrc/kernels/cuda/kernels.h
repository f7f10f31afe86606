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

// The tiled route scan's first pass only (masks, tile_count, tile_ecount of `scratch`): for the
// static dispatch with FUSED_A2A_CUDA_SCAN=fused, whose kernel runs the second pass.
struct ScanTiles {
  int per;    // tokens per thread of a tile (a tile is per x kScanThreads tokens)
  int tiles;  // tiles (blocks of each pass), at most kMaxScanTiles
};
ScanTiles launch_route_masks(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                             int num_experts, int num_ranks, const Scratch& scratch,
                             cudaStream_t stream);

// The device a stream belongs to (the current device for the legacy default stream).
int stream_device(cudaStream_t stream);

}  // namespace fa2a::cuda
