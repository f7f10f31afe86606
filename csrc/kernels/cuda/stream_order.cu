// stream_wait and capture_id (core/backends.h): the output arena's cross-stream reuse and its
// blocks for graph captures (fused_a2a/arena.h).
#include "core/backends.h"
#include "fused_a2a/errors.h"
#include "state.h"

namespace fa2a::cuda {

void stream_wait(int device, Stream waiter, Stream waited) {
  auto waiting = static_cast<cudaStream_t>(waiter.handle);
  DeviceGuard guard(device);
  cudaEvent_t event;
  FA2A_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                  "cudaEventCreateWithFlags (the arena's stream order)");
  cudaError_t err = cudaEventRecord(event, static_cast<cudaStream_t>(waited.handle));
  if (err == cudaSuccess) err = cudaStreamWaitEvent(waiting, event, 0);
  (void)cudaEventDestroy(event);  // released once the wait is done with it
  FA2A_CUDA_CHECK(err, "cudaEventRecord / cudaStreamWaitEvent (the arena's stream order)");
}

uint64_t capture_id(int device, Stream stream) {
  DeviceGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  FA2A_CUDA_CHECK(cudaStreamGetCaptureInfo(static_cast<cudaStream_t>(stream.handle), &status, &id),
                  "cudaStreamGetCaptureInfo (the arena's blocks for graph captures)");
  return status == cudaStreamCaptureStatusActive ? static_cast<uint64_t>(id) : 0;
}

}  // namespace fa2a::cuda
