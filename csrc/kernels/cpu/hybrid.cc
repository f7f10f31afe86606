// CPU backend of HybridEP mode (SEMANTICS.md section 2) on top of the round exchange.
//
// Dispatch: a notify round (per-(source, local expert) counts, N and shapes, the largest fan-out),
// then data rounds; data round k carries every sender's tokens [kT, (k+1)T), once per destination
// rank however many of its experts the token picked, with the routing bits and probs of that
// rank's experts. The permute is fused into the receive path: the receiver copies each arriving
// row straight into every expert-major position it belongs to (no staging buffer, no later
// permute pass); padding rows and the tail are zeroed once at the end.
//
// Combine: round k carries, to every source rank s, the rows of s's tokens [kT, (k+1)T), expert by
// expert. So all contributions to one token arrive in one round and, processing senders in
// ascending rank order and each message in order, are summed rank-major then expert-major: the
// contract's fixed fp32 order.
//
// Errors: what one rank finds wrong with its own input or handle (before or during an op) goes
// into the status of its messages, and every rank stops after the same round and raises (the
// peers name the failing rank), so nobody waits for a timeout and the buffer stays usable.
#include <algorithm>
#include <climits>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"
#include "core/hybrid_backends.h"
#include "exchange.h"
#include "fp8.h"
#include "fused_a2a/errors.h"

namespace fa2a::cpu {
namespace {

// One dispatched row in a data message: values, FP8 scales, probs of the destination's L experts,
// their routing bits (one byte each), the source token index.
struct DispatchRow {
  size_t x_bytes, scale_bytes, prob_bytes, mask_bytes, stride;
  DispatchRow(int64_t hidden, size_t value_bytes, bool scales, bool probs, int num_local)
      : x_bytes(align16(hidden * value_bytes)),
        scale_bytes(scales ? align16(hidden / kFp8BlockSize * sizeof(float)) : 0),
        prob_bytes(probs ? align16(num_local * sizeof(float)) : 0),
        mask_bytes(align16(num_local)),
        stride(x_bytes + scale_bytes + prob_bytes + mask_bytes + 16) {}
};

// One combine row: values, then {source token, local expert, prob} in 16 bytes.
size_t combine_stride(int64_t hidden, size_t value_bytes) {
  return align16(hidden * value_bytes) + 16;
}

// The expert-major row layout of this rank, from the handle's counts.
struct Layout {
  int num_ranks, num_local;
  int64_t num_rows;                // P
  std::vector<int64_t> count;      // [L] real rows per expert
  std::vector<int64_t> padded;     // [L]
  std::vector<int64_t> offset;     // [L] first row of expert j
  std::vector<int64_t> seg_start;  // [G*L] first row of (source s, expert j)
  int64_t total = 0;               // padded rows the layout needs

  Layout(const int32_t* src_expert_counts, int num_ranks_, int num_local_, int64_t pad,
         int64_t num_rows_)
      : num_ranks(num_ranks_),
        num_local(num_local_),
        num_rows(num_rows_),
        count(num_local_, 0),
        padded(num_local_, 0),
        offset(num_local_, 0),
        seg_start(static_cast<size_t>(num_ranks_) * num_local_, 0) {
    for (int j = 0; j < num_local; ++j) {
      offset[j] = total;
      for (int s = 0; s < num_ranks; ++s) {
        const int32_t c = src_expert_counts[s * num_local + j];
        FA2A_CHECK_RUNTIME(c >= 0, "fused_a2a hybrid: corrupt handle: src_expert_counts[", s,
                           "*L + ", j, "] = ", c);
        seg_start[s * num_local + j] = offset[j] + count[j];
        count[j] += c;
      }
      padded[j] = pad > 0 ? (count[j] + pad - 1) / pad * pad : count[j];
      total += padded[j];
    }
  }
  // Tokens per expert clipped greedily in expert order so that they sum to at most P.
  int64_t clipped(int j) const { return std::clamp<int64_t>(num_rows - offset[j], 0, padded[j]); }
};

void shape_aux(int64_t aux[5], int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) {
  aux[0] = a, aux[1] = b, aux[2] = c, aux[3] = d, aux[4] = e;
}

// Every rank sees every header, so every rank reaches the same verdict.
std::string disagreement(const Exchange& ex, const char* op, const char* const names[5],
                         int first) {
  const int64_t* mine = ex.header(ex.rank()).aux;
  for (int src = 0; src < ex.num_ranks(); ++src) {
    const int64_t* theirs = ex.header(src).aux;
    for (int i = first; i < 5; ++i) {
      if (theirs[i] != mine[i]) {
        return str_cat("fused_a2a ", op, ": ", names[i], " differs between ranks: rank ", src,
                       " has ", theirs[i], ", rank ", ex.rank(), " has ", mine[i]);
      }
    }
  }
  return {};
}

// N must be equal on every rank in HybridEP mode; the message names every rank's N.
std::string unequal_tokens(const Exchange& ex, const char* op) {
  bool equal = true;
  for (int src = 0; src < ex.num_ranks(); ++src) {
    equal &= ex.header(src).aux[0] == ex.header(0).aux[0];
  }
  if (equal) return {};
  std::string ns;
  for (int src = 0; src < ex.num_ranks(); ++src) {
    ns += str_cat(src ? ", " : "", "rank ", src, ": N=", ex.header(src).aux[0]);
  }
  return str_cat("fused_a2a ", op, ": HybridEP mode needs the same number of tokens N (rows of x)",
                 " on every rank, got ", ns);
}

// An error found on this rank before or during an op: the rank keeps taking part in the rounds,
// with status 1 in its messages, so that its peers stop with it instead of timing out.
struct LocalError {
  std::string message;
  ErrorKind kind = ErrorKind::kRuntime;
  bool empty() const { return message.empty(); }
  void set(const Error& e) {
    if (message.empty()) message = e.what(), kind = e.kind();
  }
  void set(std::string text, ErrorKind k = ErrorKind::kRuntime) {
    if (message.empty()) message = std::move(text), kind = k;
  }
  void raise() const {
    if (!message.empty()) throw Error(kind, message);
  }
};

int64_t rows_per_round(const Exchange& ex, size_t stride, const char* op) {
  const int64_t rows = static_cast<int64_t>(ex.payload_bytes() / stride);
  FA2A_CHECK(rows >= 1, "fused_a2a ", op, ": the buffer slot (", ex.payload_bytes(),
             " bytes) cannot hold one round of ", stride,
             " bytes; create the buffer with more bytes (init_hybrid_ep_buffer)");
  return rows;
}

// The first checks of an op whose rows follow a dispatch handle: the handle was made for N
// tokens (n_is describes this call's N), the buffer holds a round of round_bytes per token, and
// the handle's expert layout. A failure is kept in `rejected`; this rank then takes part in one
// round with status 1, so that every rank stops after that round, then raises.
struct RoundPlan {
  LocalError rejected;
  int64_t T = 1;  // tokens per round
  std::optional<Layout> layout;
};

RoundPlan plan_rounds(const Exchange& ex, const char* op, const std::string& n_is, int64_t N,
                      const int32_t* meta, size_t round_bytes, const int32_t* src_expert_counts,
                      int L, int64_t pad_multiple, int64_t P) {
  RoundPlan plan;
  try {
    FA2A_CHECK(meta[kHybridMetaNumTokens] == N, "fused_a2a ", op, ": ", n_is,
               " but the handle was made for N = ", meta[kHybridMetaNumTokens]);
    plan.T = rows_per_round(ex, round_bytes, op);
    plan.layout.emplace(src_expert_counts, ex.num_ranks(), L, pad_multiple, P);
  } catch (const Error& e) {
    plan.rejected.set(e);
    plan.T = 1;
  }
  return plan;
}

int64_t dispatch_flags(const HybridDispatchArgs& a) {
  return static_cast<int64_t>(a.x_dtype) | (a.x_scales ? 256 : 0) | (a.probs ? 512 : 0) |
         (a.quantize_fp8 ? 1024 : 0);
}

// Zeroes rows [begin, end) clipped to [0, P) of every row output.
void zero_rows(const HybridDispatchArgs& a, size_t x_row, int64_t scale_cols, bool write_handle,
               int64_t begin, int64_t end) {
  begin = std::min(begin, a.num_rows);
  end = std::min(end, a.num_rows);
  if (begin >= end) return;
  const int64_t n = end - begin;
  std::memset(static_cast<uint8_t*>(a.permuted_x) + begin * x_row, 0, n * x_row);
  if (a.permuted_scales) std::fill_n(a.permuted_scales + begin * scale_cols, n * scale_cols, 0.0f);
  if (a.permuted_probs) std::fill_n(a.permuted_probs + begin, n, 0.0f);
  if (write_handle) std::fill_n(a.row_token + begin, n, -1);
}

}  // namespace

size_t hybrid_dispatch_row_bytes(int64_t hidden, size_t value_bytes, bool scales, bool probs,
                                 int num_local_experts) {
  return DispatchRow(hidden, value_bytes, scales, probs, num_local_experts).stride;
}

size_t hybrid_combine_row_bytes(int64_t hidden, size_t value_bytes) {
  return combine_stride(hidden, value_bytes);
}

int64_t hybrid_dispatch_notify(Buffer& buffer, const HybridDispatchArgs& a) {
  const char* op = "hybrid dispatch";
  Exchange ex(buffer, op);
  const int num_ranks = ex.num_ranks();
  const int L = a.num_local_experts;
  const int E = a.num_experts;
  // A rank that cannot take part tells its peers in this round (status), then raises.
  LocalError rejected;
  if (ex.payload_bytes() < (L + 1) * sizeof(int32_t)) {
    rejected.set(str_cat("fused_a2a ", op, ": the buffer is too small for the counts of ", L,
                         " local experts"),
                 ErrorKind::kValue);
  }
  if (a.num_tokens * num_ranks > INT32_MAX) {
    rejected.set(str_cat("fused_a2a ", op, ": ", num_ranks, " ranks x N = ", a.num_tokens,
                         " tokens do not fit int32 global token ids"),
                 ErrorKind::kValue);
  }
  std::vector<int32_t> per_expert(E, 0);
  int32_t fanout = 0;
  for (int64_t t = 0; t < (rejected.empty() ? a.num_tokens : 0); ++t) {
    const uint8_t* routed = a.routing_map + t * E;
    for (int d = 0; d < num_ranks; ++d) {
      int32_t picked = 0;
      for (int j = 0; j < L; ++j) {
        if (routed[d * L + j]) ++per_expert[d * L + j], ++picked;
      }
      fanout = std::max(fanout, picked);
    }
  }
  int64_t aux[5];
  shape_aux(aux, a.num_tokens, a.hidden, E, dispatch_flags(a), 0);
  for (int dst = 0; dst < num_ranks; ++dst) {
    auto* out = reinterpret_cast<int32_t*>(ex.send_payload(dst, "notify"));
    if (rejected.empty()) {
      std::memcpy(out, per_expert.data() + dst * L, L * sizeof(int32_t));
      out[L] = fanout;
    }
    ex.publish(dst, OpTag::kHybridNotify, L, aux, rejected.empty() ? 0 : 1);
  }
  ex.wait_all_messages(OpTag::kHybridNotify, "notify");
  static const char* const names[5] = {
      "N", "hidden size", "num_experts (E = G * num_local_experts)",
      "dtype (or probs / FP8 scales presence, fp8_dispatch)", "unused"};
  const std::vector<int> failed = failed_ranks(ex);
  std::string error;
  if (failed.empty()) error = unequal_tokens(ex, op);
  if (failed.empty() && error.empty()) error = disagreement(ex, op, names, 1);
  int32_t group_fanout = 1;
  if (failed.empty() && error.empty()) {
    for (int src = 0; src < num_ranks; ++src) {
      const auto* counts = reinterpret_cast<const int32_t*>(ex.payload(src));
      std::memcpy(a.src_expert_counts + src * L, counts, L * sizeof(int32_t));
      group_fanout = std::max(group_fanout, counts[L]);
    }
  }
  ex.finish_round();  // before throwing, so that the buffer stays usable after the error
  rejected.raise();
  FA2A_CHECK(failed.empty(), peers_failed(op, failed, "rejected their input; no data was moved"));
  FA2A_CHECK(error.empty(), error);
  const Layout layout(a.src_expert_counts, num_ranks, L, a.pad_multiple, 0);
  FA2A_CHECK(layout.total <= INT32_MAX, "fused_a2a ", op, ": ", layout.total,
             " permuted rows do not fit int32 row indices");
  for (int j = 0; j < L; ++j) a.tokens_per_expert[j] = static_cast<int32_t>(layout.padded[j]);
  a.meta[kHybridMetaTotalRows] = static_cast<int32_t>(layout.total);
  a.meta[kHybridMetaOverflow] = 0;
  a.meta[kHybridMetaNumTokens] = static_cast<int32_t>(a.num_tokens);
  a.meta[kHybridMetaMaxFanout] = group_fanout;
  return layout.total;
}

void hybrid_dispatch_data(Buffer& buffer, const HybridDispatchArgs& a, bool cached) {
  const char* op = cached ? "hybrid dispatch (cached, combine backward)" : "hybrid dispatch";
  Exchange ex(buffer, op);
  const int num_ranks = ex.num_ranks();
  const int L = a.num_local_experts;
  const int E = a.num_experts;
  const int64_t N = a.num_tokens, H = a.hidden, P = a.num_rows;
  const DType row_dtype = a.quantize_fp8 ? DType::kE4M3 : a.x_dtype;
  const bool fp8 = row_dtype == DType::kE4M3;
  const size_t x_row = H * dtype_size(row_dtype);
  const int64_t scale_cols = fp8 ? H / kFp8BlockSize : 0;
  const DispatchRow row(H, dtype_size(row_dtype), fp8, a.probs != nullptr, L);
  RoundPlan plan = plan_rounds(ex, op, str_cat("x has ", N, " rows"), N, a.meta, row.stride,
                               a.src_expert_counts, L, a.pad_multiple, P);
  LocalError& rejected = plan.rejected;
  const int64_t T = plan.T;
  const std::optional<Layout>& layout = plan.layout;
  const int64_t rounds = rejected.empty() ? std::max<int64_t>(1, (N + T - 1) / T) : 1;
  std::vector<int64_t> received(static_cast<size_t>(num_ranks) * L, 0);
  // FP8: each token is quantised once per round, then copied to every rank it goes to.
  std::vector<uint8_t> q(a.quantize_fp8 ? T * x_row : 0);
  std::vector<float> q_scales(a.quantize_fp8 ? T * scale_cols : 0);
  int64_t aux[5];
  shape_aux(aux, N, H, dispatch_flags(a), L, T);
  static const char* const names[5] = {"N", "hidden size",
                                       "dtype (or probs / FP8 scales presence, fp8_dispatch)",
                                       "num_local_experts", "round size"};
  std::string mismatch;     // the same verdict on every rank (ValueError)
  LocalError error;         // a row this rank's handle does not expect (RuntimeError)
  std::vector<int> failed;  // ranks that reported an error (status) in the last round

  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t t0 = round * T, t1 = std::min(N, t0 + T);
    const bool failing = !rejected.empty() || !error.empty();
    if (a.quantize_fp8 && !failing) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* routed = a.routing_map + t * E;
        if (std::none_of(routed, routed + E, [](uint8_t b) { return b != 0; })) continue;
        fp8_quantize_row(static_cast<const uint8_t*>(a.x) + t * H * dtype_size(a.x_dtype),
                         a.x_dtype, H, q.data() + (t - t0) * x_row,
                         q_scales.data() + (t - t0) * scale_cols);
      }
    }
    for (int dst = 0; dst < num_ranks; ++dst) {
      uint8_t* out = ex.send_payload(dst, "data");
      int64_t count = 0;
      for (int64_t t = t0; t < t1 && !failing; ++t) {
        const uint8_t* routed = a.routing_map + t * E + dst * L;
        if (std::none_of(routed, routed + L, [](uint8_t b) { return b != 0; })) continue;
        uint8_t* p = out + count * row.stride;
        if (a.quantize_fp8) {
          std::memcpy(p, q.data() + (t - t0) * x_row, x_row);
          std::memcpy(p + row.x_bytes, q_scales.data() + (t - t0) * scale_cols, scale_cols * 4);
        } else {
          std::memcpy(p, static_cast<const uint8_t*>(a.x) + t * x_row, x_row);
          if (fp8) std::memcpy(p + row.x_bytes, a.x_scales + t * scale_cols, scale_cols * 4);
        }
        p += row.x_bytes + row.scale_bytes;
        if (a.probs) {
          auto* probs = reinterpret_cast<float*>(p);
          for (int j = 0; j < L; ++j) probs[j] = routed[j] ? a.probs[t * E + dst * L + j] : 0.0f;
        }
        p += row.prob_bytes;
        for (int j = 0; j < L; ++j) p[j] = routed[j] ? 1 : 0;
        *reinterpret_cast<int32_t*>(p + row.mask_bytes) = static_cast<int32_t>(t);
        ++count;
      }
      ex.publish(dst, OpTag::kHybridData, count, aux, failing ? 1 : 0);
    }
    ex.wait_all_messages(OpTag::kHybridData, "data");
    failed = failed_ranks(ex);
    if (failed.empty()) mismatch = unequal_tokens(ex, op);
    if (failed.empty() && mismatch.empty()) mismatch = disagreement(ex, op, names, 1);
    if (!failed.empty() || !mismatch.empty()) {  // the same on every rank: all stop here
      ex.finish_round();
      break;
    }
    // Fused permute: each arriving row goes straight to every (expert, position) it belongs to.
    for (int src = 0; src < num_ranks && error.empty(); ++src) {
      const uint8_t* in = ex.payload(src);
      for (int64_t i = 0; i < ex.header(src).count && error.empty(); ++i) {
        const uint8_t* p = in + i * row.stride;
        const uint8_t* scales = p + row.x_bytes;
        const auto* probs = reinterpret_cast<const float*>(scales + row.scale_bytes);
        const uint8_t* mask = scales + row.scale_bytes + row.prob_bytes;
        const int32_t t = *reinterpret_cast<const int32_t*>(mask + row.mask_bytes);
        for (int j = 0; j < L; ++j) {
          if (!mask[j]) continue;
          const int64_t k = received[src * L + j]++;
          if (k >= a.src_expert_counts[src * L + j]) {
            error.set(str_cat("fused_a2a ", op, ": rank ", src, " sent more rows for local expert ",
                              j, " than the handle counts (", a.src_expert_counts[src * L + j],
                              "): the handle does not belong to this routing_map"));
            break;
          }
          const int64_t position = layout->seg_start[src * L + j] + k;
          if (position >= P) continue;  // static P overflow: dropped
          std::memcpy(static_cast<uint8_t*>(a.permuted_x) + position * x_row, p, x_row);
          if (fp8) {
            std::memcpy(a.permuted_scales + position * scale_cols, scales, scale_cols * 4);
          }
          if (a.probs) a.permuted_probs[position] = probs[j];
          if (!cached) a.row_token[position] = static_cast<int32_t>(src * N + t);
        }
      }
    }
    ex.finish_round();
  }
  rejected.raise();
  error.raise();
  FA2A_CHECK_RUNTIME(failed.empty(), peers_failed(op, failed, "failed in this op"));
  FA2A_CHECK(mismatch.empty(), mismatch);
  for (int s = 0; s < num_ranks; ++s) {
    for (int j = 0; j < L; ++j) {
      FA2A_CHECK_RUNTIME(received[s * L + j] == a.src_expert_counts[s * L + j], "fused_a2a ", op,
                         ": rank ", s, " sent ", received[s * L + j], " rows for local expert ", j,
                         " but the handle counts ", a.src_expert_counts[s * L + j],
                         ": the handle does not belong to this routing_map");
    }
  }
  // Padding rows of each expert, then the tail past the padded total: zeros.
  for (int j = 0; j < L; ++j) {
    zero_rows(a, x_row, scale_cols, !cached, layout->offset[j] + layout->count[j],
              layout->offset[j] + layout->padded[j]);
  }
  zero_rows(a, x_row, scale_cols, !cached, layout->total, P);
  if (cached) return;
  for (int j = 0; j < L; ++j) a.tokens_per_expert[j] = static_cast<int32_t>(layout->clipped(j));
  a.meta[kHybridMetaOverflow] = layout->total > P ? 1 : 0;
}

void hybrid_combine(Buffer& buffer, const HybridCombineArgs& a) {
  const char* op = "hybrid combine";
  Exchange ex(buffer, op);
  const int num_ranks = ex.num_ranks();
  const int L = a.num_local_experts;
  const int E = num_ranks * L;
  const int64_t N = a.num_tokens, H = a.hidden, P = a.num_rows;
  const size_t y_row = H * dtype_size(a.y_dtype);
  const size_t y_bytes = align16(y_row);
  const size_t stride = combine_stride(H, dtype_size(a.y_dtype));
  const int64_t fanout = std::max<int32_t>(1, a.meta[kHybridMetaMaxFanout]);
  RoundPlan plan = plan_rounds(ex, op, str_cat("num_tokens is ", N), N, a.meta, stride * fanout,
                               a.src_expert_counts, L, a.pad_multiple, P);
  LocalError& rejected = plan.rejected;
  int64_t& T = plan.T;
  const std::optional<Layout>& layout = plan.layout;
  std::vector<int64_t> cursor, end;
  if (layout) {
    cursor = layout->seg_start;
    end.resize(cursor.size());
    for (size_t i = 0; i < end.size(); ++i) {
      // Rows at positions >= P were dropped by a static P: nothing to send back for them.
      end[i] = std::max(layout->seg_start[i],
                        std::min(layout->seg_start[i] + a.src_expert_counts[i], P));
    }
  }
  // Each (destination, expert) segment of row_token must hold ascending tokens of that
  // destination: else some rows would never be sent back and the peers' sums would silently miss
  // them. Checked up front, so that the peers learn it in the first round.
  for (size_t i = 0; i < end.size() && rejected.empty(); ++i) {
    const int64_t g0 = static_cast<int64_t>(i / L) * N, g1 = g0 + N;
    for (int64_t c = cursor[i], previous = g0 - 1; c < end[i]; previous = a.row_token[c++]) {
      if (a.row_token[c] <= previous || a.row_token[c] >= g1) {
        rejected.set(str_cat("fused_a2a ", op, ": corrupt handle: row ", c, " has token ",
                             a.row_token[c], ", expected one in (", previous, ", ", g1,
                             ") (the handle does not belong to this dispatch)"));
        break;
      }
    }
  }
  if (!rejected.empty()) T = 1;
  const int64_t rounds = rejected.empty() ? std::max<int64_t>(1, (N + T - 1) / T) : 1;
  if (a.out_probs) std::fill_n(a.out_probs, N * E, 0.0f);
  std::vector<float> acc(static_cast<size_t>(std::min(T, std::max<int64_t>(N, 1))) * H);
  int64_t aux[5];
  shape_aux(aux, N, H, static_cast<int64_t>(a.y_dtype), a.probs ? 1 : 0, T);
  static const char* const names[5] = {"N", "hidden size", "dtype", "probs presence", "round size"};
  std::string mismatch;     // the same verdict on every rank (ValueError)
  LocalError error;         // this rank's handle does not fit the messages (RuntimeError)
  std::vector<int> failed;  // ranks that reported an error (status) in the last round

  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t t0 = round * T, t1 = std::min(N, t0 + T);
    // First check this round's rows of the handle for every destination, so that the status in
    // every message of the round is the same (every rank then stops after the same round).
    std::vector<int64_t> next = cursor;
    for (int dst = 0; dst < num_ranks && rejected.empty() && error.empty(); ++dst) {
      const int64_t g0 = dst * N + t0, g1 = dst * N + t1;
      int64_t count = 0;
      for (int j = 0; j < L && error.empty(); ++j) {
        int64_t& c = next[dst * L + j];
        for (; c < end[dst * L + j] && a.row_token[c] < g1; ++c, ++count) {
          if (a.row_token[c] < g0 || count >= T * fanout) {
            error.set(str_cat("fused_a2a ", op, ": corrupt handle: row ", c, " has token ",
                              a.row_token[c], ", expected one in [", g0, ", ", g1, ")"));
            break;
          }
        }
      }
    }
    const bool failing = !rejected.empty() || !error.empty();
    for (int dst = 0; dst < num_ranks; ++dst) {
      uint8_t* out = ex.send_payload(dst, "data");
      int64_t count = 0;
      for (int j = 0; j < L && !failing; ++j) {
        for (int64_t c = cursor[dst * L + j]; c < next[dst * L + j]; ++c, ++count) {
          uint8_t* p = out + count * stride;
          std::memcpy(p, static_cast<const uint8_t*>(a.y) + c * y_row, y_row);
          auto* tail = reinterpret_cast<int32_t*>(p + y_bytes);
          tail[0] = static_cast<int32_t>(a.row_token[c] - dst * N);
          tail[1] = j;
          reinterpret_cast<float*>(tail)[2] = a.probs ? a.probs[c] : 0.0f;
        }
      }
      ex.publish(dst, OpTag::kHybridCombine, count, aux, failing ? 1 : 0);
    }
    if (!failing) cursor.swap(next);
    ex.wait_all_messages(OpTag::kHybridCombine, "data");
    failed = failed_ranks(ex);
    if (failed.empty()) mismatch = unequal_tokens(ex, op);
    if (failed.empty() && mismatch.empty()) mismatch = disagreement(ex, op, names, 1);
    if (!failed.empty() || !mismatch.empty()) {  // the same on every rank: all stop here
      ex.finish_round();
      break;
    }
    if (t0 < t1) {
      std::fill_n(acc.begin(), (t1 - t0) * H, 0.0f);
      for (int src = 0; src < num_ranks && error.empty(); ++src) {
        const uint8_t* in = ex.payload(src);  // ranks ascending, experts ascending within
        for (int64_t i = 0; i < ex.header(src).count; ++i) {
          const uint8_t* p = in + i * stride;
          const auto* tail = reinterpret_cast<const int32_t*>(p + y_bytes);
          const int64_t t = tail[0];
          const int j = tail[1];
          if (t < t0 || t >= t1 || j < 0 || j >= L) {
            error.set(str_cat("fused_a2a ", op, ": rank ", src, " sent a row for token ", t,
                              " (expert ", j, ") outside [", t0, ", ", t1,
                              "): the handle does not belong to this group"));
            break;
          }
          float* row_acc = acc.data() + (t - t0) * H;
          for (int64_t h = 0; h < H; ++h) row_acc[h] += load_as_f32(p, h, a.y_dtype);
          if (a.out_probs) {
            a.out_probs[t * E + src * L + j] = reinterpret_cast<const float*>(tail)[2];
          }
        }
      }
      for (int64_t t = t0; t < t1 && error.empty(); ++t) {
        void* out_row = static_cast<uint8_t*>(a.out) + t * y_row;
        const float* row_acc = acc.data() + (t - t0) * H;
        for (int64_t h = 0; h < H; ++h) store_from_f32(out_row, h, a.y_dtype, row_acc[h]);
      }
    }
    ex.finish_round();
  }
  rejected.raise();
  error.raise();
  FA2A_CHECK_RUNTIME(failed.empty(), peers_failed(op, failed, "failed in this op"));
  FA2A_CHECK(mismatch.empty(), mismatch);
  for (size_t i = 0; i < cursor.size(); ++i) {
    FA2A_CHECK_RUNTIME(cursor[i] == end[i], "fused_a2a ", op,
                       ": corrupt handle: ", end[i] - cursor[i], " rows of source rank ", i / L,
                       ", local expert ", i % L, " were not sent back (row_token out of order)");
  }
}

}  // namespace fa2a::cpu
