// Launchers shared between the files of the CUDA backend.
#pragma once

#include <cuda_runtime.h>

#include "fused_a2a/ops.h"
#include "scan_pass2.cuh"
#include "state.h"

namespace fa2a::cuda {

// cum / send_list / ecount of `scratch` for this rank's routing: one block per destination up to
// 1024 tokens, two passes over tiles above (FUSED_A2A_CUDA_SCAN=block|tiles forces one).
void launch_route_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                       int num_experts, int num_ranks, const Scratch& scratch, bool want_list,
                       cudaStream_t stream);

// The route scan of the static dispatch and the combine where fused_scan (state.h) holds, whose
// kernels run its second pass (scan_pass2.cuh): route_mask_kernel launched on `stream` for the
// first pass, or with FUSED_A2A_CUDA_SCAN_PASS1=fused the first pass's arguments for the kernel
// itself (pairs: it counts the pairs per expert too, tile_ecount; the launched pass always does).
// The second pass writes the send lists (list) and / or every cum[d][t] (cum); cum[d][N] always.
ScanPass2 launch_fused_scan(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                            int num_experts, int num_ranks, const Scratch& scratch, bool list,
                            bool cum, bool pairs, cudaStream_t stream);

// The dispatch data kernel's receive geometry for `a` on this buffer: its window (rows a round),
// largest chunk, and warps2 = chunks a sender warp x its blocks x sender warps (chunk rows ~
// rows / warps2). dispatch_notify publishes it with FUSED_A2A_CUDA_LAYOUT=dynamic.
struct DispatchGeometry {
  long long window;
  int max_chunk;
  int warps2;
};
DispatchGeometry dispatch_geometry(const CudaState& st, const Buffer& buffer,
                                   const DispatchArgs& a);

// The device a stream belongs to (the current device for the legacy default stream).
int stream_device(cudaStream_t stream);

}  // namespace fa2a::cuda
