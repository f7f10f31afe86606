// read_clock (fused_a2a/ops.h): the GPU's nanosecond clock when the stream reaches the call, for
// device-side intervals in benchmarks (the JAX bench times its loops with two reads).
#include "core/backends.h"
#include "fused_a2a/errors.h"
#include "kernels.h"
#include "state.h"

namespace fa2a::cuda {

namespace {

__global__ void clock_kernel(uint32_t* out) {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  out[0] = static_cast<uint32_t>(ns);
  out[1] = static_cast<uint32_t>(ns >> 32);
}

}  // namespace

void read_clock(Stream stream, uint32_t* out) {
  auto s = static_cast<cudaStream_t>(stream.handle);
  DeviceGuard guard(stream_device(s));
  clock_kernel<<<1, 1, 0, s>>>(out);
  check_launch("read_clock");
}

}  // namespace fa2a::cuda
