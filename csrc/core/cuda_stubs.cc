// Compiled only when the CUDA backend is not: every CUDA entry point explains why it is missing.
#include "core/backends.h"
#include "fused_a2a/errors.h"

namespace fa2a {
namespace {
[[noreturn]] void no_cuda() {
  FA2A_FAIL(ErrorKind::kNotImplemented,
            "fused_a2a was built without CUDA (nvcc was not found at build time); rebuild on a "
            "machine with the CUDA toolkit to use GPU tensors");
}
}  // namespace

std::unique_ptr<Transport> make_cuda_transport(int64_t, int, int) { no_cuda(); }

namespace cuda {
void layout(Stream, const void*, DType, int64_t, int, int, int, int32_t*, int32_t*, uint8_t*) {
  no_cuda();
}
void dispatch(Buffer&, const DispatchArgs&, Stream) { no_cuda(); }
void dispatch_notify(Buffer&, const DispatchArgs&, Stream) { no_cuda(); }
void dispatch_notify_wait(Buffer&, const int32_t*, int, int32_t) { no_cuda(); }
void dispatch_data(Buffer&, const DispatchArgs&, Stream) { no_cuda(); }
void dispatch_cached(Buffer&, const DispatchArgs&, Stream) { no_cuda(); }
void combine(Buffer&, const CombineArgs&, Stream) { no_cuda(); }
void read_clock(Stream, uint32_t*) { no_cuda(); }
void stream_wait(int, Stream, Stream) { no_cuda(); }
uint64_t capture_id(int, Stream) { return 0; }  // nothing captures without CUDA
}  // namespace cuda

std::vector<uint64_t> cuda_dispatch_trace(Buffer&, bool) { return {}; }
std::vector<uint64_t> cuda_host_phases(Buffer&, bool) { return {}; }
double link_ceiling_gbps(int, int, size_t, int) { no_cuda(); }
}  // namespace fa2a
