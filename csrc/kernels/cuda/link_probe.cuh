// The link-ceiling probe (issue 7): every one of the first G GPUs of this process pushes the same
// bytes to each of the others at once (bulk async copies global -> shared -> peer global, or
// plain 16-byte stores) with a given number of SMs. Used by link_ceiling (probe.cu, the bench's
// ceiling) and benchmarks/link_probe.cu (every mode, as JSON lines).
//
// Two ways to start: "events" (since session 1) launches the GPUs one after the other and times
// each by its own CUDA events, so a GPU runs alone for part of its time (the first to start, the
// last to end) and may push faster than under full contention; "barrier" (session 19) holds every
// block of every GPU at a counter in GPU 0's memory until all are resident, then times each GPU
// from its first block's release to its last block's end (%globaltimer), which is what a
// dispatch whose ranks wait for each other sees.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "state.h"

namespace fa2a::cuda::probe {

// The backend's CUDA check, naming the call (a fa2a::Error, kRuntime)
#define FA2A_PROBE_CHECK(expr) FA2A_CUDA_CHECK(expr, "link probe: " #expr)

constexpr int kMaxPeers = 8;

struct Args {
  const uint8_t* src;
  uint8_t* dst[kMaxPeers];  // peer destinations
  int npeers;
  size_t bytes;  // per peer
  size_t chunk;
  int warps;  // bulk-copy warps a block with tma, else plain-store warps
  int stages;
  uint32_t stage_bytes;
  bool tma;
  // With tma: plain-store warps beside the bulk-copy ones (session 25: do more bytes in flight
  // than a block's rings hold raise the ceiling at few SMs?); all warps then claim their items
  // from *claim (this GPU's, zeroed before each push), so the slower kind takes fewer
  int simt_warps;
  unsigned int* claim;
  // The dispatch's source pattern: destination row r of peer p comes from source row
  // (r * npeers + p) mod rows (chunk = one row), a strided gather as of tokens in order
  bool gather;
  // "barrier" start: every block adds itself to *arrived (GPU 0's memory) and waits for
  // `total`; times[0] = first release, times[1] = last end (ns, %globaltimer), times[2] = 1 if
  // the barrier timed out (5 s: a block that never got resident)
  unsigned int* arrived;
  unsigned int total;
  unsigned long long* times;
};

__device__ inline bool barrier_start(const Args& a) {
  __shared__ int timed_out;
  if (threadIdx.x == 0) {
    timed_out = 0;
    atomicAdd_system(a.arrived, 1u);
    const unsigned long long t0 = globaltimer();
    while (*reinterpret_cast<volatile unsigned int*>(a.arrived) < a.total) {
      if (globaltimer() - t0 > 5000000000ull) {
        timed_out = 1;
        a.times[2] = 1;
        break;
      }
    }
    atomicMin(&a.times[0], globaltimer());
  }
  __syncthreads();
  return !timed_out;
}

__global__ void __launch_bounds__(512, 1) push_kernel(Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int block_warps = a.warps + a.simt_warps;
  const int nw = gridDim.x * block_warps, gw = blockIdx.x * block_warps + warp;
  const bool bulk = a.tma && warp < a.warps;
  const size_t per_warp = (tma_pipe_bytes(a.stage_bytes, a.stages) + 255) & ~size_t(127);
  uint8_t* base = smem + per_warp * warp;
  if (a.arrived && !barrier_start(a)) return;
  TmaPipe pipe;
  if (bulk && lane == 0) pipe.init(base, a.stage_bytes, a.stages, false, 0);  // S - 2 loads ahead
  __syncwarp();
  const size_t chunks = (a.bytes + a.chunk - 1) / a.chunk;
  const size_t items = chunks * a.npeers;
  const bool claimed = a.claim != nullptr;  // dealt, or claimed (simt_warps): next_item
  for (long long q = next_item(claimed, a.claim, gw - nw, nw, lane);
       q < static_cast<long long>(items); q = next_item(claimed, a.claim, q, nw, lane)) {
    const size_t i = static_cast<size_t>(q);
    const int p = static_cast<int>(i % a.npeers);
    const size_t off = (i / a.npeers) * a.chunk;
    size_t n = a.chunk < a.bytes - off ? a.chunk : a.bytes - off;
    size_t from = off;
    if (a.gather) {
      from = ((i / a.npeers) * a.npeers + p) % chunks * a.chunk;
      n = n < a.bytes - from ? n : a.bytes - from;  // the short last row stays in the source
    }
    if (bulk) {
      if (lane == 0) pipe.push_span(a.dst[p] + off, a.src + from, n);
    } else {
      warp_copy_ro(a.dst[p] + off, a.src + from, n, lane);
    }
  }
  if (bulk && lane == 0) pipe.drain();
  if (a.arrived) {
    __syncthreads();
    if (threadIdx.x == 0) atomicMax(&a.times[1], globaltimer());
  }
}

struct Mode {
  bool tma;
  int warps;
  int stages;
  uint32_t stage;
  size_t chunk;
  bool gather = false;  // Args::gather
  int simt_warps = 0;   // Args::simt_warps
  const char* name() const {
    return !tma ? "simt16" : simt_warps ? "bulk+simt" : chunk == 65536 ? "bulk" : "rows";
  }
};
constexpr Mode kBulk4{true, 4, 3, 16384, 65536};  // 4 warps x 3 stages of 16 KB
// kBulk4's warps with 12 plain-store warps beside them, every warp claiming gathered 14 KB rows
// (session 25, run 139: 355-358 GB/s at 12-48 SMs on 4x H200, where kBulk4 reached 328-350)
constexpr Mode kBulkSimt12{true, 4, 3, 16384, 14336, true, 12};

// The buffers of a probe on GPUs [0, G): a source of `bytes` and a destination of (G - 1) x
// `bytes` on each, peer access on, the barrier's counter and the timers. Freed on destruction.
class Setup {
 public:
  Setup(int num_gpus, size_t bytes)
      : G(num_gpus), bytes(bytes), src(G), dst(G), times(G), claims(G) {
    FA2A_CHECK(G >= 2 && G <= kMaxPeers + 1, "link probe: needs 2 to ", kMaxPeers + 1,
               " GPUs, got ", G);
    FA2A_PROBE_CHECK(cudaGetDevice(&previous_));
    for (int g = 0; g < G; ++g) {
      FA2A_PROBE_CHECK(cudaSetDevice(g));
      for (int p = 0; p < G; ++p) {
        if (p == g) continue;
        const cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
        if (e != cudaErrorPeerAccessAlreadyEnabled) FA2A_PROBE_CHECK(e);
        (void)cudaGetLastError();
      }
      FA2A_PROBE_CHECK(cudaMalloc(&src[g], bytes));
      FA2A_PROBE_CHECK(cudaMemset(src[g], 1, bytes));
      FA2A_PROBE_CHECK(cudaMalloc(&dst[g], bytes * (G - 1)));
      FA2A_PROBE_CHECK(cudaMalloc(&times[g], 3 * sizeof(unsigned long long)));
      FA2A_PROBE_CHECK(cudaMalloc(&claims[g], sizeof(unsigned int)));
    }
    FA2A_PROBE_CHECK(cudaSetDevice(0));
    FA2A_PROBE_CHECK(cudaMalloc(&arrived, sizeof(unsigned int)));
  }
  ~Setup() {
    for (int g = 0; g < G; ++g) {
      if (cudaSetDevice(g) != cudaSuccess) continue;
      (void)cudaDeviceSynchronize();
      (void)cudaFree(src[g]);
      (void)cudaFree(dst[g]);
      (void)cudaFree(times[g]);
      (void)cudaFree(claims[g]);
    }
    if (arrived && cudaSetDevice(0) == cudaSuccess) (void)cudaFree(arrived);
    (void)cudaGetLastError();
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  Setup(const Setup&) = delete;
  Setup& operator=(const Setup&) = delete;

  int G;
  size_t bytes;
  std::vector<uint8_t*> src, dst;
  std::vector<unsigned long long*> times;
  std::vector<unsigned int*> claims;  // Args::claim of each GPU
  unsigned int* arrived = nullptr;

 private:
  int previous_ = -1;
};

struct Result {
  std::vector<double> gbps;  // egress of each GPU, median of reps
  double slowest = 0;
  bool timed_out = false;  // the barrier did not see every block
};

// One configuration: reps timed pushes after 2 untimed ones, each GPU's egress bytes / time.
inline Result run(Setup& s, const Mode& m, int sms, bool barrier, int reps) {
  const int G = s.G;
  const size_t smem =
      m.tma ? m.warps * ((tma_pipe_bytes(m.stage, m.stages) + 255) & ~size_t(127)) : 0;
  std::vector<std::vector<float>> ms(G);
  Result res;
  for (int rep = 0; rep < reps + 2; ++rep) {
    std::vector<cudaEvent_t> start(G), stop(G);
    FA2A_PROBE_CHECK(cudaSetDevice(0));
    FA2A_PROBE_CHECK(cudaMemset(s.arrived, 0, sizeof(unsigned int)));
    const unsigned long long times_init[3] = {~0ull, 0ull, 0ull};
    for (int g = 0; g < G; ++g) {
      FA2A_PROBE_CHECK(cudaSetDevice(g));
      FA2A_PROBE_CHECK(
          cudaMemcpy(s.times[g], times_init, sizeof(times_init), cudaMemcpyHostToDevice));
      FA2A_PROBE_CHECK(cudaMemset(s.claims[g], 0, sizeof(unsigned int)));
      FA2A_PROBE_CHECK(cudaDeviceSynchronize());
    }
    for (int g = 0; g < G; ++g) {
      FA2A_PROBE_CHECK(cudaSetDevice(g));
      FA2A_PROBE_CHECK(cudaFuncSetAttribute(
          push_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      Args a{};
      a.src = s.src[g];
      int k = 0;
      for (int p = 0; p < G; ++p)
        if (p != g) a.dst[k++] = s.dst[p] + static_cast<size_t>(g < p ? g : g - 1) * s.bytes;
      a.npeers = G - 1;
      a.bytes = s.bytes;
      a.chunk = m.chunk;
      a.warps = m.warps;
      a.stages = m.stages;
      a.stage_bytes = m.stage;
      a.tma = m.tma;
      a.gather = m.gather;
      a.simt_warps = m.tma ? m.simt_warps : 0;
      a.claim = a.simt_warps ? s.claims[g] : nullptr;
      if (barrier) {
        a.arrived = s.arrived;  // GPU 0's, by peer access
        a.total = static_cast<unsigned int>(sms * G);
        a.times = s.times[g];
      }
      FA2A_PROBE_CHECK(cudaEventCreate(&start[g]));
      FA2A_PROBE_CHECK(cudaEventCreate(&stop[g]));
      FA2A_PROBE_CHECK(cudaEventRecord(start[g]));
      push_kernel<<<sms, 32 * (m.warps + a.simt_warps), smem>>>(a);
      FA2A_PROBE_CHECK(cudaGetLastError());
      FA2A_PROBE_CHECK(cudaEventRecord(stop[g]));
    }
    for (int g = 0; g < G; ++g) {
      FA2A_PROBE_CHECK(cudaSetDevice(g));
      FA2A_PROBE_CHECK(cudaEventSynchronize(stop[g]));
      float t = 0;
      FA2A_PROBE_CHECK(cudaEventElapsedTime(&t, start[g], stop[g]));
      if (barrier) {
        unsigned long long got[3];
        FA2A_PROBE_CHECK(cudaMemcpy(got, s.times[g], sizeof(got), cudaMemcpyDeviceToHost));
        res.timed_out = res.timed_out || got[2] != 0;
        t = static_cast<float>((got[1] - got[0]) * 1e-6);  // ns -> ms
      }
      if (rep >= 2) ms[g].push_back(t);
      (void)cudaEventDestroy(start[g]);
      (void)cudaEventDestroy(stop[g]);
    }
  }
  res.gbps.resize(G);
  res.slowest = 1e30;
  for (int g = 0; g < G; ++g) {
    std::sort(ms[g].begin(), ms[g].end());
    const double t = ms[g][ms[g].size() / 2] * 1e-3;
    res.gbps[g] = static_cast<double>(s.bytes) * (G - 1) / t / 1e9;
    res.slowest = std::min(res.slowest, res.gbps[g]);
  }
  return res;
}

}  // namespace fa2a::cuda::probe
