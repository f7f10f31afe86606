// A driver of the core's CPU backend for sanitizer builds (tests/test_fuzz_asan.py builds it with
// -fsanitize=address,undefined and runs it): ranks are threads of one process, each with its own
// buffer (peers by pointer, the same code path as JAX's CPU devices; the segments are still POSIX
// shared memory). Random sizes for every op and both modes, FP8 included, and bad inputs and
// corrupted handles that must end in an fa2a::Error on every rank; every result is checked exactly
// (integer-valued inputs make every sum exact in every dtype).
//
//   fa2a_asan_driver [iterations=300] [seed=1] [corrupt]
// Prints "OK <iterations> <seconds>" and exits 0, or prints what went wrong and exits 1 (a
// sanitizer error aborts with its own report).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "convert.h"
#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/hybrid.h"
#include "fused_a2a/ops.h"

using namespace fa2a;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  std::fflush(stdout);
  std::exit(1);
}
#define EXPECT(cond, ...) \
  if (!(cond)) die(str_cat(__FILE__, ":", __LINE__, ": ", #cond, " ", ##__VA_ARGS__))

std::mt19937_64 rng;
int64_t uniform(int64_t lo, int64_t hi) {  // [lo, hi]
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

struct Group {
  int64_t gid;
  int G;
  size_t bytes;
  std::vector<std::shared_ptr<Buffer>> buffers;
  Group(int64_t gid_, int G_, size_t bytes_) : gid(gid_), G(G_), bytes(bytes_) {
    std::vector<std::string> infos;
    for (int r = 0; r < G; ++r) {
      buffers.push_back(buffer_create(gid, r, G, bytes, Platform::kCPU, 0));
      infos.push_back(buffers.back()->local_info());
    }
    for (auto& b : buffers) b->connect(infos);
    for (auto& b : buffers) b->seal();
  }
  ~Group() { buffer_release(gid); }
  // Runs fn(rank) on one thread per rank; returns each rank's error text ("" = none).
  std::vector<std::string> run(const std::function<void(int)>& fn) {
    std::vector<std::string> errors(G);
    std::vector<std::thread> threads;
    for (int r = 0; r < G; ++r) {
      threads.emplace_back([&, r] {
        try {
          fn(r);
        } catch (const Error& e) {
          errors[r] = e.what();
          if (errors[r].empty()) errors[r] = "?";
        }
      });
    }
    for (auto& t : threads) t.join();
    return errors;
  }
  void expect_ok(const std::vector<std::string>& errors, const char* what) {
    for (int r = 0; r < G; ++r) EXPECT(errors[r].empty(), what, " rank ", r, ": ", errors[r]);
  }
  void expect_all_fail(const std::vector<std::string>& errors, const char* what) {
    for (int r = 0; r < G; ++r) EXPECT(!errors[r].empty(), what, ": rank ", r, " raised nothing");
  }
};

// Integer-valued rows in [-4, 4] stored as dtype: exact in f32, f16, bf16, and their sums too.
struct Rows {
  DType dtype;
  int64_t n, h;
  std::vector<uint8_t> bytes;
  Rows(DType d, int64_t n_, int64_t h_, bool random = true)
      : dtype(d), n(n_), h(h_), bytes(std::max<int64_t>(n_ * h_, 1) * dtype_size(d)) {
    for (int64_t i = 0; i < n * h && random; ++i) {
      cpu::store_from_f32(bytes.data(), i, dtype, static_cast<float>(uniform(-4, 4)));
    }
  }
  float at(int64_t row, int64_t col) const {
    return cpu::load_as_f32(bytes.data(), row * h + col, dtype);
  }
  void* data() { return bytes.data(); }
};

DType random_float_dtype() {
  const DType all[3] = {DType::kF32, DType::kF16, DType::kBF16};
  return all[uniform(0, 2)];
}

int64_t random_hidden(DType d) { return (16 / dtype_size(d)) * uniform(1, 6); }

// ----------------------------------------------------------------------------- normal mode

void normal_iteration(Group& g, int64_t it) {
  const int G = g.G, L = static_cast<int>(uniform(1, 3)), E = G * L;
  const int K = static_cast<int>(uniform(1, std::min(E, 4)));
  const DType dt = random_float_dtype();
  const int64_t H = random_hidden(dt);
  const bool i64 = uniform(0, 1), weights = uniform(0, 1), static_cap = uniform(0, 2) == 0;
  std::vector<int64_t> N(G);
  std::vector<Rows> xs;
  std::vector<std::vector<int64_t>> idx(G);
  std::vector<std::vector<int32_t>> idx32(G);
  std::vector<std::vector<float>> w(G);
  for (int r = 0; r < G; ++r) {
    N[r] = uniform(0, 24);
    xs.emplace_back(dt, N[r], H);
    idx[r].assign(std::max<int64_t>(N[r] * K, 1), -1);
    for (int64_t t = 0; t < N[r]; ++t) {
      std::vector<int> perm(E);
      for (int e = 0; e < E; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int k = 0; k < K; ++k) idx[r][t * K + k] = uniform(0, 4) ? perm[k] : -1;
    }
    idx32[r].assign(idx[r].begin(), idx[r].end());
    w[r].assign(std::max<int64_t>(N[r] * K, 1), 0.5f);
  }
  const int64_t total = [&] {
    int64_t s = 0;
    for (auto n : N) s += n;
    return s;
  }();
  const int64_t cap = static_cap ? uniform(0, total + 1) : -1;
  std::vector<Rows> recv;
  std::vector<std::vector<int32_t>> counts(G, std::vector<int32_t>(G)), src_token(G);
  std::vector<std::vector<int32_t>> stats(G, std::vector<int32_t>(3)), tpe(G);
  std::vector<std::vector<int32_t>> recv_idx(G);
  std::vector<std::vector<float>> recv_w(G);
  for (int r = 0; r < G; ++r) recv.emplace_back(dt, 0, H, false);
  auto errors = g.run([&](int r) {
    DispatchArgs a;
    a.x = xs[r].data(), a.x_dtype = dt, a.num_tokens = N[r], a.hidden = H;
    a.topk_idx = i64 ? static_cast<const void*>(idx[r].data()) : idx32[r].data();
    a.idx_dtype = i64 ? DType::kI64 : DType::kI32;
    a.num_topk = K, a.num_experts = E, a.topk_weights = weights ? w[r].data() : nullptr;
    tpe[r].assign(L, 0);
    a.recv_src_counts = counts[r].data(), a.tokens_per_expert = tpe[r].data();
    a.num_recv = &stats[r][0], a.num_dropped = &stats[r][1], a.group_max_tokens = &stats[r][2];
    int64_t c = cap;
    if (cap < 0) {
      dispatch_notify(*g.buffers[r], a, Stream{});
      c = stats[r][0];
    }
    recv[r] = Rows(dt, c, H, false);
    src_token[r].assign(c + 1, 0);
    recv_idx[r].assign(std::max<int64_t>(c * K, 1), 0);
    recv_w[r].assign(std::max<int64_t>(c * K, 1), 0);
    a.capacity = c, a.recv_x = c ? recv[r].data() : nullptr, a.recv_src_token = src_token[r].data();
    a.recv_topk_idx = c ? recv_idx[r].data() : nullptr;
    a.recv_topk_weights = c && weights ? recv_w[r].data() : nullptr;
    if (cap < 0) {
      dispatch_data(*g.buffers[r], a, Stream{});
    } else {
      dispatch(*g.buffers[r], a, Stream{});
    }
  });
  g.expect_ok(errors, "dispatch");
  // Every received row is its source row; rows arrive by (source rank, source token).
  std::vector<std::vector<int>> fanin(G);  // per source token: ranks that kept it
  for (int s = 0; s < G; ++s) fanin[s].assign(N[s], 0);
  for (int r = 0; r < G; ++r) {
    int64_t row = 0;
    for (int s = 0; s < G; ++s) {
      int32_t previous = -1;
      for (int32_t j = 0; j < counts[r][s]; ++j, ++row) {
        const int32_t t = src_token[r][row];
        EXPECT(t > previous && t < N[s], "iteration ", it, " rank ", r, " row ", row);
        previous = t;
        ++fanin[s][t];
        for (int64_t h = 0; h < H; ++h) EXPECT(recv[r].at(row, h) == xs[s].at(t, h), "row data");
      }
    }
    for (int64_t i = row; i < recv[r].n; ++i) {
      for (int64_t h = 0; h < H; ++h) EXPECT(recv[r].at(i, h) == 0.0f, "tail row not zero");
    }
  }
  // Combine y = recv_x: out[t] = x[t] * (ranks that kept t).
  std::vector<Rows> outs;
  for (int r = 0; r < G; ++r) outs.emplace_back(dt, N[r], H, false);
  errors = g.run([&](int r) {
    CombineArgs a;
    a.y = recv[r].data(), a.y_dtype = dt, a.num_rows = recv[r].n, a.hidden = H;
    a.recv_src_counts = counts[r].data(), a.recv_src_token = src_token[r].data();
    a.group_max_tokens = &stats[r][2], a.topk_idx = idx[r].data(), a.idx_dtype = DType::kI64;
    a.num_topk = K, a.num_experts = E, a.num_tokens = N[r], a.out = outs[r].data();
    combine(*g.buffers[r], a, Stream{});
  });
  g.expect_ok(errors, "combine");
  for (int s = 0; s < G; ++s) {
    for (int64_t t = 0; t < N[s]; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        EXPECT(outs[s].at(t, h) == xs[s].at(t, h) * fanin[s][t], "combine sum");
      }
    }
  }
}

// ----------------------------------------------------------------------------- HybridEP

void hybrid_iteration(Group& g, int64_t it, bool fp8) {
  const int G = g.G, L = static_cast<int>(uniform(1, 3)), E = G * L;
  const DType dt = fp8 ? DType::kF32 : random_float_dtype();
  const int64_t H = fp8 ? 128 : random_hidden(dt), N = uniform(0, 20);
  const int64_t pad = uniform(0, 2) == 0 ? 4 : 0;
  const bool dynamic = uniform(0, 1);
  const int64_t P_static = uniform(0, 2 * N * L + 3);
  std::vector<Rows> xs;
  std::vector<std::vector<uint8_t>> rmap(G);
  std::vector<std::vector<float>> probs(G);
  for (int r = 0; r < G; ++r) {
    xs.emplace_back(dt, N, H);
    rmap[r].resize(std::max<int64_t>(N * E, 1));
    probs[r].resize(std::max<int64_t>(N * E, 1));
    for (auto& b : rmap[r]) b = uniform(0, 2) == 0;
    for (auto& p : probs[r]) p = static_cast<float>(uniform(1, 8)) / 8;
  }
  const DType out_dt = fp8 ? DType::kE4M3 : dt;
  std::vector<Rows> hidden;
  std::vector<std::vector<float>> scales(G), pprobs(G);
  std::vector<std::vector<int32_t>> counts(G), row_token(G), tpe(G), meta(G);
  for (int r = 0; r < G; ++r) hidden.emplace_back(out_dt, 0, H, false);
  auto errors = g.run([&](int r) {
    HybridDispatchArgs a;
    a.x = xs[r].data(), a.x_dtype = dt, a.num_tokens = N, a.hidden = H;
    a.routing_map = rmap[r].data(), a.probs = probs[r].data(), a.num_experts = E;
    a.num_local_experts = L, a.pad_multiple = pad, a.quantize_fp8 = fp8;
    counts[r].assign(G * L, 0), tpe[r].assign(L, 0), meta[r].assign(kHybridMetaSize, 0);
    a.src_expert_counts = counts[r].data(), a.tokens_per_expert = tpe[r].data();
    a.meta = meta[r].data();
    int64_t P = P_static;
    if (dynamic) {
      hybrid_dispatch_notify(*g.buffers[r], a, Stream{});
      P = meta[r][kHybridMetaTotalRows];
    }
    hidden[r] = Rows(out_dt, P, H, false);
    scales[r].assign(std::max<int64_t>(P * H / 128, 1), -1.0f);
    pprobs[r].assign(std::max<int64_t>(P, 1), -1.0f);
    row_token[r].assign(P + 1, 0);
    a.num_rows = P, a.permuted_x = P ? hidden[r].data() : nullptr;
    a.permuted_probs = P ? pprobs[r].data() : nullptr;
    a.permuted_scales = P && fp8 ? scales[r].data() : nullptr, a.row_token = row_token[r].data();
    if (dynamic) {
      hybrid_dispatch_data(*g.buffers[r], a, Stream{});
    } else {
      hybrid_dispatch(*g.buffers[r], a, Stream{});
    }
  });
  g.expect_ok(errors, "hybrid dispatch");
  std::vector<int> kept(G * N, 0);  // rows of each global token, over ranks and experts
  for (int r = 0; r < G; ++r) {
    for (int64_t row = 0; row < hidden[r].n; ++row) {
      const int32_t gt = row_token[r][row];
      if (gt < 0) {
        for (int64_t h = 0; h < H && !fp8; ++h) EXPECT(hidden[r].at(row, h) == 0.0f, "padding");
        continue;
      }
      EXPECT(gt < G * N, "iteration ", it, " row_token ", gt);
      ++kept[gt];
      for (int64_t h = 0; h < H && !fp8; ++h) {
        EXPECT(hidden[r].at(row, h) == xs[gt / N].at(gt % N, h), "permuted row data");
      }
    }
  }
  // Combine y = hidden (FP8: combine f32 ones): out[t] = x[t] * rows kept (or rows kept).
  std::vector<Rows> ys, outs;
  for (int r = 0; r < G; ++r) {
    ys.emplace_back(fp8 ? DType::kF32 : dt, hidden[r].n, H, false);
    for (int64_t i = 0; i < hidden[r].n * H; ++i) {
      const float v = fp8 ? 1.0f : hidden[r].at(i / H, i % H);
      cpu::store_from_f32(ys[r].data(), i, ys[r].dtype, v);
    }
    outs.emplace_back(ys[r].dtype, N, H, false);
  }
  std::vector<std::vector<float>> out_probs(G, std::vector<float>(std::max<int64_t>(N * E, 1)));
  errors = g.run([&](int r) {
    HybridCombineArgs a;
    a.y = ys[r].data(), a.y_dtype = ys[r].dtype, a.num_rows = ys[r].n, a.hidden = H;
    a.probs = pprobs[r].data(), a.src_expert_counts = counts[r].data();
    a.row_token = row_token[r].data(), a.meta = meta[r].data(), a.num_local_experts = L;
    a.pad_multiple = pad, a.num_tokens = N, a.out = outs[r].data();
    a.out_probs = out_probs[r].data();
    hybrid_combine(*g.buffers[r], a, Stream{});
  });
  g.expect_ok(errors, "hybrid combine");
  for (int s = 0; s < G; ++s) {
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float x = fp8 ? 1.0f : xs[s].at(t, h);
        EXPECT(outs[s].at(t, h) == x * kept[s * N + t], "hybrid combine sum");
      }
    }
  }
  // Bad input on one rank: a handle of another N (rejected by that rank, reported to all).
  if (G > 1 && uniform(0, 3) == 0) {
    const int bad = static_cast<int>(uniform(0, G - 1));
    errors = g.run([&](int r) {
      HybridCombineArgs a;
      a.y = ys[r].data(), a.y_dtype = ys[r].dtype, a.num_rows = ys[r].n, a.hidden = H;
      a.src_expert_counts = counts[r].data(), a.row_token = row_token[r].data();
      std::vector<int32_t> m = meta[r];
      if (r == bad) m[kHybridMetaNumTokens] += 1;
      a.meta = m.data(), a.num_local_experts = L, a.pad_multiple = pad, a.num_tokens = N;
      a.out = outs[r].data();
      hybrid_combine(*g.buffers[r], a, Stream{});
    });
    g.expect_all_fail(errors, "hybrid combine with a bad handle on one rank");
  }
}

// Bad values and shapes that every rank sees: every rank must raise, the buffer stays usable.
void bad_inputs(Group& g) {
  const int G = g.G, E = 2 * G, K = 2;
  const int64_t N = 5, H = 8;
  Rows x(DType::kBF16, N, H);
  std::vector<int64_t> idx(N * K, 1);
  std::vector<int32_t> counts(G), tpe(2), stats(3);
  const int bad = static_cast<int>(uniform(0, G - 1));
  auto errors = g.run([&](int r) {
    std::vector<int64_t> mine = idx;
    if (r == bad) mine[uniform(0, N * K - 1)] = uniform(0, 1) ? E : -7;
    DispatchArgs a;
    a.x = x.data(), a.x_dtype = DType::kBF16, a.num_tokens = N, a.hidden = H;
    a.topk_idx = mine.data(), a.idx_dtype = DType::kI64, a.num_topk = K, a.num_experts = E;
    a.recv_src_counts = counts.data(), a.tokens_per_expert = tpe.data();
    a.num_recv = &stats[0], a.num_dropped = &stats[1], a.group_max_tokens = &stats[2];
    dispatch_notify(*g.buffers[r], a, Stream{});
  });
  g.expect_all_fail(errors, "dispatch with a bad topk_idx value on one rank");
  errors = g.run([&](int r) {  // row bytes not a multiple of 16: rejected before any round
    DispatchArgs a;
    a.x = x.data(), a.x_dtype = DType::kBF16, a.num_tokens = N, a.hidden = 7;
    a.topk_idx = idx.data(), a.idx_dtype = DType::kI64, a.num_topk = K, a.num_experts = E;
    a.recv_src_counts = counts.data(), a.tokens_per_expert = tpe.data();
    a.num_recv = &stats[0], a.num_dropped = &stats[1], a.group_max_tokens = &stats[2];
    dispatch_notify(*g.buffers[r], a, Stream{});
  });
  g.expect_all_fail(errors, "dispatch with 14-byte rows");
}

// Normal-mode handles corrupted on one rank (negative or too large counts, tokens out of range),
// for the cached dispatch and the combine: each rank must raise or finish, never write out of
// bounds (argument "corrupt"; normal.cc checks handles and reports them in round 0's status).
void corrupt_normal_handles(Group& g) {
  const int G = g.G, E = G, K = 1;
  const int64_t N = 6, H = 8;
  Rows x(DType::kF32, N, H);
  std::vector<int64_t> idx(N * K);
  for (int64_t t = 0; t < N; ++t) idx[t] = t % E;
  const int bad = static_cast<int>(uniform(0, G - 1));
  const int how = static_cast<int>(uniform(0, 3));
  auto errors = g.run([&](int r) {
    std::vector<int32_t> counts(G), tpe(1), stats(3);
    DispatchArgs a;
    a.x = x.data(), a.x_dtype = DType::kF32, a.num_tokens = N, a.hidden = H;
    a.topk_idx = idx.data(), a.idx_dtype = DType::kI64, a.num_topk = K, a.num_experts = E;
    a.recv_src_counts = counts.data(), a.tokens_per_expert = tpe.data();
    a.num_recv = &stats[0], a.num_dropped = &stats[1], a.group_max_tokens = &stats[2];
    dispatch_notify(*g.buffers[r], a, Stream{});
    const int64_t c = stats[0];
    Rows recv(DType::kF32, c, H, false), out(DType::kF32, N, H, false);
    std::vector<int32_t> src_token(c + 1, 0);
    a.capacity = c, a.recv_x = c ? recv.data() : nullptr, a.recv_src_token = src_token.data();
    dispatch_data(*g.buffers[r], a, Stream{});
    if (r == bad) {
      if (how == 0) counts[0] = -3;
      if (how == 1) counts[G - 1] += 5;
      if (how == 2 && c) src_token[0] = 1 << 20;
      if (how == 3 && c) src_token[0] = -5;
    }
    std::vector<int32_t> scratch(c + 1);
    DispatchArgs cached = a;  // combine backward: rows placed as the forward placed them
    cached.recv_src_token = scratch.data(), cached.tokens_per_expert = nullptr;
    std::vector<int32_t> clipped = counts;
    cached.recv_src_counts = clipped.data();
    dispatch_data(*g.buffers[r], cached, Stream{});
    CombineArgs b;
    b.y = recv.data(), b.y_dtype = DType::kF32, b.num_rows = c, b.hidden = H;
    b.recv_src_counts = counts.data(), b.recv_src_token = src_token.data();
    b.group_max_tokens = &stats[2], b.topk_idx = idx.data(), b.idx_dtype = DType::kI64;
    b.num_topk = K, b.num_experts = E, b.num_tokens = N, b.out = out.data();
    combine(*g.buffers[r], b, Stream{});
  });
  (void)errors;  // raising or not is up to the checks; memory safety is what is tested
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t iterations = argc > 1 ? std::atoll(argv[1]) : 300;
  rng.seed(argc > 2 ? std::atoll(argv[2]) : 1);
  const bool corrupt = argc > 3 && std::string(argv[3]) == "corrupt";
  setenv("FUSED_A2A_TIMEOUT_S", corrupt ? "2" : "20", 0);
  if (corrupt) {  // each case in a fresh group: a failed one may leave the buffers poisoned
    for (int64_t it = 0; it < iterations; ++it) {
      Group g(0x6b6b0000 + it, static_cast<int>(uniform(2, 3)), 1 << 16);
      corrupt_normal_handles(g);
    }
    std::printf("OK corrupt %lld\n", static_cast<long long>(iterations));
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<Group>> groups(5);
  for (int64_t it = 0; it < iterations; ++it) {
    const int G = static_cast<int>(uniform(1, 4));
    const int64_t rows = uniform(1, 8);  // rows per round: most ops take several rounds
    const size_t bytes = std::max(hybrid_buffer_bytes(128, 4, 3, G, Platform::kCPU, rows),
                                  static_cast<size_t>(G) * (rows * 1024 + 256));
    if (!groups[G] || groups[G]->bytes != bytes || uniform(0, 9) == 0) {
      groups[G].reset();  // re-created with another round size now and then
      groups[G] = std::make_unique<Group>(0x5a5a0000 + it * 8 + G, G, bytes);
    }
    Group& g = *groups[G];
    switch (uniform(0, 9)) {
      case 0:
        bad_inputs(g);
        break;
      case 1:
        hybrid_iteration(g, it, true);
        break;
      case 2:
      case 3:
      case 4:
        hybrid_iteration(g, it, false);
        break;
      default:
        normal_iteration(g, it);
    }
  }
  groups.clear();
  EXPECT(buffer_bytes_held() == 0, "buffers left in the registry");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("OK %lld %.1f\n", static_cast<long long>(iterations), seconds);
  return 0;
}
