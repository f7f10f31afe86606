// What this build contains, readable on any machine (no GPU or driver needed).
#include "fused_a2a/ops.h"

#ifdef FA2A_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef FA2A_CUDA_ARCH
#define FA2A_CUDA_ARCH ""
#endif

namespace fa2a {

#ifdef FA2A_HAVE_CUDA
bool build_has_cuda() { return true; }
int build_cuda_version() { return CUDART_VERSION; }
int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for this query
    return 0;
  }
  return count;
}
#else
bool build_has_cuda() { return false; }
int build_cuda_version() { return 0; }
int cuda_device_count() { return 0; }
#endif

const char* build_cuda_arch() { return FA2A_CUDA_ARCH; }

}  // namespace fa2a
