// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): the dispatch
// kernel's item enumeration (FUSED_A2A_CUDA_ITEMS=enum, enumerate_items_by) gives every warp
// exactly the items the default scan gives it, for random windows, chunk sizes, peers, rounds
// and warp counts, in both item orders, for the sender and the receiver roles. The scan and
// the per-peer counts below restate dispatch_roles.cuh's conditions.
#include <cstdio>
#include <random>
#include <tuple>
#include <vector>

#include "dispatch_common.cuh"

using fa2a::cuda::dispatch_impl::chunks_of;
using fa2a::cuda::dispatch_impl::enumerate_items_by;
using fa2a::cuda::dispatch_impl::segment;

using Item = std::tuple<long long, int, long long>;  // (round k, peer, chunk c)

struct Case {
  int G, r, nw, rot;
  bool peer_major, sender, self_recv;
  long long R, rounds, own;
  int self_cr;
  std::vector<long long> qoff, kept;
  std::vector<int> cr;
};

// Chunks of peer q in round k (0 where there are none).
long long count(const Case& t, long long k, int q) {
  if (q == t.r) {
    if (t.sender && t.self_recv) return 0;
    return k != 0 ? 0 : (t.own + t.self_cr - 1) / t.self_cr;
  }
  return chunks_of(segment(t.qoff[q], t.kept[q], k, t.R, t.cr[q], q), t.cr[q]);
}

long long max_chunks(const Case& t, long long k) {
  long long m = k == 0 ? (t.own + t.self_cr - 1) / t.self_cr : 0;
  for (int q = 0; q < t.G; ++q)
    if (q != t.r) m = std::max(m, count(t, k, q));
  return m;
}

// The default scan: every warp walks every candidate, exists-check then it++ % nw.
std::vector<std::vector<Item>> scan(const Case& t) {
  std::vector<std::vector<Item>> out(t.nw);
  long long it = 0;
  for (long long k = 0; k < t.rounds; ++k) {
    const long long maxc = max_chunks(t, k);
    auto item = [&](int q, long long c) {
      if (q == t.r) {
        if (t.sender && t.self_recv) return;
        if (k != 0 || c * t.self_cr >= t.own) return;
      } else {
        const auto sg = segment(t.qoff[q], t.kept[q], k, t.R, t.cr[q], q);
        if (sg.lo + c * t.cr[q] >= sg.hi) return;
      }
      out[it++ % t.nw].emplace_back(k, q, c);
    };
    if (t.peer_major) {
      for (int i = 0; i < t.G; ++i)
        for (long long c = 0; c < maxc; ++c) item((t.rot + i) % t.G, c);
    } else {
      for (long long c = 0; c < maxc; ++c)
        for (int i = 0; i < t.G; ++i) item((t.rot + i) % t.G, c);
    }
  }
  return out;
}

std::vector<Item> enumerate(const Case& t, int me) {
  std::vector<Item> out;
  int slot = 0;
  const bool ok = true;
  for (long long k = 0; k < t.rounds; ++k) {
    std::vector<int> counts(t.G);
    for (int q = 0; q < t.G; ++q) counts[q] = static_cast<int>(count(t, k, q));
    enumerate_items_by(
        t.G, t.rot, t.peer_major, max_chunks(t, k), [&](int q) { return counts[q]; }, t.nw, me,
        slot, ok, [&](int q, long long c) { out.emplace_back(k, q, c); });
  }
  return out;
}

int main() {
  std::mt19937_64 rng(20261126);
  auto uni = [&](long long lo, long long hi) {
    return std::uniform_int_distribution<long long>(lo, hi)(rng);
  };
  long long items = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    Case t;
    t.G = static_cast<int>(uni(1, 9));
    t.r = static_cast<int>(uni(0, t.G - 1));
    t.nw = static_cast<int>(uni(1, 64));
    t.sender = uni(0, 1) == 1;
    t.rot = t.sender ? (t.r + 1) % t.G : 0;
    t.peer_major = uni(0, 1) == 1;
    t.self_recv = uni(0, 3) != 0;
    t.R = uni(1, 300);
    t.own = uni(0, 400);
    t.self_cr = static_cast<int>(uni(1, 40));
    long long off = 0;
    for (int q = 0; q < t.G; ++q) {
      t.qoff.push_back(off);
      t.kept.push_back(q == t.r ? 0 : uni(0, 500));
      off += t.kept.back();
      t.cr.push_back(t.sender ? static_cast<int>(uni(1, 40)) : t.self_cr);
    }
    long long rounds = 1;
    for (int q = 0; q < t.G; ++q)
      if (q != t.r && t.kept[q] > 0)
        rounds = std::max(rounds, (t.qoff[q] + t.kept[q] + t.R - 1) / t.R);
    t.rounds = rounds;
    const auto want = scan(t);
    for (int me = 0; me < t.nw; ++me) {
      const auto got = enumerate(t, me);
      if (got != want[me]) {
        std::printf(
            "MISMATCH trial %d: G=%d r=%d nw=%d warp %d sender=%d peer_major=%d: %zu vs %zu "
            "items\n",
            trial, t.G, t.r, t.nw, me, t.sender, t.peer_major, got.size(), want[me].size());
        return 1;
      }
      items += static_cast<long long>(got.size());
    }
  }
  std::printf("ok: 20000 cases, %lld items, every warp's items equal the scan's\n", items);
  return 0;
}
