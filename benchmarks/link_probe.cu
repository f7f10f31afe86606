// Link-ceiling probe, every mode (csrc/kernels/cuda/link_probe.cuh has the kernel, the two ways
// to start and the timing): one JSON line per configuration with each GPU's egress GB/s (median
// of reps) and the slowest GPU's. The bench (`fused-a2a bench`) reports the faster of two of these
// configurations as its ceiling (kBulk4 and kBulkSimt12, barrier start).
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a
//   -I csrc/include -I csrc/kernels/cuda benchmarks/link_probe.cu -o link_probe
// Usage: link_probe [bytes per peer (256 MB)] [GPUs (all)]
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "link_probe.cuh"

using namespace fa2a::cuda;

int main(int argc, char** argv) try {
  size_t bytes = 256ull << 20;
  const std::vector<int> sms_list = {24, 12, 48, 132};
  const int reps = 10;
  if (argc > 1) bytes = std::strtoull(argv[1], nullptr, 10);
  int ngpu = 0;
  if (cudaGetDeviceCount(&ngpu) != cudaSuccess) ngpu = 0;
  if (argc > 2) ngpu = std::min(ngpu, std::atoi(argv[2]));
  if (ngpu < 2) {
    std::printf("{\"error\": \"needs 2 GPUs\"}\n");
    return 0;
  }
  probe::Setup setup(ngpu, bytes);
  int sm_count = 0;
  FA2A_PROBE_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0));
  // The last two: the dispatch's pattern with bulk copies, one 14 KB row (H = 7168, bf16) an
  // item, contiguous and gathered (session 20: the direct dispatch pushes ~305 GB/s wire
  // against 331-345 here in 64 KB chunks)
  // Then (session 25) the 4 bulk-copy warps with 4 and 12 plain-store warps beside them in
  // 64 KB chunks and gathered rows: the dispatch's receiver warps are idle with direct rows
  const probe::Mode modes[] = {probe::kBulk4,
                               {true, 2, 6, 16384, 65536},
                               {true, 1, 12, 16384, 262144},
                               {false, 8, 0, 0, 65536},
                               {true, 4, 3, 16384, 14336},
                               {true, 4, 3, 16384, 14336, true},
                               {true, 4, 3, 16384, 65536, false, 4},
                               {true, 4, 3, 16384, 65536, false, 12},
                               probe::kBulkSimt12,
                               // (session 26) more bulk-copy warps with smaller stages, as
                               // launch_config gives 6 / 8 sender warps (3 stages each in ~190
                               // KB): do more streams lift the rate as the plain-store warps did?
                               // (the combine's reducers cannot push; run 62's 6 / 8 sender
                               // warps lost at 24 SMs, before the rings and the claimed items)
                               {true, 6, 3, 10240, 65536},
                               {true, 8, 3, 8192, 65536}};
  for (int sms : sms_list) {
    sms = std::min(sms, sm_count);
    for (const probe::Mode& m : modes) {
      for (const bool barrier : {false, true}) {
        const probe::Result r = probe::run(setup, m, sms, barrier, reps);
        std::string list;
        for (int g = 0; g < ngpu; ++g) list += (g ? ", " : "") + std::to_string(r.gbps[g]);
        std::printf(
            "{\"gpus\": %d, \"sms\": %d, \"mode\": \"%s\", \"start\": \"%s\", \"warps\": %d, "
            "\"simt_warps\": %d, \"stages\": %d, \"chunk\": %zu, \"gather\": %s, "
            "\"bytes_per_peer\": %zu, \"egress_GBps_per_gpu\": [%s], \"slowest_GBps\": %.1f%s}\n",
            ngpu, sms, m.name(), barrier ? "barrier" : "events", m.warps, m.simt_warps, m.stages,
            m.chunk, m.gather ? "true" : "false", bytes, list.c_str(), r.slowest,
            r.timed_out ? ", \"error\": \"barrier timed out\"" : "");
        std::fflush(stdout);
      }
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::printf("{\"error\": \"%s\"}\n", e.what());
  return 1;
}
