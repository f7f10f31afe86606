// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): the static
// dispatch's layout notify (FUSED_A2A_CUDA_LAYOUT=notify, dispatch_common.cuh). A sender r
// computes receiver d's placement of its rows (sender_view) from d's count column and d's receive
// parameters; it must match what d computes for its ready message (place_sources, window_qoff,
// window_chunk_rows, as dispatch.cu's kernel does) and an independent row-by-row placement:
// rows arrive in source order, the first `capacity` are kept, and d's own rows (which bypass the
// window) take no window slot. FUSED_A2A_CUDA_LAYOUT=dynamic: dispatch_notify publishes no
// capacity (1 << 40) when the data kernel's is the exact row count, so with capacity >= the rows
// the view must not change. Direct rows (FUSED_A2A_CUDA_DIRECT): r's j-th row lands at recv_x row
// v.poff + j on d, which must be the reference's P of that row.
#include <cstdio>
#include <random>
#include <vector>

#include "dispatch_common.cuh"

using namespace fa2a::cuda::dispatch_impl;
using fa2a::cuda::kLayoutMaxRanks;

int main() {
  std::mt19937 rng(7);
  long long cases = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    const int G = 1 + static_cast<int>(rng() % kLayoutMaxRanks);
    const int d = static_cast<int>(rng() % G);
    const int scale = iter % 3 == 0 ? 4 : 3000;
    std::vector<int> col(G);
    long long sum = 0;
    for (int s = 0; s < G; ++s) {
      col[s] = static_cast<int>(rng() % (scale + 1));
      sum += col[s];
    }
    const long long capacity = rng() % 2 ? sum : static_cast<long long>(rng() % (sum + 2));
    const long long warps2 = 2 * (1 + rng() % 128);
    const int chunk_max = 1 + static_cast<int>(rng() % 64);
    const long long window = 1 + static_cast<long long>(rng() % 20000);
    // The receiver's own computation, as the kernel's step 1.
    int poff[kLayoutMaxRanks], kept[kLayoutMaxRanks], kept_total = 0;
    place_sources(col.data(), G, capacity, poff, kept, &kept_total);
    const int cr = window_chunk_rows(kept_total - kept[d], warps2, chunk_max, window);
    // Independent placement: P of each row in source order; Q = window slot of non-own rows.
    std::vector<long long> first_q(G, -1), kept_ref(G, 0), first_p(G, -1);
    long long P = 0, Q = 0;
    for (int s = 0; s < G; ++s) {
      first_p[s] = P < capacity ? P : capacity;  // P of s's first row (capacity: none kept)
      for (int j = 0; j < col[s]; ++j, ++P) {
        if (P >= capacity) continue;
        ++kept_ref[s];
        if (s == d) continue;
        if (first_q[s] < 0) first_q[s] = Q;
        ++Q;
      }
      if (first_q[s] < 0) first_q[s] = Q;  // no kept row: the offset where one would go
    }
    for (int r = 0; r < G; ++r) {
      if (r == d) continue;
      const SenderView v = sender_view(col.data(), G, r, d, capacity, warps2, chunk_max, window);
      const int qoff = window_qoff(poff, kept, r, d);
      const bool ref_ok = v.kept == kept_ref[r] && (v.kept == 0 || v.qoff == first_q[r]) &&
                          (v.kept == 0 || v.poff == first_p[r]);
      if (v.qoff != qoff || v.kept != kept[r] || v.cr != cr || v.poff != poff[r] || !ref_ok) {
        std::printf(
            "FAIL: G %d d %d r %d capacity %lld: view (%d, %d, %d, p %d), receiver (%d, %d, %d,"
            " p %d), reference (q %lld, kept %lld, p %lld)\n",
            G, d, r, capacity, v.qoff, v.kept, v.cr, v.poff, qoff, kept[r], cr, poff[r], first_q[r],
            kept_ref[r], first_p[r]);
        return 1;
      }
      if (capacity >= sum) {  // the dynamic layout's exact path: no capacity published
        const SenderView u = sender_view(col.data(), G, r, d, 1ll << 40, warps2, chunk_max, window);
        if (u.qoff != v.qoff || u.kept != v.kept || u.cr != v.cr) {
          std::printf("FAIL: G %d d %d r %d: no capacity (%d, %d, %d) != capacity %lld\n", G, d, r,
                      u.qoff, u.kept, u.cr, capacity);
          return 1;
        }
      }
      ++cases;
    }
  }
  std::printf("ok (%lld sender views)\n", cases);
  return 0;
}
