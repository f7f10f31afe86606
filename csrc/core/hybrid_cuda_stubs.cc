// Stubs of the CUDA HybridEP entry points (core/hybrid_backends.h).
//
// CPU-only build (no FA2A_HAVE_CUDA): every entry point explains that CUDA is missing.
// CUDA build: the same stubs are weak symbols; csrc/kernels/cuda/hybrid_dispatch.cu and
// hybrid_combine.cu define the entry points (strong symbols), which replace them at link time.
#include "core/hybrid_backends.h"
#include "fused_a2a/errors.h"

#ifndef FA2A_HAVE_CUDA
#define FA2A_HYBRID_STUB
#else
#define FA2A_HYBRID_STUB __attribute__((weak))
#endif

namespace fa2a::cuda {
namespace {
[[noreturn]] void no_hybrid_cuda() {
#ifndef FA2A_HAVE_CUDA
  FA2A_FAIL(ErrorKind::kNotImplemented,
            "fused_a2a was built without CUDA (nvcc was not found at build time); rebuild on a "
            "machine with the CUDA toolkit to use HybridEP with GPU tensors");
#else
  FA2A_FAIL(ErrorKind::kNotImplemented,
            "fused_a2a HybridEP: this build did not link the CUDA HybridEP kernels "
            "(csrc/kernels/cuda/hybrid_*.cu); use CPU tensors (gloo group) or normal mode on "
            "GPUs");
#endif
}
}  // namespace

FA2A_HYBRID_STUB void hybrid_dispatch(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
FA2A_HYBRID_STUB int64_t hybrid_dispatch_notify(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
  return 0;
}
FA2A_HYBRID_STUB void hybrid_dispatch_data(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
FA2A_HYBRID_STUB void hybrid_dispatch_cached(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
FA2A_HYBRID_STUB void hybrid_combine(Buffer&, const HybridCombineArgs&, Stream) {
  no_hybrid_cuda();
}
}  // namespace fa2a::cuda
