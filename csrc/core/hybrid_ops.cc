// The public HybridEP ops: argument checks shared by every frontend, then the platform's backend.
#include <algorithm>
#include <cstdlib>

#include "core/hybrid_backends.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/hybrid.h"

namespace fa2a {
namespace {

void check_x(const HybridDispatchArgs& a, bool cached) {
  FA2A_CHECK(a.num_tokens >= 0, "x must have >= 0 rows (num_tokens), got ", a.num_tokens);
  FA2A_CHECK(a.hidden >= 1, "x hidden size must be >= 1, got ", a.hidden);
  FA2A_CHECK(a.num_tokens == 0 || a.x != nullptr, "x is missing");
  if (a.x_dtype == DType::kE4M3) {
    FA2A_CHECK(!cached,
               "the cached re-dispatch (combine backward) carries f32/f16/bf16 rows, "
               "got float8_e4m3fn");
    FA2A_CHECK(a.x_scales != nullptr || a.num_tokens == 0,
               "x of dtype float8_e4m3fn needs its f32 scales (scaling_factor [N, H/128])");
    FA2A_CHECK(!a.quantize_fp8,
               "x is already float8_e4m3fn: fp8_dispatch quantises f32, f16 or "
               "bf16 rows only");
  } else {
    FA2A_CHECK_TYPE(is_float_dtype(a.x_dtype),
                    "x must be float32, float16 or bfloat16 (or float8_e4m3fn with scales), got ",
                    dtype_name(a.x_dtype));
    FA2A_CHECK(a.x_scales == nullptr, "x scales are only for float8_e4m3fn rows, x is ",
               dtype_name(a.x_dtype));
    FA2A_CHECK(!a.quantize_fp8 || !cached, "the cached re-dispatch cannot quantise to FP8");
  }
  const bool fp8 = a.quantize_fp8 || a.x_dtype == DType::kE4M3;
  if (fp8) {
    FA2A_CHECK(a.hidden % kFp8BlockSize == 0, "x hidden size (", a.hidden,
               ") must be a multiple of ", kFp8BlockSize, " for FP8 dispatch");
  }
  const int64_t row_bytes = a.hidden * static_cast<int64_t>(dtype_size(a.x_dtype));
  FA2A_CHECK(row_bytes % 16 == 0, "x row bytes (hidden ", a.hidden, " x ", dtype_size(a.x_dtype),
             " bytes) must be a multiple of 16");
}

void check_dispatch(Buffer& buffer, const HybridDispatchArgs& a, bool moves_rows, bool cached) {
  check_x(a, cached);
  const int G = buffer.num_ranks();
  FA2A_CHECK(a.num_local_experts >= 1, "num_local_experts must be >= 1, got ", a.num_local_experts);
  FA2A_CHECK(a.num_experts == G * a.num_local_experts, "routing_map must have E = group size (", G,
             ") x num_local_experts (", a.num_local_experts, ") = ", G * a.num_local_experts,
             " columns, got ", a.num_experts);
  FA2A_CHECK(a.num_tokens == 0 || a.routing_map != nullptr, "routing_map is missing");
  FA2A_CHECK(a.pad_multiple >= 0, "pad_multiple must be None or >= 0, got ", a.pad_multiple);
  FA2A_CHECK(a.src_expert_counts && a.meta && (cached || a.tokens_per_expert),
             "the HybridEP dispatch handle arrays (src_expert_counts, meta, tokens_per_expert) "
             "are missing");
  FA2A_CHECK(a.num_sms >= 0 && a.num_sms % 2 == 0, "num_sms must be even and >= 0, got ",
             a.num_sms);
  if (!moves_rows) return;
  FA2A_CHECK(a.num_rows >= 0, "num_permuted_tokens must be >= 0, got ", a.num_rows);
  if (a.num_rows == 0) return;
  FA2A_CHECK(a.permuted_x != nullptr, "the permuted hidden output is missing");
  FA2A_CHECK(cached || a.row_token != nullptr, "the handle's row_token output is missing");
  FA2A_CHECK(!a.probs || a.permuted_probs,
             "probs are given but the permuted probs output is "
             "missing");
  FA2A_CHECK(a.probs || !a.permuted_probs, "the permuted probs output needs probs");
  const bool fp8 = a.quantize_fp8 || a.x_dtype == DType::kE4M3;
  FA2A_CHECK(fp8 == (a.permuted_scales != nullptr),
             fp8 ? "FP8 dispatch needs the permuted scales output (scaling factor)"
                 : "the permuted scales output is only for FP8 dispatch");
}

}  // namespace

void hybrid_dispatch(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true, false);
  if (buffer.platform() == Platform::kCPU) {
    cpu::hybrid_dispatch_notify(buffer, args);
    cpu::hybrid_dispatch_data(buffer, args, false);
  } else {
    cuda::hybrid_dispatch(buffer, args, stream);
  }
}

int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, false, false);
  if (buffer.platform() != Platform::kCPU)
    return cuda::hybrid_dispatch_notify(buffer, args, stream);
  const int64_t num_rows = cpu::hybrid_dispatch_notify(buffer, args);
  if (args.tokens_per_expert_host) {  // the CPU backend's outputs are host memory already
    std::copy_n(args.tokens_per_expert, args.num_local_experts, args.tokens_per_expert_host);
  }
  return num_rows;
}

void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true, false);
  if (buffer.platform() == Platform::kCPU) {
    cpu::hybrid_dispatch_data(buffer, args, false);
  } else {
    cuda::hybrid_dispatch_data(buffer, args, stream);
  }
}

void hybrid_dispatch_cached(Buffer& buffer, const HybridDispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true, true);
  if (buffer.platform() == Platform::kCPU) {
    cpu::hybrid_dispatch_data(buffer, args, true);
  } else {
    cuda::hybrid_dispatch_cached(buffer, args, stream);
  }
}

void hybrid_combine(Buffer& buffer, const HybridCombineArgs& a, Stream stream) {
  FA2A_CHECK(a.hidden >= 1, "x hidden size must be >= 1, got ", a.hidden);
  FA2A_CHECK_TYPE(is_float_dtype(a.y_dtype),
                  "the combined hidden states must be float32, "
                  "float16 or bfloat16, got ",
                  dtype_name(a.y_dtype));
  FA2A_CHECK((a.hidden * static_cast<int64_t>(dtype_size(a.y_dtype))) % 16 == 0,
             "x row bytes (hidden ", a.hidden, " x ", dtype_size(a.y_dtype),
             " bytes) must be a multiple of 16");
  FA2A_CHECK(a.num_rows >= 0 && a.num_tokens >= 0,
             "hybrid combine needs num_rows >= 0 and "
             "num_tokens >= 0, got ",
             a.num_rows, " and ", a.num_tokens);
  FA2A_CHECK(a.num_rows == 0 || a.y != nullptr, "x (the permuted rows to combine) is missing");
  FA2A_CHECK(a.num_local_experts >= 1, "num_local_experts must be >= 1, got ", a.num_local_experts);
  FA2A_CHECK(a.pad_multiple >= 0, "pad_multiple must be None or >= 0, got ", a.pad_multiple);
  FA2A_CHECK(a.src_expert_counts && a.meta && (a.num_rows == 0 || a.row_token),
             "hybrid combine needs the dispatch handle");
  FA2A_CHECK(a.num_tokens == 0 || a.out != nullptr, "hybrid combine output is missing");
  FA2A_CHECK(!a.probs || a.num_tokens == 0 || a.out_probs,
             "probs are given but the combined probs output is missing");
  FA2A_CHECK(a.num_sms >= 0 && a.num_sms % 2 == 0, "num_sms must be even and >= 0, got ",
             a.num_sms);
  if (buffer.platform() == Platform::kCPU) {
    cpu::hybrid_combine(buffer, a);
  } else {
    cuda::hybrid_combine(buffer, a, stream);
  }
}

size_t hybrid_buffer_bytes(int64_t hidden, int64_t bytes_per_value, int num_local_experts,
                           int num_ranks, Platform platform, int64_t rows) {
  FA2A_CHECK(hidden >= 1, "hidden_dim must be >= 1, got ", hidden);
  FA2A_CHECK(bytes_per_value >= 1 && bytes_per_value <= 8,
             "bytes_per_value must be in [1, 8], "
             "got ",
             bytes_per_value);
  FA2A_CHECK(num_local_experts >= 1, "num_local_experts must be >= 1, got ", num_local_experts);
  FA2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks,
             "], got ", num_ranks);
  if (rows <= 0) rows = default_buffer_rows(platform);
  // Dispatch rows carry the values (FP8 scales included in the upper bound), L probs and L
  // routing bytes; a combine round must hold at least 4 tokens that each picked all L experts.
  // FUSED_A2A_HYBRID_FANOUT=f (default 1): room for `rows` tokens that each send f rows to one
  // rank in a combine round (the CUDA combine carries slot rows / max fan-out tokens per round).
  int64_t fanout = 1;
  if (const char* text = std::getenv("FUSED_A2A_HYBRID_FANOUT")) {
    fanout = std::strtoll(text, nullptr, 10);
    FA2A_CHECK(fanout >= 1 && fanout <= num_local_experts,
               "FUSED_A2A_HYBRID_FANOUT must be in [1, num_local_experts = ", num_local_experts,
               "], got '", text, "'");
  }
  const size_t value_bytes = static_cast<size_t>(bytes_per_value);
  const size_t dispatch_row =
      cpu::hybrid_dispatch_row_bytes(hidden, value_bytes, true, true, num_local_experts);
  const size_t combine_row = cpu::hybrid_combine_row_bytes(hidden, value_bytes);
  const size_t payload = std::max({static_cast<size_t>(rows) * dispatch_row,
                                   static_cast<size_t>(rows * fanout) * combine_row,
                                   4 * static_cast<size_t>(num_local_experts) * combine_row});
  const size_t slot = (256 + payload + 63) / 64 * 64;  // + the message header (<= 256 bytes)
  return slot * static_cast<size_t>(num_ranks);
}

}  // namespace fa2a
