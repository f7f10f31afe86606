// A buffer's output arena (buffer.h: arena_bytes after the data region), cut into blocks for
// torch's recv_x, which every peer has mapped and can write straight into (direct rows).
// First fit, kAlign-byte blocks, with torch's caching-allocator stream semantics: a freed block is
// reusable at once by work on the stream it was allocated for (stream order puts that work after
// every earlier use there); an allocation for another stream first makes its stream wait for
// that one, and for every stream recorded as a user of the block (record_use: torch's
// record_stream, which does not reach memory outside torch's allocator, is hooked to it). The
// wait is for the other stream's work queued at the allocation, which includes every use of the
// freed block there (queued before its free).
// Blocks for a CUDA graph's capture (capture: the capture's id, nonzero) never return to the free
// spans: a graph replays into them for as long as it lives, which the arena cannot see (torch
// keeps its graphs' memory pools likewise). A capture's freed block serves that capture's later
// blocks on the same stream (stream order within the graph), as torch's graph pools do, unless
// another stream was recorded as its user; else a captured block comes from memory no block has
// had (above every uncaptured block's end, from the arena's top), with no stream wait (a wait
// on work outside a capture is an isolation error, and unused memory has no earlier use).
// release_captures() returns the freed captured blocks to the free spans once the caller knows
// that no graph will replay into them again.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "fused_a2a/buffer.h"
#include "fused_a2a/ops.h"

namespace fa2a {

class OutputArena {
 public:
  static constexpr size_t kAlign = 512;  // every block 16-byte aligned for the kernels' accesses

  explicit OutputArena(std::shared_ptr<Buffer> buffer);

  // Byte offset of a block of at least `bytes` (> 0) for work on `stream` (CUDA: the stream the
  // block's first use runs on; CPU: null), or -1 when no free span is large enough; capture:
  // the id of the graph capture the block is for (above; 0: none), -1 when neither a freed block
  // of that capture nor the never-used memory at the top is large enough.
  int64_t allocate(size_t bytes, Stream stream, uint64_t capture = 0);
  // Returns the block at `offset` (an allocate result) to the free spans; any thread.
  void release(int64_t offset);
  // Every captured block whose tensor is gone back to the free spans; the bytes. Only for a
  // caller that knows every graph captured with them destroyed and its replays complete (e.g.
  // benchmarks/bench_normal.py after timing each graph and a device sync): the arena cannot see
  // graphs. Captured blocks still live stay captured.
  size_t release_captures();
  // Records `stream` as a user of the live block at `offset` (torch's record_stream); false when
  // no live block starts there.
  bool record_use(int64_t offset, Stream stream);
  // The streams of the free spans' last uses, each once (tests)
  std::vector<void*> free_span_streams();
  size_t free_bytes();
  uint8_t* base() const { return buffer_->arena(buffer_->rank()); }
  size_t size() const { return buffer_->arena_bytes(); }
  const Buffer& buffer() const { return *buffer_; }

 private:
  struct Span {
    size_t start, end;
    std::vector<void*> streams;  // the streams of the last uses of its memory (few)
  };
  struct Block {
    size_t bytes;
    std::vector<void*> streams;  // the allocation's stream, then the recorded users
    uint64_t capture;            // the graph capture it is for (0: none): never back in free_
  };
  struct Parked {  // a captured block whose tensor died: for its capture's later blocks
    size_t start, bytes;
    uint64_t capture;
    void* stream;
    bool reusable;  // false: another stream used it, so not even its capture takes it again
  };
  // [start, end) back in the free spans, merged with its neighbours; under mutex_.
  void add_free_span(size_t start, size_t end, std::vector<void*> streams);
  std::shared_ptr<Buffer> buffer_;  // the memory lives while the arena (and so a block) does
  std::mutex mutex_;
  std::vector<Span> free_;  // sorted by start, never adjacent
  std::map<size_t, Block> taken_;
  std::vector<Parked> parked_;
  size_t high_water_ = 0;  // the largest end of a block that was not captured
};

// The arena of the buffer (group_id, rank), made at the first call; null when the buffer has
// none. Throws when there is no such buffer.
std::shared_ptr<OutputArena> output_arena(int64_t group_id, int rank);
// At the buffer's release: no new blocks; live ones keep the arena and the buffer's memory.
void output_arena_drop(int64_t group_id);

}  // namespace fa2a
