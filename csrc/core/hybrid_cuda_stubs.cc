// Stubs of the CUDA HybridEP entry points (core/hybrid_backends.h) for CPU-only builds (no
// FA2A_HAVE_CUDA): every entry point explains that CUDA is missing. CUDA builds leave this file
// out (CMakeLists.txt): csrc/kernels/cuda/hybrid_dispatch.cu and hybrid_combine.cu define them.
#include "core/hybrid_backends.h"
#include "fused_a2a/errors.h"

namespace fa2a::cuda {
namespace {
[[noreturn]] void no_hybrid_cuda() {
  FA2A_FAIL(ErrorKind::kNotImplemented,
            "fused_a2a was built without CUDA (nvcc was not found at build time); rebuild on a "
            "machine with the CUDA toolkit to use HybridEP with GPU tensors");
}
}  // namespace

void hybrid_dispatch(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
int64_t hybrid_dispatch_notify(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
  return 0;
}
void hybrid_dispatch_data(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
void hybrid_dispatch_cached(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
void hybrid_combine(Buffer&, const HybridCombineArgs&, Stream) {
  no_hybrid_cuda();
}
}  // namespace fa2a::cuda
