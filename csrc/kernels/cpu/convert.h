// Exact scalar conversions between f32 and the 16-bit float formats (round to nearest even), the
// same as CUDA's __float2bfloat16_rn / __float2half_rn and NumPy / ml_dtypes.
#pragma once

#include <cstdint>
#include <cstring>

#include "fused_a2a/config.h"

namespace fa2a::cpu {

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline float bf16_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24 is exact in f32
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t f32_to_f16(float value) {
  uint32_t bits = float_bits(value);
  uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t out;
  if (bits >= 0x47800000u) {  // >= 65536, inf or nan
    out = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Adding 0.5 places the value's multiples of 2^-24 in the low mantissa bits, rounded to
    // nearest even by the f32 addition itself.
    float shifted = bits_float(bits) + 0.5f;
    out = float_bits(shifted) - 0x3f000000u;
  } else {
    uint32_t mantissa_odd = (bits >> 13) & 1u;
    bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = bits >> 13;
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

// Reads element i of a row of f32 / f16 / bf16 values as f32.
inline float load_as_f32(const void* row, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(row)[i];
    case DType::kF16:
      return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
    default:
      return bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
  }
}

inline void store_from_f32(void* row, int64_t i, DType dtype, float value) {
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(row)[i] = value;
      break;
    case DType::kF16:
      static_cast<uint16_t*>(row)[i] = f32_to_f16(value);
      break;
    default:
      static_cast<uint16_t*>(row)[i] = f32_to_bf16(value);
      break;
  }
}

inline int64_t load_index(const void* indices, int64_t i, DType dtype) {
  return dtype == DType::kI64 ? static_cast<const int64_t*>(indices)[i]
                              : static_cast<const int32_t*>(indices)[i];
}

}  // namespace fa2a::cpu
