// The public ops: argument checks shared by every frontend, then the platform's backend.
#include "fused_a2a/ops.h"

#include <chrono>

#include "core/backends.h"
#include "fused_a2a/errors.h"

namespace fa2a {
namespace {

// scan_values: check topk_idx values here (CPU layout); dispatch checks them inside its notify
// round instead, so that every rank learns that one rank's input was bad (no rank is left waiting).
void check_routing(Platform platform, const void* topk_idx, DType idx_dtype, int64_t num_tokens,
                   int num_topk, int num_experts, int num_ranks, bool scan_values) {
  FA2A_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  FA2A_CHECK(num_topk >= 1, "topk_idx must have at least one column (num_topk), got ", num_topk);
  FA2A_CHECK_TYPE(is_index_dtype(idx_dtype), "topk_idx must be int32 or int64, got ",
                  dtype_name(idx_dtype));
  FA2A_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  FA2A_CHECK(num_experts % num_ranks == 0, "num_experts (", num_experts,
             ") must be a multiple of the group size (", num_ranks, ")");
  FA2A_CHECK(num_tokens == 0 || topk_idx != nullptr, "topk_idx is missing");
  if (scan_values && platform == Platform::kCPU) {
    check_topk_values(topk_idx, idx_dtype, num_tokens, num_topk, num_experts);
  }
}

void check_rows(const char* name, DType dtype, int64_t hidden, bool with_scales) {
  FA2A_CHECK(hidden >= 1, name, " hidden size must be >= 1, got ", hidden);
  if (dtype == DType::kE4M3) {
    FA2A_CHECK(with_scales, name, " of dtype float8_e4m3fn needs its f32 scales");
    FA2A_CHECK(hidden % kFp8BlockSize == 0, name, " hidden size (", hidden,
               ") must be a multiple of ", kFp8BlockSize, " for FP8 rows");
  } else {
    FA2A_CHECK_TYPE(is_float_dtype(dtype), name,
                    " must be float32, float16 or bfloat16 (or FP8 with scales), got ",
                    dtype_name(dtype));
    FA2A_CHECK(!with_scales, name, " scales are only for float8_e4m3fn rows");
  }
  FA2A_CHECK((hidden * static_cast<int64_t>(dtype_size(dtype))) % 16 == 0, name,
             " row bytes (hidden ", hidden, " x ", dtype_size(dtype),
             " bytes) must be a multiple of 16");
}

void check_dispatch(Buffer& buffer, const DispatchArgs& a, bool moves_rows) {
  check_rows("x", a.x_dtype, a.hidden, a.x_scales != nullptr);
  check_routing(buffer.platform(), a.topk_idx, a.idx_dtype, a.num_tokens, a.num_topk, a.num_experts,
                buffer.num_ranks(), false);
  FA2A_CHECK(a.num_tokens == 0 || a.x != nullptr, "x is missing");
  FA2A_CHECK(a.capacity >= 0, "capacity (max_recv_tokens) must be >= 0, got ", a.capacity);
  FA2A_CHECK(a.capacity == 0 || a.recv_x != nullptr, "recv_x output is missing");
  FA2A_CHECK(!a.recv_topk_weights || a.topk_weights, "recv_topk_weights needs topk_weights");
  FA2A_CHECK(!a.recv_topk_idx || !a.recv_topk_idx64,
             "recv_topk_idx and recv_topk_idx64 are alternatives: give at most one");
  FA2A_CHECK(!a.x_scales || a.capacity == 0 || a.recv_x_scales, "recv_x_scales output is missing");
  FA2A_CHECK(a.recv_src_counts && a.group_max_tokens && (a.recv_src_token || !moves_rows),
             "the dispatch handle outputs are missing");
  FA2A_CHECK(a.num_sms >= 0 && a.num_sms % 2 == 0, "num_sms must be even and >= 0, got ",
             a.num_sms);
}

// The count exchange on CPU ranks: the true counts (and host_counts, if given), then the ticket
// after them (ops.h, DispatchArgs::host_ticket), as the CUDA kernels write it.
void cpu_notify_with_ticket(Buffer& buffer, const DispatchArgs& args) {
  cpu::dispatch_notify(buffer, args);
  if (args.host_ticket)
    args.host_counts[3 + args.num_experts / buffer.num_ranks()] = args.host_ticket;
}

}  // namespace

void check_topk_values(const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
                       int num_experts) {
  for (int64_t i = 0; i < num_tokens * num_topk; ++i) {
    int64_t value = idx_dtype == DType::kI64 ? static_cast<const int64_t*>(topk_idx)[i]
                                             : static_cast<const int32_t*>(topk_idx)[i];
    FA2A_CHECK(value >= -1 && value < num_experts, "topk_idx[", i / num_topk, ", ", i % num_topk,
               "] = ", value, " is out of range: expected -1 or a value in [0, ", num_experts, ")");
  }
}

void layout(Platform platform, Stream stream, const void* topk_idx, DType idx_dtype,
            int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
            int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert,
            uint8_t* is_token_in_rank) {
  FA2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks,
             "], got ", num_ranks);
  check_routing(platform, topk_idx, idx_dtype, num_tokens, num_topk, num_experts, num_ranks, true);
  if (platform == Platform::kCPU) {
    cpu::layout(topk_idx, idx_dtype, num_tokens, num_topk, num_experts, num_ranks,
                num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank);
  } else {
    cuda::layout(stream, topk_idx, idx_dtype, num_tokens, num_topk, num_experts, num_ranks,
                 num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank);
  }
}

void dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true);
  FA2A_CHECK(args.tokens_per_expert && args.num_recv, "dispatch outputs are missing");
  FA2A_CHECK(!args.host_ticket || args.host_counts, "host_ticket=", args.host_ticket,
             " needs host_counts");
  if (buffer.platform() == Platform::kCPU) {
    cpu_notify_with_ticket(buffer, args);  // host_counts (true counts), as dispatch_notify's
    cpu::dispatch_data(buffer, args);
  } else {
    cuda::dispatch(buffer, args, stream);
  }
}

void dispatch_notify(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, false);
  FA2A_CHECK(args.tokens_per_expert && args.num_recv, "dispatch outputs are missing");
  FA2A_CHECK(!args.host_ticket || args.host_counts, "host_ticket=", args.host_ticket,
             " needs host_counts");
  if (buffer.platform() == Platform::kCPU) {
    cpu_notify_with_ticket(buffer, args);
  } else {
    cuda::dispatch_notify(buffer, args, stream);
  }
}

void dispatch_notify_wait(Buffer& buffer, const int32_t* host_counts, int num_local,
                          int32_t ticket) {
  FA2A_CHECK(host_counts, "dispatch_notify_wait: host_counts is null");
  FA2A_CHECK(num_local > 0, "dispatch_notify_wait: num_local must be > 0, got ", num_local);
  FA2A_CHECK(ticket != 0, "dispatch_notify_wait: ticket must be nonzero, got ", ticket);
  if (buffer.platform() == Platform::kCPU) {
    FA2A_CHECK_RUNTIME(host_counts[3 + num_local] == ticket, "dispatch_notify_wait: ticket ",
                       ticket, " was not written (found ", host_counts[3 + num_local], ")");
  } else {
    cuda::dispatch_notify_wait(buffer, host_counts, num_local, ticket);
  }
}

void dispatch_data(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true);
  if (buffer.platform() == Platform::kCPU) {
    cpu::dispatch_data(buffer, args);
  } else {
    cuda::dispatch_data(buffer, args, stream);
  }
}

void cached_dispatch(Buffer& buffer, const DispatchArgs& args, Stream stream) {
  check_dispatch(buffer, args, true);
  FA2A_CHECK(args.tokens_per_expert && args.num_recv && args.num_dropped,
             "cached dispatch outputs (tokens_per_expert, num_recv, num_dropped) are missing");
  if (buffer.platform() == Platform::kCPU) {
    cpu::dispatch_data(buffer, args);
  } else {
    cuda::dispatch_cached(buffer, args, stream);
  }
}

void combine(Buffer& buffer, const CombineArgs& a, Stream stream) {
  check_rows("y", a.y_dtype, a.hidden, false);
  FA2A_CHECK(a.num_rows >= 0 && a.num_tokens >= 0,
             "combine needs num_rows >= 0 and "
             "num_tokens >= 0, got ",
             a.num_rows, " and ", a.num_tokens);
  FA2A_CHECK(a.recv_src_counts && a.recv_src_token && a.group_max_tokens,
             "combine needs the dispatch handle");
  FA2A_CHECK(!a.weights || a.num_topk >= 1, "combine weights need num_topk >= 1");
  FA2A_CHECK(!a.weights_owner_only || (a.topk_idx && is_index_dtype(a.idx_dtype)),
             "owner-only weights need the handle's topk_idx");
  FA2A_CHECK(a.num_experts % buffer.num_ranks() == 0 && a.num_experts >= 1, "num_experts (",
             a.num_experts, ") must be a positive multiple of the group size (", buffer.num_ranks(),
             ")");
  FA2A_CHECK(a.num_tokens == 0 || a.out != nullptr, "combine output is missing");
  FA2A_CHECK(a.num_sms >= 0 && a.num_sms % 2 == 0, "num_sms must be even and >= 0, got ",
             a.num_sms);
  if (buffer.platform() == Platform::kCPU) {
    cpu::combine(buffer, a);
  } else {
    cuda::combine(buffer, a, stream);
  }
}

void read_clock(Platform platform, Stream stream, uint32_t* out) {
  FA2A_CHECK(out != nullptr, "read_clock output is missing");
  if (platform == Platform::kCUDA) {
    cuda::read_clock(stream, out);
    return;
  }
  const auto ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            std::chrono::steady_clock::now().time_since_epoch())
                                            .count());
  out[0] = static_cast<uint32_t>(ns);
  out[1] = static_cast<uint32_t>(ns >> 32);
}

}  // namespace fa2a
