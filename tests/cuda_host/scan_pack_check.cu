// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): the route scan's
// second pass with four destinations a scan (scan_pass2.cuh: pack_routed, packed_field). The
// kernel's steps are replayed on the host (a block's exclusive sum of the packed words in thread
// order, then each destination's field), over tiles and blocks of up to 1024 tokens, and every
// destination's cum and send list must equal a direct count, token by token.
#include <cstdio>
#include <random>
#include <vector>

#include "scan_pass2.cuh"

using namespace fa2a::cuda;

namespace {

// One destination at a time: cum[d][t] (tokens before t routed to d) and the send list of d.
void direct(const std::vector<unsigned long long>& masks, int G, std::vector<int>& cum,
            std::vector<int>& list) {
  const int N = static_cast<int>(masks.size());
  for (int d = 0; d < G; ++d) {
    int run = 0;
    for (int t = 0; t < N; ++t) {
      cum[d * (N + 1) + t] = run;
      if ((masks[t] >> d) & 1ull) list[d * N + run++] = t;
    }
    cum[d * (N + 1) + N] = run;
  }
}

// The kernel's steps: tiles of tile_tokens, each scanned in steps of `block` tokens.
void packed(const std::vector<unsigned long long>& masks, int G, int tile_tokens, int block,
            std::vector<int>& cum, std::vector<int>& list) {
  const int N = static_cast<int>(masks.size());
  const int tiles = (N + tile_tokens - 1) / tile_tokens;
  std::vector<int> tile_count(tiles * G, 0);  // the first pass's counts
  for (int t = 0; t < N; ++t)
    for (int d = 0; d < G; ++d) tile_count[(t / tile_tokens) * G + d] += (masks[t] >> d) & 1ull;
  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = tile * tile_tokens, t1 = std::min(N, t0 + tile_tokens);
    for (int d0 = 0; d0 < G; d0 += kScanPack) {
      int base[kScanPack];
      for (int i = 0; i < kScanPack; ++i) {
        base[i] = 0;
        for (int j = 0; j < tile && d0 + i < G; ++j) base[i] += tile_count[j * G + d0 + i];
      }
      for (int r0 = t0; r0 < t1; r0 += block) {
        std::vector<unsigned long long> before(block);
        unsigned long long total = 0;
        for (int tid = 0; tid < block; ++tid) {  // the block's exclusive sum, in thread order
          const int t = r0 + tid;
          before[tid] = total;
          total += pack_routed(t < t1 ? masks[t] >> d0 : 0ull);
        }
        for (int tid = 0; tid < block; ++tid) {
          const int t = r0 + tid;
          const unsigned long long mask = t < t1 ? masks[t] >> d0 : 0ull;
          for (int i = 0; i < kScanPack && d0 + i < G; ++i) {
            const int at = base[i] + packed_field(before[tid], i);
            if (t < t1) cum[(d0 + i) * (N + 1) + t] = at;
            if ((mask >> i) & 1ull) list[(d0 + i) * N + at] = t;
          }
        }
        for (int i = 0; i < kScanPack && d0 + i < G; ++i) base[i] += packed_field(total, i);
      }
      if (t1 == N)
        for (int i = 0; i < kScanPack && d0 + i < G; ++i) cum[(d0 + i) * (N + 1) + N] = base[i];
    }
  }
}

}  // namespace

int main() {
  // A field holds a whole step's count: 1024 tokens all routed everywhere, and 65535 of them.
  unsigned long long sum = 0;
  for (int i = 0; i < 65535; ++i) sum += pack_routed(0xfull);
  for (int i = 0; i < kScanPack; ++i)
    if (packed_field(sum, i) != 65535) {
      std::printf("FAIL: field %d of 65535 all-routed words is %d\n", i, packed_field(sum, i));
      return 1;
    }
  std::mt19937_64 rng(7);
  long long cases = 0;
  for (int G = 1; G <= 8; ++G) {
    for (int N : {1, 31, 512, 1000, 4096, 5000}) {
      for (int block : {32, 512, 1024}) {
        for (int tile_tokens : {block, 2 * block}) {
          for (double p : {0.0, 0.3, 1.0}) {  // routed probability per destination
            std::vector<unsigned long long> masks(N);
            std::bernoulli_distribution routed(p);
            for (auto& m : masks) {
              m = 0;
              for (int d = 0; d < G; ++d) m |= static_cast<unsigned long long>(routed(rng)) << d;
            }
            std::vector<int> cum_a(G * (N + 1), -1), cum_b(G * (N + 1), -2);
            std::vector<int> list_a(G * N, -1), list_b(G * N, -1);
            direct(masks, G, cum_a, list_a);
            packed(masks, G, tile_tokens, block, cum_b, list_b);
            if (cum_a != cum_b || list_a != list_b) {
              std::printf("FAIL: G %d N %d block %d tile %d p %.1f\n", G, N, block, tile_tokens, p);
              return 1;
            }
            ++cases;
          }
        }
      }
    }
  }
  std::printf("ok %lld cases\n", cases);
  return 0;
}
