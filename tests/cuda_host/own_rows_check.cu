// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): who copies the
// dispatch's own rows (FUSED_A2A_CUDA_SELF=send|recv|split, dispatch_common.cuh). In every mode
// each own chunk must be copied by exactly one role, and a role that copies a chunk must have
// the own rows among its items (the senders' own column, the receivers' own row count).
#include <cstdio>

#include "dispatch_common.cuh"

using namespace fa2a::cuda::dispatch_impl;

int main() {
  const int modes[] = {kOwnBySenders, kOwnByReceivers, kOwnSplit};
  long long by_senders[3] = {0, 0, 0}, by_receivers[3] = {0, 0, 0};
  for (int m = 0; m < 3; ++m) {
    const int mode = modes[m];
    for (long long chunk = 0; chunk < 1000; ++chunk) {
      const bool s = own_chunk_by_senders(mode, chunk), r = own_chunk_by_receivers(mode, chunk);
      if (s == r || (s && !senders_have_own(mode)) || (r && !receivers_have_own(mode))) {
        std::printf("FAIL: mode %d chunk %lld: senders %d receivers %d\n", mode, chunk, s, r);
        return 1;
      }
      by_senders[m] += s;
      by_receivers[m] += r;
    }
  }
  // send: all by the senders; recv: all by the receivers; split: half each.
  if (by_senders[0] != 1000 || by_receivers[1] != 1000 || by_senders[2] != 500 ||
      by_receivers[2] != 500) {
    std::printf("FAIL: counts %lld %lld %lld / %lld %lld %lld\n", by_senders[0], by_senders[1],
                by_senders[2], by_receivers[0], by_receivers[1], by_receivers[2]);
    return 1;
  }
  std::printf("ok: own rows split in 3 modes\n");
  return 0;
}
