// Host check (no GPU needed; built by tests/test_cuda_host_logic.py with nvcc): the dispatch and
// combine kernels' item deal (rect_item, common.cuh). Warp w of nw visits idx = w, w + nw, ... of
// a round's rows x cols rectangle; across the warps every (chunk, column) item must be visited
// exactly once, and item i of the nested-loop order (chunk-major: for chunk, for column; or
// column-major) must go to warp i % nw, the round-robin deal of that order.
#include <cstdio>
#include <vector>

#include "common.cuh"

using fa2a::cuda::rect_item;
using fa2a::cuda::RectItem;

int main() {
  long long cases = 0;
  for (long long rows = 0; rows <= 9; ++rows) {
    for (int cols = 1; cols <= 7; ++cols) {
      for (int nw = 1; nw <= 40; nw += (nw < 8 ? 1 : 7)) {
        for (int col_major = 0; col_major <= 1; ++col_major) {
          std::vector<int> owner(rows * cols, -1);  // warp of item (chunk, col)
          for (int w = 0; w < nw; ++w) {
            for (long long idx = w; idx < rows * cols; idx += nw) {
              const RectItem it = rect_item(idx, rows, cols, col_major != 0);
              if (it.chunk < 0 || it.chunk >= rows || it.col < 0 || it.col >= cols) {
                std::printf("FAIL: idx %lld of %lld x %d -> (%lld, %d) out of range\n", idx, rows,
                            cols, it.chunk, it.col);
                return 1;
              }
              int& o = owner[it.chunk * cols + it.col];
              if (o != -1) {
                std::printf("FAIL: item (%lld, %d) visited twice (warps %d, %d)\n", it.chunk,
                            it.col, o, w);
                return 1;
              }
              o = w;
            }
          }
          long long i = 0;
          const long long outer = col_major ? cols : rows, inner = col_major ? rows : cols;
          for (long long a = 0; a < outer; ++a) {
            for (long long b = 0; b < inner; ++b, ++i) {
              const long long chunk = col_major ? b : a, col = col_major ? a : b;
              if (owner[chunk * cols + col] != static_cast<int>(i % nw)) {
                std::printf(
                    "FAIL: %lld x %d, nw %d, col_major %d: item (%lld, %lld) went to "
                    "warp %d, not %lld\n",
                    rows, cols, nw, col_major, chunk, col, owner[chunk * cols + col], i % nw);
                return 1;
              }
            }
          }
          ++cases;
        }
      }
    }
  }
  std::printf("ok: %lld rectangles\n", cases);
  return 0;
}
