// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): the dispatch
// receivers' row slices (FUSED_A2A_CUDA_RECV_ROWS, chunk_slice in dispatch_common.cuh). A stream
// of rows [lo, end) in chunks of cr rows, each chunk cut into nsub = ceil(cr / rs) slices of rs
// rows: over every (chunk, slice) item, each row must be covered exactly once, no slice may
// leave its chunk, and a slice past a short chunk's end must be empty.
#include <cstdio>
#include <vector>

#include "dispatch_common.cuh"

using namespace fa2a::cuda::dispatch_impl;

int main() {
  long long cases = 0;
  for (long long lo = 0; lo <= 5; lo += 5) {
    for (long long len = 0; len <= 70; ++len) {
      const long long end = lo + len;
      for (int cr = 1; cr <= 12; ++cr) {
        for (int rs = 1; rs <= cr + 1; ++rs) {
          const int RS = rs < cr ? rs : cr;  // as the kernel: rs >= cr is a whole chunk
          const int nsub = (cr + RS - 1) / RS;
          const long long chunks = (len + cr - 1) / cr;
          std::vector<int> seen(len, 0);
          for (long long c = 0; c < chunks + 1; ++c) {  // one chunk past the end: all empty
            for (int s = 0; s < nsub; ++s) {
              const long long jc = lo + c * cr;
              const RowSlice sl = chunk_slice(jc, end, cr, RS, s * RS);
              if (sl.n < 0 || sl.n > RS ||
                  (sl.n > 0 && (sl.j0 < jc || sl.j0 + sl.n > jc + cr || sl.j0 + sl.n > end))) {
                std::printf("FAIL: lo %lld end %lld cr %d rs %d chunk %lld slice %d: [%lld, +%d)\n",
                            lo, end, cr, rs, c, s, sl.j0, sl.n);
                return 1;
              }
              for (int i = 0; i < sl.n; ++i) ++seen[sl.j0 + i - lo];
            }
          }
          for (long long j = 0; j < len; ++j) {
            if (seen[j] != 1) {
              std::printf("FAIL: lo %lld end %lld cr %d rs %d: row %lld covered %d times\n", lo,
                          end, cr, rs, lo + j, seen[j]);
              return 1;
            }
          }
          ++cases;
        }
      }
    }
  }
  std::printf("ok: %lld streams\n", cases);
  return 0;
}
