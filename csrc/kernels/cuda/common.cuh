// Device-side building blocks of the CUDA backend shared by the normal-mode and HybridEP kernels:
// the control region, flags and bounded waits (control.cuh), row copies and the bulk-copy
// pipeline (copy.cuh), and the item walk, round barriers and index helpers of the kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "control.cuh"
#include "copy.cuh"

namespace fa2a::cuda {

// Item idx of a round's rows x cols rectangle of (chunk, peer column) items, chunk-major (the
// columns innermost: every peer's chunk c before any chunk c + 1) or column-major. Each warp
// visits only its own items (benchmarks/NOTES.md, session 5): idx = warp, warp + warps, ..., or
// the numbers it claims (next_item). Host-callable for tests/cuda_host/rect_items_check.cu.
struct RectItem {
  long long chunk;
  int col;
};
__host__ __device__ __forceinline__ RectItem rect_item(long long idx, long long rows, int cols,
                                                       bool col_major) {
  if (col_major) return RectItem{idx % rows, static_cast<int>(idx / rows)};
  return RectItem{idx / cols, static_cast<int>(idx % cols)};
}

// Phase times of one warp of the dispatch or combine kernel (lane 0 keeps them; written to the
// host-mapped trace once, at the end of the role; slots: state.h). Durations in SM cycles, times
// since kernel start in ns. Compiled in only with -DFA2A_CUDA_TRACE=1 (CMAKE_ARGS), so that the
// kernels' registers are untouched otherwise.
#ifndef FA2A_CUDA_TRACE
#define FA2A_CUDA_TRACE 0
#endif
constexpr int kTraceWarps = 64 * 16;
constexpr int kTraceSlots = 13;
constexpr int kTraceWords = kTraceWarps * kTraceSlots;
struct WarpTrace {
#if FA2A_CUDA_TRACE
  unsigned long long v[kTraceSlots] = {};
  __device__ static long long now() { return clock64(); }
  __device__ void add(int slot, long long since) { v[slot] += clock64() - since; }
  // The time since t0 (kernel start, globaltimer ns); no timer read in untraced builds.
  __device__ void stamp(int slot, unsigned long long t0) { v[slot] = globaltimer() - t0; }
  __device__ void count(int slot) { v[slot] += 1; }
  // The kernel's prologue marks (thread 0's, in the kernel's shared state) into slots 11 and 12.
  __device__ static void mark(unsigned long long* at, unsigned long long t0) {
    *at = globaltimer() - t0;
  }
  __device__ void marks(const unsigned long long* t_marks) {
    v[11] = t_marks[0];
    v[12] = t_marks[1];
  }
  // trace: the host-mapped [kTraceWords] (CudaState::trace) or null; slot block * 16 + warp.
  __device__ void flush(unsigned long long* trace, int warp, int lane) {
    if (!trace || lane != 0) return;
    unsigned long long* out = trace + (static_cast<size_t>(blockIdx.x) * 16 + warp) * kTraceSlots;
    for (int i = 0; i < kTraceSlots; ++i) out[i] += v[i];
  }
#else
  __device__ static long long now() { return 0; }
  __device__ void add(int, long long) {}
  __device__ void stamp(int, unsigned long long) {}
  __device__ void count(int) {}
  __device__ static void mark(unsigned long long*, unsigned long long) {}
  __device__ void marks(const unsigned long long*) {}
  __device__ void flush(unsigned long long*, int, int) {}
#endif
};

constexpr int kMaxThreads = 512;  // threads of a communication block (send + receive warps)

// A sender warp's next item number after q (items are a round's chunks, each round's numbered
// after the previous round's; start from q = first - stride, first the warp's dealt item). Claimed:
// lane 0 takes the next number from a per-rank counter (LocalState::items_claimed, reset by the
// op's last block) and broadcasts it, so a warp that drew small or local items takes more of them.
// Dealt: q + stride, which with stride a multiple of the columns pins a warp to one column. The
// numbers grow along each warp's walk, so every item of round k is taken before any of round k + 1.
__device__ __forceinline__ long long next_item(bool claim, unsigned int* counter, long long q,
                                               int stride, int lane) {
  if (!claim) return q + stride;
  unsigned int v = 0;
  if (lane == 0) v = atomicAdd(counter, 1u);
  return static_cast<long long>(__shfl_sync(0xffffffffu, v, 0));
}

// next_item for a sender warp of the dispatch or the combine, its cycles in trace slot 10
__device__ __forceinline__ long long traced_next_item(WarpTrace& tr, bool claim,
                                                      unsigned int* counter, long long q,
                                                      int stride, int lane) {
  const long long t_claim = WarpTrace::now();
  const long long next = next_item(claim, counter, q, stride, lane);
  tr.add(10, t_claim);
  return next;
}

// Publish a chunk copied by the whole warp with plain stores: every lane's stores become visible
// system-wide before the flag.
__device__ __forceinline__ void warp_release_flag(unsigned long long* flag, unsigned long long v,
                                                  int lane) {
  __threadfence_system();
  __syncwarp();
  if (lane == 0) st_release_sys(flag, v);
  __syncwarp();
}

// Receiver warps of all blocks finished round k (each adds 1 to *counter per round): the warp
// that completes the count runs `last`; then every warp waits until the count is complete, so
// that no warp counts round k + 1 before round k is complete everywhere. Lane 0 only.
template <typename F>
__device__ inline bool round_barrier(unsigned int* counter, unsigned int total, const WaitCtx& ctx,
                                     F last) {
  __threadfence();
  const unsigned int done = atomicAdd(counter, 1u) + 1u;
  if (done == total) last();
  unsigned long long start = 0;
  for (unsigned int it = 0; *reinterpret_cast<volatile unsigned int*>(counter) < total; ++it) {
    if (it > 64) __nanosleep(128);
    if ((it & 255u) == 255u) {
      if (aborted(ctx)) return false;
      if (start == 0) start = globaltimer();
      if (globaltimer() - start > ctx.timeout_ns) {
        report_timeout(ctx, kPhaseRound, ctx.rank);
        return false;
      }
    }
  }
  __threadfence();
  return true;
}

// End of round k for one of the nw receiving warps of the grid (every warp calls it once per
// round): the round barrier over them, whose last arrival tells every peer that this rank's
// window is free for round k + 1 (message `kind`'s slot of this rank, epoch of round k + 1).
// ctrl: this rank's control region (peers[r]). Whole warp; false on a timeout or abort.
__device__ __forceinline__ bool warp_next_round(const WaitCtx& ctx, uint8_t* ctrl,
                                                uint8_t* const* peers, int G, int r, int kind,
                                                unsigned long long seq, long long k, int nw,
                                                int lane) {
  __syncwarp();
  int good = 1;
  if (lane == 0) {
    const int parity = static_cast<int>(seq & 1ull);
    good =
        round_barrier(&local_state(ctrl)->round_done, static_cast<unsigned int>((k + 1) * nw), ctx,
                      [&] {
                        __threadfence_system();
                        for (int s = 0; s < G; ++s)
                          if (s != r)
                            st_release_sys(&msg_slot(peers[s], kind, parity, r)->epoch,
                                           epoch_of(seq, static_cast<int>(k + 1)));
                      })
            ? 1
            : 0;
  }
  return __shfl_sync(0xffffffffu, good, 0) != 0;
}

// Warp-wide bounded wait: lane 0 spins, then every lane acquires the flag itself so that its
// own later accesses are ordered after the peer's release.
__device__ inline bool warp_wait_flag(const unsigned long long* flag, unsigned long long target,
                                      const WaitCtx& ctx, int phase, int peer, int lane) {
  int ok = 1;
  if (lane == 0) ok = wait_flag(flag, target, ctx, phase, peer) ? 1 : 0;
  ok = __shfl_sync(0xffffffffu, ok, 0);
  if (ok) {
    (void)ld_acquire_sys(flag);
    fence_proxy_async();
  }
  return ok != 0;
}

// Rank of expert e, or -1 for "no expert" (-1 and, defensively, anything out of range). 32-bit
// division: e < num_experts fits an int, and a 64-bit division is a long subroutine (it ran once
// per metadata word in the dispatch's senders).
__device__ __forceinline__ int owner_of(long long e, int num_experts, int lpr) {
  return (e >= 0 && e < num_experts) ? static_cast<int>(e) / lpr : -1;
}

// Index loads (int32 or int64 topk_idx).
__device__ __forceinline__ long long load_idx(const void* p, bool idx64, long long i) {
  return idx64 ? __ldg(reinterpret_cast<const long long*>(p) + i)
               : static_cast<long long>(__ldg(reinterpret_cast<const int*>(p) + i));
}

}  // namespace fa2a::cuda
