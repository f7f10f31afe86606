// The bench's link ceiling (issue 7): link_probe.cuh's bulk copies with the barrier start.
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
  const cuda::probe::Result r =
      cuda::probe::run(setup, cuda::probe::kBulk4, std::min(sms, sm_count), true, reps);
  FA2A_CHECK_RUNTIME(!r.timed_out,
                     "link_ceiling_gbps: the start barrier timed out (not every "
                     "block of every GPU became resident)");
  return r.slowest;
}

}  // namespace fa2a
