// The bench's link ceiling (issue 7): the faster of link_probe.cuh's bulk copies alone and with
// plain-store warps beside them (session 26: the dispatch's pushing receivers do the same), with
// the barrier start.
#include <algorithm>

#include "fused_a2a/ops.h"
#include "link_probe.cuh"

namespace fa2a {

double link_ceiling_gbps(int num_gpus, int sms, size_t bytes_per_peer, int reps) {
  int count = 0;
  FA2A_PROBE_CHECK(cudaGetDeviceCount(&count));
  FA2A_CHECK(num_gpus >= 2 && num_gpus <= count, "link_ceiling_gbps: num_gpus=", num_gpus,
             " must be in [2, ", count, "] (the GPUs of this process)");
  FA2A_CHECK(sms >= 1 && bytes_per_peer >= 1 && reps >= 1, "link_ceiling_gbps: sms=", sms,
             ", bytes_per_peer=", bytes_per_peer, " and reps=", reps, " must be positive");
  int sm_count = 0;
  FA2A_PROBE_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0));
  cuda::probe::Setup setup(num_gpus, bytes_per_peer);
  double best = 0;
  for (const cuda::probe::Mode& mode : {cuda::probe::kBulk4, cuda::probe::kBulkSimt12}) {
    const cuda::probe::Result r =
        cuda::probe::run(setup, mode, std::min(sms, sm_count), true, reps);
    FA2A_CHECK_RUNTIME(!r.timed_out,
                       "link_ceiling_gbps: the start barrier timed out (not every "
                       "block of every GPU became resident)");
    best = std::max(best, r.slowest);
  }
  return best;
}

}  // namespace fa2a
