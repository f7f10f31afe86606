// Stubs of the CUDA HybridEP entry points (core/hybrid_backends.h).
//
// CPU-only build (no FA2A_HAVE_CUDA): every entry point explains that CUDA is missing.
// CUDA build: the same stubs are weak symbols saying that the HybridEP CUDA kernels are not there
// yet, so that the CUDA build links before csrc/kernels/cuda/ defines them; the kernels' strong
// definitions replace them at link time without touching this file.
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
            "fused_a2a HybridEP: this build has no CUDA kernels for HybridEP mode yet; use CPU "
            "tensors (gloo group) or normal mode on GPUs");
#endif
}
}  // namespace

FA2A_HYBRID_STUB void hybrid_dispatch(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
}
FA2A_HYBRID_STUB void hybrid_dispatch_notify(Buffer&, const HybridDispatchArgs&, Stream) {
  no_hybrid_cuda();
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
