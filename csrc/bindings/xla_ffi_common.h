// Helpers shared by the XLA FFI handler files (xla_ffi.cc: normal mode and the one registration
// table; xla_ffi_hybrid.cc: HybridEP mode). Only included when the XLA FFI headers are available.
#pragma once

#if defined(FA2A_HAVE_XLA_FFI) && FA2A_HAVE_XLA_FFI

#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#include "fused_a2a/buffer.h"
#include "fused_a2a/config.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/ops.h"
#include "xla/ffi/api/ffi.h"

#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fa2a::bindings::xffi {

namespace ffi = xla::ffi;

using Buf = ffi::AnyBuffer;
using Ret = ffi::Result<ffi::AnyBuffer>;

// "fused_a2a <op>: <message>", unless the core's message already names the op.
inline std::string with_op(const char* op, const char* message) {
  const std::string text(message);
  if (text.rfind("fused_a2a", 0) == 0) return text;
  return str_cat("fused_a2a ", op, ": ", text);
}

inline ffi::Error to_ffi_error(const char* op, const fa2a::Error& e) {
  ffi::ErrorCode code = ffi::ErrorCode::kInternal;
  switch (e.kind()) {
    case ErrorKind::kValue:
    case ErrorKind::kType:
      code = ffi::ErrorCode::kInvalidArgument;
      break;
    case ErrorKind::kRuntime:
      code = ffi::ErrorCode::kInternal;
      break;
    case ErrorKind::kTimeout:
      code = ffi::ErrorCode::kDeadlineExceeded;
      break;
    case ErrorKind::kNotImplemented:
      code = ffi::ErrorCode::kUnimplemented;
      break;
  }
  return ffi::Error(code, with_op(op, e.what()));
}

// Runs `body` and turns any exception into an ffi::Error naming the op.
template <typename Body>
ffi::Error guarded(const char* op, Body&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const fa2a::Error& e) {
    return to_ffi_error(op, e);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, with_op(op, e.what()));
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, str_cat("fused_a2a ", op, ": unknown error"));
  }
}

inline DType to_dtype(ffi::DataType t, const char* arg) {
  switch (t) {
    case ffi::DataType::F32:
      return DType::kF32;
    case ffi::DataType::F16:
      return DType::kF16;
    case ffi::DataType::BF16:
      return DType::kBF16;
    case ffi::DataType::F8E4M3FN:
      return DType::kE4M3;
    case ffi::DataType::S32:
      return DType::kI32;
    case ffi::DataType::S64:
      return DType::kI64;
    case ffi::DataType::PRED:
      return DType::kBool;
    default:
      FA2A_FAIL(ErrorKind::kType, "argument '", arg, "' has an unsupported XLA dtype (code ",
                static_cast<int>(t), ")");
  }
}

inline void expect_dtype(const Buf& b, ffi::DataType t, const char* arg) {
  FA2A_CHECK_TYPE(b.element_type() == t, "argument '", arg, "' must have XLA dtype code ",
                  static_cast<int>(t), ", got ", static_cast<int>(b.element_type()));
}

inline int64_t dim(const Buf& b, size_t rank, size_t i, const char* arg) {
  auto d = b.dimensions();
  FA2A_CHECK(d.size() == rank, "argument '", arg, "' must have rank ", rank, ", got ", d.size());
  return d[i];
}

inline int32_t* i32(Ret& r, const char* name) {
  expect_dtype(*r, ffi::DataType::S32, name);
  return static_cast<int32_t*>(r->untyped_data());
}

// Where a handler runs: platform, stream (CUDA) and device ordinal.
struct Where {
  Platform platform = Platform::kCPU;
  void* stream = nullptr;
  int32_t ordinal = -1;
};

inline Stream stream_of(const Where& w) { return Stream{w.stream}; }

// The buffer of a collective target (xla_ffi.cc): CPU reads the `rank` and `sub` operands, CUDA
// looks (group_id, device ordinal) up in the table that ffi_bind_device fills.
std::shared_ptr<Buffer> resolve(const Where& w, int64_t group_id, const Buf& rank, const Buf& sub);

#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
#define FA2A_CUDA_CTX(B) B.Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()
inline Where cuda_where(cudaStream_t s, int32_t ordinal) {
  return Where{Platform::kCUDA, static_cast<void*>(s), ordinal};
}
#endif

}  // namespace fa2a::bindings::xffi

// HybridEP handlers (xla_ffi_hybrid.cc), listed in the one registration table of xla_ffi.cc.
extern "C" {
XLA_FFI_Error* fa2a_hybrid_dispatch_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa2a_hybrid_cached_dispatch_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa2a_hybrid_combine_cpu(XLA_FFI_CallFrame* call_frame);
#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
XLA_FFI_Error* fa2a_hybrid_dispatch_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa2a_hybrid_cached_dispatch_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa2a_hybrid_combine_cuda(XLA_FFI_CallFrame* call_frame);
#endif
}

#endif  // FA2A_HAVE_XLA_FFI
