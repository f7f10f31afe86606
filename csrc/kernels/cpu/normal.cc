// CPU backend of normal mode (SEMANTICS.md section 1) on top of the round exchange.
//
// Dispatch: a notify round (counts per destination, per local expert, N and shapes), then data
// rounds; data round k carries every sender's tokens [kT, (k+1)T) to the ranks they go to, so
// the receiver appends them in (source rank, source token) order. Combine: round k carries, to
// every source rank s, the rows of s's tokens [kT, (k+1)T), so all contributions to one token
// arrive in the same round and are summed in ascending rank order.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "convert.h"
#include "core/backends.h"
#include "exchange.h"
#include "fused_a2a/errors.h"

namespace fa2a::cpu {
namespace {

// Which ranks each token goes to: [N, G] bytes.
std::vector<uint8_t> token_destinations(const void* topk_idx, DType idx_dtype, int64_t num_tokens,
                                        int num_topk, int num_local_experts, int num_ranks) {
  std::vector<uint8_t> in_rank(static_cast<size_t>(num_tokens) * num_ranks, 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int k = 0; k < num_topk; ++k) {
      int64_t expert = load_index(topk_idx, t * num_topk + k, idx_dtype);
      if (expert >= 0) in_rank[t * num_ranks + expert / num_local_experts] = 1;
    }
  }
  return in_rank;
}

// Layout of one row in a dispatch message.
struct DispatchRow {
  size_t x_bytes, scale_bytes, idx_bytes, weight_bytes, stride;
  DispatchRow(const DispatchArgs& a)
      : x_bytes(align16(a.hidden * dtype_size(a.x_dtype))),
        scale_bytes(a.x_scales ? align16(a.hidden / kFp8BlockSize * 4) : 0),
        idx_bytes(align16(a.num_topk * 4)),
        weight_bytes(a.topk_weights ? align16(a.num_topk * 4) : 0),
        stride(x_bytes + scale_bytes + idx_bytes + weight_bytes + 16) {}
};

// Shapes every rank must agree on, sent in each message header.
void shape_aux(int64_t aux[5], int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) {
  aux[0] = a, aux[1] = b, aux[2] = c, aux[3] = d, aux[4] = e;
}

void check_agreement(const Exchange& ex, const char* op, const char* const names[5], int first,
                     int last) {
  const int64_t* mine = ex.header(ex.rank()).aux;
  for (int src = 0; src < ex.num_ranks(); ++src) {
    const int64_t* theirs = ex.header(src).aux;
    for (int i = first; i < last; ++i) {
      FA2A_CHECK(theirs[i] == mine[i], "fused_a2a ", op, ": ", names[i],
                 " differs between ranks: ", "rank ", src, " has ", theirs[i], ", rank ", ex.rank(),
                 " has ", mine[i]);
    }
  }
}

int64_t rows_per_round(const Exchange& ex, size_t stride, const char* op) {
  int64_t rows = static_cast<int64_t>(ex.payload_bytes() / stride);
  FA2A_CHECK(rows >= 1, "fused_a2a ", op, ": the buffer slot (", ex.payload_bytes(),
             " bytes) cannot hold one row of ", stride,
             " bytes; create the buffer with more bytes");
  return rows;
}

// A dispatch handle's per-source row counts must be >= 0 (they place rows in the outputs).
std::string check_counts(const int32_t* counts, int num_ranks, const char* op) {
  for (int s = 0; s < num_ranks; ++s) {
    if (counts[s] < 0) {
      return str_cat("fused_a2a ", op, ": the handle's recv_src_counts[", s, "] = ", counts[s],
                     " is negative: the handle is corrupt or not from this group's dispatch");
    }
  }
  return "";
}

// What combine reads of a handle: counts >= 0 summing to at most the rows of y, and each source's
// tokens strictly increasing in [0, group_max_tokens).
std::string check_combine_handle(const CombineArgs& a, int num_ranks) {
  std::string bad = check_counts(a.recv_src_counts, num_ranks, "combine");
  if (!bad.empty()) return bad;
  int64_t row = 0;
  for (int s = 0; s < num_ranks; ++s) {
    if (row + a.recv_src_counts[s] > a.num_rows) {
      return str_cat("fused_a2a combine: the handle says ", row + a.recv_src_counts[s],
                     " or more rows were received but y has only ", a.num_rows, " rows");
    }
    for (int64_t j = 0; j < a.recv_src_counts[s]; ++j, ++row) {
      const int64_t token = a.recv_src_token[row];
      const int64_t previous = j ? a.recv_src_token[row - 1] : -1;
      if (token <= previous || token >= *a.group_max_tokens) {
        return str_cat("fused_a2a combine: the handle's recv_src_token[", row, "] = ", token,
                       " is out of order or out of range [0, ", *a.group_max_tokens,
                       "): the handle is corrupt or not from this group's dispatch");
      }
    }
  }
  return "";
}

}  // namespace

void layout(const void* topk_idx, DType idx_dtype, int64_t num_tokens, int num_topk,
            int num_experts, int num_ranks, int32_t* num_tokens_per_rank,
            int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank) {
  const int num_local = num_experts / num_ranks;
  std::fill(num_tokens_per_rank, num_tokens_per_rank + num_ranks, 0);
  std::fill(num_tokens_per_expert, num_tokens_per_expert + num_experts, 0);
  auto in_rank =
      token_destinations(topk_idx, idx_dtype, num_tokens, num_topk, num_local, num_ranks);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int k = 0; k < num_topk; ++k) {
      int64_t expert = load_index(topk_idx, t * num_topk + k, idx_dtype);
      if (expert >= 0) ++num_tokens_per_expert[expert];
    }
    for (int r = 0; r < num_ranks; ++r) num_tokens_per_rank[r] += in_rank[t * num_ranks + r];
  }
  std::memcpy(is_token_in_rank, in_rank.data(), in_rank.size());
}

void dispatch_notify(Buffer& buffer, const DispatchArgs& a) {
  Exchange ex(buffer, "dispatch", a.call_tag);
  const int num_ranks = ex.num_ranks();
  const int num_local = a.num_experts / num_ranks;
  FA2A_CHECK(ex.payload_bytes() >= num_local * sizeof(int32_t),
             "fused_a2a dispatch: the buffer "
             "is too small for the counts of ",
             num_local, " local experts");
  // A bad topk_idx on this rank is reported to every rank through the notify round, so that no
  // peer is left waiting; this rank raises the details after the round.
  std::string rejected;
  try {
    check_topk_values(a.topk_idx, a.idx_dtype, a.num_tokens, a.num_topk, a.num_experts);
  } catch (const Error& e) {
    rejected = e.what();
  }
  const int64_t valid_tokens = rejected.empty() ? a.num_tokens : 0;
  auto in_rank =
      token_destinations(a.topk_idx, a.idx_dtype, valid_tokens, a.num_topk, num_local, num_ranks);
  std::vector<int64_t> tokens_to(num_ranks, 0);
  std::vector<int32_t> expert_counts(a.num_experts, 0);
  for (int64_t t = 0; t < valid_tokens; ++t) {
    for (int r = 0; r < num_ranks; ++r) tokens_to[r] += in_rank[t * num_ranks + r];
    for (int k = 0; k < a.num_topk; ++k) {
      int64_t expert = load_index(a.topk_idx, t * a.num_topk + k, a.idx_dtype);
      if (expert >= 0) ++expert_counts[expert];
    }
  }
  int64_t aux[5];
  const int64_t flags =
      static_cast<int64_t>(a.x_dtype) | (a.x_scales ? 256 : 0) | (a.topk_weights ? 512 : 0);
  shape_aux(aux, a.num_tokens, a.hidden, a.num_topk, a.num_experts, flags);
  for (int dst = 0; dst < num_ranks; ++dst) {
    std::memcpy(ex.send_payload(dst, "notify"), expert_counts.data() + dst * num_local,
                num_local * sizeof(int32_t));
    ex.publish(dst, OpTag::kDispatchNotify, tokens_to[dst], aux, rejected.empty() ? 0 : 1);
  }
  ex.wait_all_messages(OpTag::kDispatchNotify, "notify");
  int64_t total = 0, group_max = 0;
  std::fill(a.tokens_per_expert, a.tokens_per_expert + num_local, 0);
  for (int src = 0; src < num_ranks; ++src) {
    const MessageHeader& h = ex.header(src);
    a.recv_src_counts[src] = static_cast<int32_t>(h.count);
    total += h.count;
    group_max = std::max(group_max, h.aux[0]);
    auto* counts = reinterpret_cast<const int32_t*>(ex.payload(src));
    for (int j = 0; j < num_local; ++j) a.tokens_per_expert[j] += counts[j];
  }
  static const char* const names[5] = {"N", "hidden size", "num_topk", "num_experts",
                                       "dtype (or weights / FP8 scales presence)"};
  // Every rank sees every header, so every rank reaches the same verdict: finish the round first
  // so that the buffer stays usable after the error.
  std::string disagreement;
  try {
    check_agreement(ex, "dispatch", names, 1, 5);
  } catch (const Error& e) {
    disagreement = e.what();
  }
  const std::vector<int> rejecting = failed_ranks(ex);
  ex.finish_round();
  FA2A_CHECK(rejected.empty(), rejected);
  FA2A_CHECK(rejecting.empty(),
             peers_failed("dispatch", rejecting,
                          "rejected their input: topk_idx out of range; no data was moved"));
  FA2A_CHECK(disagreement.empty(), disagreement);
  *a.num_recv = static_cast<int32_t>(total);
  *a.group_max_tokens = static_cast<int32_t>(group_max);
  if (a.host_counts) {
    a.host_counts[0] = *a.num_recv;
    a.host_counts[1] = 0;
    a.host_counts[2] = *a.group_max_tokens;
    std::copy(a.tokens_per_expert, a.tokens_per_expert + num_local, a.host_counts + 3);
  }
}

void dispatch_data(Buffer& buffer, const DispatchArgs& a) {
  Exchange ex(buffer, "dispatch", a.call_tag);
  const int num_ranks = ex.num_ranks();
  const int num_local = a.num_experts / num_ranks;
  const int K = a.num_topk;
  const DispatchRow row(a);
  if (a.tokens_per_expert) std::fill(a.tokens_per_expert, a.tokens_per_expert + num_local, 0);
  const int64_t T = rows_per_round(ex, row.stride, "dispatch");
  const int64_t rounds = (*a.group_max_tokens + T - 1) / T;
  const size_t x_row = a.hidden * dtype_size(a.x_dtype);
  const size_t scale_row = a.x_scales ? a.hidden / kFp8BlockSize * sizeof(float) : 0;
  auto in_rank = token_destinations(a.topk_idx, a.idx_dtype, a.num_tokens, K, num_local, num_ranks);

  // A corrupt handle on this rank stops every rank after round 0 (status), before any row is
  // placed: negative counts would place rows before the outputs.
  const std::string rejected = check_counts(a.recv_src_counts, num_ranks, "dispatch");
  FA2A_CHECK(rounds > 0 || rejected.empty(), rejected);
  std::vector<int64_t> offset(num_ranks + 1, 0), received(num_ranks, 0);
  for (int s = 0; s < num_ranks && rejected.empty(); ++s) {
    offset[s + 1] = offset[s] + a.recv_src_counts[s];
  }
  int64_t aux[5];
  const int64_t flags =
      static_cast<int64_t>(a.x_dtype) | (a.x_scales ? 256 : 0) | (a.topk_weights ? 512 : 0);
  shape_aux(aux, a.hidden, K, a.num_experts, flags, T);
  int64_t dropped = 0;
  std::string disagreement;
  static const char* const names[5] = {"hidden size", "num_topk", "num_experts",
                                       "dtype (or weights / FP8 scales presence)", "round size"};

  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t t0 = round * T, t1 = std::min<int64_t>(a.num_tokens, t0 + T);
    for (int dst = 0; dst < num_ranks; ++dst) {
      uint8_t* out = ex.send_payload(dst, "data");
      int64_t count = 0;
      for (int64_t t = t0; t < t1 && rejected.empty(); ++t) {
        if (!in_rank[t * num_ranks + dst]) continue;
        uint8_t* p = out + count * row.stride;
        std::memcpy(p, static_cast<const uint8_t*>(a.x) + t * x_row, x_row);
        p += row.x_bytes;
        if (a.x_scales) std::memcpy(p, a.x_scales + t * (scale_row / 4), scale_row);
        p += row.scale_bytes;
        auto* idx = reinterpret_cast<int32_t*>(p);
        auto* weights = reinterpret_cast<float*>(p + row.idx_bytes);
        for (int k = 0; k < K; ++k) {
          int64_t expert = load_index(a.topk_idx, t * K + k, a.idx_dtype);
          bool owned = expert >= 0 && expert / num_local == dst;
          idx[k] = owned ? static_cast<int32_t>(expert - dst * num_local) : -1;
          if (a.topk_weights) weights[k] = owned ? a.topk_weights[t * K + k] : 0.0f;
        }
        p += row.idx_bytes + row.weight_bytes;
        *reinterpret_cast<int32_t*>(p) = static_cast<int32_t>(t);
        ++count;
      }
      ex.publish(dst, OpTag::kDispatchData, count, aux, rejected.empty() ? 0 : 1);
    }
    ex.wait_all_messages(OpTag::kDispatchData, "data");
    if (const std::vector<int> failed = failed_ranks(ex); !failed.empty()) {
      ex.finish_round();
      FA2A_CHECK(rejected.empty(), rejected);
      FA2A_FAIL(ErrorKind::kValue, peers_failed("dispatch", failed, "rejected their handle"));
    }
    if (disagreement.empty()) {
      try {
        check_agreement(ex, "dispatch", names, 0, 5);
      } catch (const Error& e) {
        disagreement = e.what();
      }
    }
    for (int src = 0; src < num_ranks && disagreement.empty(); ++src) {
      const uint8_t* in = ex.payload(src);
      for (int64_t j = 0; j < ex.header(src).count; ++j) {
        const int64_t position = offset[src] + received[src];
        const bool keep = received[src] < a.recv_src_counts[src] && position < a.capacity;
        ++received[src];
        if (!keep) {
          ++dropped;
          continue;
        }
        const uint8_t* p = in + j * row.stride;
        std::memcpy(static_cast<uint8_t*>(a.recv_x) + position * x_row, p, x_row);
        p += row.x_bytes;
        if (a.recv_x_scales)
          std::memcpy(a.recv_x_scales + position * (scale_row / 4), p, scale_row);
        p += row.scale_bytes;
        if (a.recv_topk_idx) std::memcpy(a.recv_topk_idx + position * K, p, K * sizeof(int32_t));
        if (a.recv_topk_idx64) {
          for (int k = 0; k < K; ++k) {
            int32_t v;
            std::memcpy(&v, p + k * sizeof(int32_t), sizeof v);
            a.recv_topk_idx64[position * K + k] = v;
          }
        }
        if (a.recv_topk_weights) {
          std::memcpy(a.recv_topk_weights + position * K, p + row.idx_bytes, K * sizeof(float));
        }
        if (a.tokens_per_expert) {
          for (int k = 0; k < K; ++k) {
            int32_t local = reinterpret_cast<const int32_t*>(p)[k];
            if (local >= 0) ++a.tokens_per_expert[local];
          }
        }
        p += row.idx_bytes + row.weight_bytes;
        a.recv_src_token[position] = *reinterpret_cast<const int32_t*>(p);
      }
    }
    ex.finish_round();
  }
  FA2A_CHECK(disagreement.empty(), disagreement);
  int64_t kept_total = 0;
  for (int s = 0; s < num_ranks; ++s) {
    int64_t kept = std::clamp<int64_t>(a.capacity - offset[s], 0, a.recv_src_counts[s]);
    a.recv_src_counts[s] = static_cast<int32_t>(kept);
    kept_total += kept;
  }
  // Rows past the kept ones: zeros, index -1, weight 0.
  const int64_t tail = a.capacity - kept_total;
  if (tail > 0 && a.recv_x) {  // (no memset on a null pointer, even of 0 bytes)
    std::memset(static_cast<uint8_t*>(a.recv_x) + kept_total * x_row, 0, tail * x_row);
  }
  if (tail > 0 && a.recv_x_scales) {
    std::memset(a.recv_x_scales + kept_total * (scale_row / 4), 0, tail * scale_row);
  }
  if (a.recv_topk_idx)
    std::fill(a.recv_topk_idx + kept_total * K, a.recv_topk_idx + a.capacity * K, -1);
  if (a.recv_topk_idx64)
    std::fill(a.recv_topk_idx64 + kept_total * K, a.recv_topk_idx64 + a.capacity * K, -1);
  if (a.recv_topk_weights) {
    std::fill(a.recv_topk_weights + kept_total * K, a.recv_topk_weights + a.capacity * K, 0.0f);
  }
  std::fill(a.recv_src_token + kept_total, a.recv_src_token + a.capacity, -1);
  if (a.num_recv) *a.num_recv = static_cast<int32_t>(kept_total);
  if (a.num_dropped) *a.num_dropped = static_cast<int32_t>(dropped);
}

void combine(Buffer& buffer, const CombineArgs& a) {
  Exchange ex(buffer, "combine", a.call_tag);
  const int num_ranks = ex.num_ranks();
  const int num_local = a.num_experts / num_ranks;
  const int K = a.num_topk;
  const int64_t H = a.hidden;
  const size_t y_row = H * dtype_size(a.y_dtype);
  const size_t y_bytes = align16(y_row), w_bytes = a.weights ? align16(K * 4) : 0;
  const size_t stride = y_bytes + w_bytes + 16;
  const int64_t T = rows_per_round(ex, stride, "combine");
  const int64_t rounds = (*a.group_max_tokens + T - 1) / T;

  std::vector<int64_t> cursor(num_ranks), end(num_ranks);
  int64_t start = 0;
  for (int s = 0; s < num_ranks; ++s) {
    cursor[s] = start;
    start += a.recv_src_counts[s];
    end[s] = start;
  }
  // A handle that does not fit y or is corrupt stops every rank after round 0 (status), before
  // any row is read; otherwise peers would silently miss this rank's rows.
  const std::string rejected = check_combine_handle(a, num_ranks);
  FA2A_CHECK(rounds > 0 || rejected.empty(), rejected);
  if (!rejected.empty()) {  // send nothing
    cursor.assign(num_ranks, 0);
    end.assign(num_ranks, 0);
  }
  std::vector<float> acc(static_cast<size_t>(T) * H), acc_weights(static_cast<size_t>(T) * K);
  int64_t aux[5];
  shape_aux(aux, H, static_cast<int64_t>(a.y_dtype), K, a.weights ? 1 + a.weights_owner_only : 0,
            T);
  static const char* const names[5] = {"hidden size", "dtype", "num_topk", "weights presence",
                                       "round size"};
  std::string disagreement;

  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t t0 = round * T, t1 = t0 + T;
    for (int dst = 0; dst < num_ranks; ++dst) {
      uint8_t* out = ex.send_payload(dst, "data");
      int64_t count = 0;
      for (; cursor[dst] < end[dst] && a.recv_src_token[cursor[dst]] < t1; ++cursor[dst]) {
        const int64_t i = cursor[dst];
        uint8_t* p = out + count * stride;
        std::memcpy(p, static_cast<const uint8_t*>(a.y) + i * y_row, y_row);
        if (a.weights) std::memcpy(p + y_bytes, a.weights + i * K, K * sizeof(float));
        *reinterpret_cast<int32_t*>(p + y_bytes + w_bytes) = a.recv_src_token[i];
        ++count;
      }
      ex.publish(dst, OpTag::kCombine, count, aux, rejected.empty() ? 0 : 1);
    }
    ex.wait_all_messages(OpTag::kCombine, "data");
    if (const std::vector<int> failed = failed_ranks(ex); !failed.empty()) {
      ex.finish_round();
      FA2A_CHECK(rejected.empty(), rejected);
      FA2A_FAIL(ErrorKind::kValue, peers_failed("combine", failed, "rejected their handle"));
    }
    if (disagreement.empty()) {
      try {
        check_agreement(ex, "combine", names, 0, 5);
      } catch (const Error& e) {
        disagreement = e.what();
      }
    }
    const int64_t local_end = std::min<int64_t>(a.num_tokens, t1);
    if (disagreement.empty() && t0 < local_end) {
      const int64_t n = local_end - t0;
      std::fill(acc.begin(), acc.begin() + n * H, 0.0f);
      std::fill(acc_weights.begin(), acc_weights.begin() + n * K, 0.0f);
      for (int src = 0; src < num_ranks; ++src) {  // ascending rank order: the fixed fp32 order
        const uint8_t* in = ex.payload(src);
        for (int64_t j = 0; j < ex.header(src).count; ++j) {
          const uint8_t* p = in + j * stride;
          const int64_t t = *reinterpret_cast<const int32_t*>(p + y_bytes + w_bytes);
          FA2A_CHECK_RUNTIME(t >= t0 && t < local_end, "fused_a2a combine: rank ", src,
                             " sent a row for token ", t, " outside [", t0, ", ", local_end,
                             "): the handle does not belong to this group");
          float* row_acc = acc.data() + (t - t0) * H;
          for (int64_t h = 0; h < H; ++h) row_acc[h] += load_as_f32(p, h, a.y_dtype);
          if (!a.weights) continue;
          const float* w = reinterpret_cast<const float*>(p + y_bytes);
          float* w_acc = acc_weights.data() + (t - t0) * K;
          for (int k = 0; k < K; ++k) {
            if (!a.weights_owner_only) {
              w_acc[k] += w[k];
            } else {
              int64_t expert = load_index(a.topk_idx, t * K + k, a.idx_dtype);
              if (expert >= 0 && expert / num_local == src) w_acc[k] = w[k];
            }
          }
        }
      }
      for (int64_t t = t0; t < local_end; ++t) {
        void* out_row = static_cast<uint8_t*>(a.out) + t * y_row;
        const float* row_acc = acc.data() + (t - t0) * H;
        for (int64_t h = 0; h < H; ++h) store_from_f32(out_row, h, a.y_dtype, row_acc[h]);
        if (a.weights && a.out_weights) {
          std::memcpy(a.out_weights + t * K, acc_weights.data() + (t - t0) * K, K * sizeof(float));
        }
      }
    }
    ex.finish_round();
  }
  FA2A_CHECK(disagreement.empty(), disagreement);
}

}  // namespace fa2a::cpu
