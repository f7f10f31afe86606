// Element types, platforms and process-wide settings shared by every layer of the core.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fa2a {

// Numbering is part of the binding ABI (Python passes these integers).
enum class DType : int32_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kE4M3 = 3,  // float8_e4m3fn
  kI32 = 4,
  kI64 = 5,
  kBool = 6,  // one byte, 0 or 1
};

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
bool is_float_dtype(DType dtype);  // f32, f16, bf16 (the dtypes dispatch/combine carry as rows)
bool is_index_dtype(DType dtype);  // i32, i64

enum class Platform : int32_t { kCPU = 0, kCUDA = 1 };

// Bound on every wait for a peer, in seconds: FUSED_A2A_TIMEOUT_S, default 100. Read at each call
// so that a test can shorten it for one op.
double timeout_seconds();

// Sizes rounded up to 16 bytes (rows, scale and prob blocks) and to 128 bytes (shared-memory
// regions). constexpr, so CUDA device code calls them too (--expt-relaxed-constexpr).
constexpr size_t align16(size_t bytes) { return (bytes + 15) & ~size_t{15}; }
constexpr size_t align128(size_t bytes) { return (bytes + 127) & ~size_t{127}; }

// Hidden values per FP8 scale (one f32 scale per 1x128 block of a row).
constexpr int kFp8BlockSize = 128;

// Largest EP group a buffer serves (sizes the control region).
constexpr int kMaxRanks = 64;

}  // namespace fa2a
