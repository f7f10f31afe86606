// Exact FP8 (float8_e4m3fn) conversions and the project's 1x128 block quantisation, bit for bit
// as tests/reference.py (ml_dtypes round to nearest even; no infinity: overflow and inf become
// NaN).
#pragma once

#include <cmath>
#include <cstdint>

#include "convert.h"

namespace fa2a::cpu {

inline float e4m3_to_f32(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t exponent = (q >> 3) & 0xfu;
  const uint32_t mantissa = q & 0x7u;
  if (exponent == 0xfu && mantissa == 0x7u) return bits_float(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-9
    return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0.001953125f));
  }
  return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

inline uint8_t f32_to_e4m3(float value) {
  uint32_t bits = float_bits(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  bits &= 0x7fffffffu;
  if (bits >= 0x7f800000u) return sign | 0x7fu;  // inf or NaN -> NaN
  uint32_t code;
  if (bits < 0x3c800000u) {  // below 2^-6, the smallest normal: multiples of 2^-9
    // 2^14 + |value| rounds |value| to a multiple of 2^-9 (the f32 ulp at 2^14), ties to even.
    const float shifted = bits_float(bits) + 16384.0f;
    code = float_bits(shifted) - 0x46800000u;  // 0..8 (8 is the smallest normal, 0x08)
  } else {
    bits += 0x7ffffu + ((bits >> 20) & 1u);  // round the mantissa to 3 bits, ties to even
    code = (bits >> 20) - (120u << 3);
  }
  if (code > 0x7eu) code = 0x7fu;  // past 448 (ties at 464 went to 448): NaN
  return static_cast<uint8_t>(sign | code);
}

// Quantises one row of `hidden` values (H % 128 == 0) to e4m3 + one f32 scale per 128 values.
inline void fp8_quantize_row(const void* row, DType dtype, int64_t hidden, uint8_t* q,
                             float* scales) {
  for (int64_t b = 0; b < hidden / kFp8BlockSize; ++b) {
    const int64_t h0 = b * kFp8BlockSize;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t h = h0; h < h0 + kFp8BlockSize; ++h) {
      const float a = std::fabs(load_as_f32(row, h, dtype));
      nan |= std::isnan(a);
      amax = a > amax ? a : amax;
    }
    if (nan) amax = std::nanf("");
    if (!(amax >= 1e-4f) && !nan) amax = 1e-4f;
    const float scale = amax / 448.0f;
    scales[b] = scale;
    for (int64_t h = h0; h < h0 + kFp8BlockSize; ++h) {
      q[h] = f32_to_e4m3(load_as_f32(row, h, dtype) / scale);
    }
  }
}

}  // namespace fa2a::cpu
