#include "fused_a2a/config.h"

#include <cstdlib>

#include "fused_a2a/errors.h"

namespace fa2a {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kE4M3:
    case DType::kBool:
      return 1;
    case DType::kI64:
      return 8;
  }
  FA2A_FAIL(ErrorKind::kType, "unknown dtype code ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kE4M3:
      return "float8_e4m3fn";
    case DType::kI32:
      return "int32";
    case DType::kI64:
      return "int64";
    case DType::kBool:
      return "bool";
  }
  return "unknown";
}

bool is_float_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

bool is_index_dtype(DType dtype) { return dtype == DType::kI32 || dtype == DType::kI64; }

double timeout_seconds() {
  const char* text = std::getenv("FUSED_A2A_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return 100.0;
  char* end = nullptr;
  double value = std::strtod(text, &end);
  FA2A_CHECK(end != text && *end == '\0' && value > 0.0,
             "FUSED_A2A_TIMEOUT_S must be a positive number of seconds, got '", text, "'");
  return value;
}

}  // namespace fa2a
