// Link-ceiling probe: every GPU of this process pushes `bytes` to each of its peers at once (bulk
// async copies global -> shared -> peer global, or plain 16-byte stores), with a given number of
// SMs. Prints one JSON line per configuration: per-GPU egress GB/s (median of reps) and the
// slowest GPU.
// Two ways to start (JSON "start"): "events" (since session 1) launches the GPUs one after the
// other and times each by its own CUDA events, so a GPU runs alone for part of its time (the
// first to start, the last to end) and may push faster than under full contention; "barrier"
// (session 19) holds every block of every GPU at a barrier (a counter in GPU 0's memory) until
// all are resident, then times each GPU from its first block's release to its last block's end
// (%globaltimer), which is what a dispatch whose ranks wait for each other sees.
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a
//   -I csrc/include -I csrc/kernels/cuda benchmarks/link_probe.cu -o link_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.cuh"

using namespace fa2a::cuda;

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

struct Args {
  const uint8_t* src;
  uint8_t* dst[8];  // peer destinations
  int npeers;
  size_t bytes;  // per peer
  size_t chunk;
  int warps;
  int stages;
  uint32_t stage_bytes;
  bool tma;
  // "barrier" start: every block adds itself to *arrived (GPU 0's memory) and waits for
  // `total`; times[0] = first release, times[1] = last end (ns, %globaltimer), times[2] = 1 if
  // the barrier timed out (5 s: a block that never got resident)
  unsigned int* arrived;
  unsigned int total;
  unsigned long long* times;
};

__device__ bool barrier_start(const Args& a) {
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
  const int nw = gridDim.x * a.warps, gw = blockIdx.x * a.warps + warp;
  const size_t per_warp = (tma_pipe_bytes(a.stage_bytes, a.stages) + 255) & ~size_t(127);
  uint8_t* base = smem + per_warp * warp;
  if (a.arrived && !barrier_start(a)) return;
  TmaPipe pipe;
  if (a.tma && lane == 0) pipe.init(base, a.stage_bytes, a.stages, false, 0);  // S - 2 loads ahead
  __syncwarp();
  const size_t chunks = (a.bytes + a.chunk - 1) / a.chunk;
  const size_t items = chunks * a.npeers;
  for (size_t i = gw; i < items; i += nw) {
    const int p = static_cast<int>(i % a.npeers);
    const size_t off = (i / a.npeers) * a.chunk;
    const size_t n = a.chunk < a.bytes - off ? a.chunk : a.bytes - off;
    if (a.tma) {
      if (lane == 0) pipe.push_span(a.dst[p] + off, a.src + off, n);
    } else {
      warp_copy_ro(a.dst[p] + off, a.src + off, n, lane);
    }
  }
  if (a.tma && lane == 0) pipe.drain();
  if (a.arrived) {
    __syncthreads();
    if (threadIdx.x == 0) atomicMax(&a.times[1], globaltimer());
  }
}

int main(int argc, char** argv) {
  size_t bytes = 256ull << 20;
  std::vector<int> sms_list = {24, 12, 48, 132};
  int reps = 10;
  if (argc > 1) bytes = std::strtoull(argv[1], nullptr, 10);
  int ngpu = 0;
  CHECK(cudaGetDeviceCount(&ngpu));
  if (argc > 2) ngpu = std::min(ngpu, std::atoi(argv[2]));
  if (ngpu < 2) {
    std::printf("{\"error\": \"needs 2 GPUs\"}\n");
    return 0;
  }
  std::vector<uint8_t*> src(ngpu), dst(ngpu);
  const int npeers = ngpu - 1;
  for (int g = 0; g < ngpu; ++g) {
    CHECK(cudaSetDevice(g));
    for (int p = 0; p < ngpu; ++p) {
      if (p == g) continue;
      cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CHECK(e);
      (void)cudaGetLastError();
    }
    CHECK(cudaMalloc(&src[g], bytes));
    CHECK(cudaMemset(src[g], 1, bytes));
    CHECK(cudaMalloc(&dst[g], bytes * npeers));
  }
  int sm_count = 0;
  CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0));
  // The barrier's counter, in GPU 0's memory, which every GPU reaches by peer access (NVLink
  // atomics; host-memory atomics over PCIe need support the host may lack)
  unsigned int* arrived = nullptr;
  CHECK(cudaSetDevice(0));
  CHECK(cudaMalloc(&arrived, sizeof(unsigned int)));
  std::vector<unsigned long long*> times(ngpu);
  for (int g = 0; g < ngpu; ++g) {
    CHECK(cudaSetDevice(g));
    CHECK(cudaMalloc(&times[g], 3 * sizeof(unsigned long long)));
  }
  struct Mode {
    bool tma;
    int warps;
    int stages;
    uint32_t stage;
    size_t chunk;
  };
  const Mode modes[] = {{true, 4, 3, 16384, 65536},
                        {true, 2, 6, 16384, 65536},
                        {true, 1, 12, 16384, 262144},
                        {false, 8, 0, 0, 65536}};
  for (int sms : sms_list) {
    sms = std::min(sms, sm_count);
    for (int mi = 0; mi < 2 * static_cast<int>(sizeof(modes) / sizeof(modes[0])); ++mi) {
      const Mode& m = modes[mi / 2];
      const bool barrier = mi % 2 == 1;
      const size_t smem =
          m.tma ? m.warps * ((tma_pipe_bytes(m.stage, m.stages) + 255) & ~size_t(127)) : 0;
      std::vector<double> per_gpu(ngpu, 0.0);
      std::vector<std::vector<float>> ms(ngpu);
      bool timed_out = false;
      for (int rep = 0; rep < reps + 2; ++rep) {
        std::vector<cudaEvent_t> start(ngpu), stop(ngpu);
        CHECK(cudaSetDevice(0));
        CHECK(cudaMemset(arrived, 0, sizeof(unsigned int)));
        const unsigned long long times_init[3] = {~0ull, 0ull, 0ull};
        for (int g = 0; g < ngpu; ++g) {
          CHECK(cudaSetDevice(g));
          CHECK(cudaMemcpy(times[g], times_init, sizeof(times_init), cudaMemcpyHostToDevice));
          CHECK(cudaDeviceSynchronize());
        }
        for (int g = 0; g < ngpu; ++g) {
          CHECK(cudaSetDevice(g));
          CHECK(cudaFuncSetAttribute(push_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
          Args a{};
          a.src = src[g];
          int k = 0;
          for (int p = 0; p < ngpu; ++p)
            if (p != g) a.dst[k++] = dst[p] + static_cast<size_t>((g < p ? g : g - 1)) * bytes;
          a.npeers = npeers;
          a.bytes = bytes;
          a.chunk = m.chunk;
          a.warps = m.warps;
          a.stages = m.stages;
          a.stage_bytes = m.stage;
          a.tma = m.tma;
          if (barrier) {
            a.arrived = arrived;  // GPU 0's, by peer access
            a.total = static_cast<unsigned int>(sms * ngpu);
            a.times = times[g];
          }
          CHECK(cudaEventCreate(&start[g]));
          CHECK(cudaEventCreate(&stop[g]));
          CHECK(cudaEventRecord(start[g]));
          push_kernel<<<sms, 32 * m.warps, smem>>>(a);
          CHECK(cudaGetLastError());
          CHECK(cudaEventRecord(stop[g]));
        }
        for (int g = 0; g < ngpu; ++g) {
          CHECK(cudaSetDevice(g));
          CHECK(cudaEventSynchronize(stop[g]));
          float t = 0;
          CHECK(cudaEventElapsedTime(&t, start[g], stop[g]));
          if (barrier) {
            unsigned long long got[3];
            CHECK(cudaMemcpy(got, times[g], sizeof(got), cudaMemcpyDeviceToHost));
            timed_out = timed_out || got[2] != 0;
            t = static_cast<float>((got[1] - got[0]) * 1e-6);  // ns -> ms
          }
          if (rep >= 2) ms[g].push_back(t);
          cudaEventDestroy(start[g]);
          cudaEventDestroy(stop[g]);
        }
      }
      double slowest = 1e30;
      std::string list;
      for (int g = 0; g < ngpu; ++g) {
        std::sort(ms[g].begin(), ms[g].end());
        const double t = ms[g][ms[g].size() / 2] * 1e-3;
        per_gpu[g] = static_cast<double>(bytes) * npeers / t / 1e9;
        slowest = std::min(slowest, per_gpu[g]);
        list += (g ? ", " : "") + std::to_string(per_gpu[g]);
      }
      std::printf(
          "{\"gpus\": %d, \"sms\": %d, \"mode\": \"%s\", \"start\": \"%s\", \"warps\": %d, "
          "\"stages\": %d, \"bytes_per_peer\": %zu, \"egress_GBps_per_gpu\": [%s], "
          "\"slowest_GBps\": %.1f%s}\n",
          ngpu, sms, m.tma ? "bulk" : "simt16", barrier ? "barrier" : "events", m.warps, m.stages,
          bytes, list.c_str(), slowest, timed_out ? ", \"error\": \"barrier timed out\"" : "");
      std::fflush(stdout);
    }
  }
  return 0;
}
