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

// The tiled route scan's first pass only (masks, tile_count, tile_ecount of `scratch`): for the
// static dispatch and the combine where fused_scan (state.h) holds; their kernels run the second.
struct ScanTiles {
  int per;    // tokens per thread of a tile (a tile is per x kScanThreads tokens)
  int tiles;  // tiles (blocks of each pass), at most kMaxScanTiles
};
ScanTiles launch_route_masks(const void* topk_idx, bool idx64, int num_tokens, int num_topk,
                             int num_experts, int num_ranks, const Scratch& scratch,
                             cudaStream_t stream);
// The tiles of launch_route_masks, checked as it checks them, for a kernel that runs the first
// pass itself (scan_pass1_in_kernel).
ScanTiles route_mask_tiles(int num_tokens, int num_experts);
// The second pass's arguments for a kernel that runs it after launch_route_masks: the send
// lists (list) and / or every cum[d][t] (cum); cum[d][N] always.
inline ScanPass2 fused_scan_pass2(const ScanTiles& st, const Scratch& scratch, bool list,
                                  bool cum) {
  ScanPass2 a;
  a.tiles = st.tiles;
  a.per = st.per;
  a.masks = scratch.masks;
  a.tile_count = scratch.tile_count;
  a.cum = scratch.cum;
  a.send_list = list ? scratch.send_list : nullptr;
  a.write_cum = cum;
  return a;
}
// The first pass's arguments for a kernel that runs it too; pairs: per expert (tile_ecount).
inline void add_scan_pass1(ScanPass2& a, const void* topk_idx, bool idx64, int num_topk,
                           int num_experts, const Scratch& scratch, bool pairs) {
  a.pass1.topk_idx = topk_idx;
  a.pass1.idx64 = idx64;
  a.pass1.num_topk = num_topk;
  a.pass1.num_experts = num_experts;
  a.pass1.masks = scratch.masks;
  a.pass1.tile_count = scratch.tile_count;
  a.pass1.tile_ecount = pairs ? scratch.tile_ecount : nullptr;
  a.pass1.tile_flag = scratch.tile_flag;
}

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
