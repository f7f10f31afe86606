// OutputArena (fused_a2a/arena.h) and the registry of the buffers' arenas.
#include "fused_a2a/arena.h"

#include <algorithm>
#include <utility>

#include "core/backends.h"
#include "fused_a2a/errors.h"

namespace fa2a {
namespace {

// Adds `stream` to a block's or span's streams unless it is there (the lists stay a few long).
void add_stream(std::vector<void*>& streams, void* stream) {
  if (std::find(streams.begin(), streams.end(), stream) == streams.end()) streams.push_back(stream);
}

}  // namespace

OutputArena::OutputArena(std::shared_ptr<Buffer> buffer) : buffer_(std::move(buffer)) {
  if (size() > 0) free_.push_back({0, size(), {}});
}

int64_t OutputArena::allocate(size_t bytes, Stream stream, uint64_t capture) {
  FA2A_CHECK(bytes > 0, "arena block bytes must be positive, got ", bytes);
  const size_t need = (bytes + kAlign - 1) / kAlign * kAlign;
  std::vector<void*> last_uses;
  size_t start = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (capture != 0) {
      auto parked = std::find_if(parked_.begin(), parked_.end(), [&](const Parked& b) {
        return b.reusable && b.capture == capture && b.stream == stream.handle && b.bytes >= need;
      });
      if (parked != parked_.end()) {  // the whole freed block, in stream order in the graph
        start = parked->start;
        taken_[start] = {parked->bytes, {stream.handle}, capture};
        parked_.erase(parked);
        return static_cast<int64_t>(start);
      }
      // The top of the last free span, if it lies above every block that was not captured
      if (free_.empty()) return -1;
      Span& top = free_.back();
      const size_t lowest = std::max(top.start, high_water_);
      if (top.end < lowest + need) return -1;
      start = top.end - need;
      if (start == top.start) {
        free_.pop_back();
      } else {
        top.end = start;
      }
      taken_[start] = {need, {stream.handle}, capture};
      return static_cast<int64_t>(start);
    }
    auto span = std::find_if(free_.begin(), free_.end(),
                             [&](const Span& s) { return s.end - s.start >= need; });
    if (span == free_.end()) return -1;
    start = span->start;
    last_uses = span->streams;
    if (span->end - span->start == need) {
      free_.erase(span);
    } else {
      span->start += need;  // the rest keeps the streams: its memory had the same last uses
    }
    taken_[start] = {need, {stream.handle}, 0};
    high_water_ = std::max(high_water_, start + need);
  }
  if (buffer_->platform() == Platform::kCUDA) {
    for (void* last : last_uses) {
      if (last != stream.handle) cuda::stream_wait(buffer_->device(), stream, Stream{last});
    }
  }
  return static_cast<int64_t>(start);
}

void OutputArena::release(int64_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto block = taken_.find(static_cast<size_t>(offset));
  FA2A_CHECK_RUNTIME(block != taken_.end(), "arena release of offset ", offset,
                     ", which is not a live block");
  const size_t start = block->first, end = start + block->second.bytes;
  std::vector<void*> streams = std::move(block->second.streams);
  const uint64_t capture = block->second.capture;
  taken_.erase(block);
  if (capture != 0) {  // a graph may still replay into it (arena.h)
    const bool own_stream_only = streams.size() == 1;
    parked_.push_back(
        {start, end - start, capture, streams.empty() ? nullptr : streams[0], own_stream_only});
    return;
  }
  add_free_span(start, end, std::move(streams));
}

void OutputArena::add_free_span(size_t start, size_t end, std::vector<void*> streams) {
  auto next = std::lower_bound(free_.begin(), free_.end(), start,
                               [](const Span& s, size_t at) { return s.start < at; });
  auto span = free_.insert(next, Span{start, end, std::move(streams)});
  auto merge_streams = [](Span& into, const Span& other) {
    for (void* s : other.streams) add_stream(into.streams, s);
  };
  if (auto after = span + 1; after != free_.end() && after->start == end) {
    span->end = after->end;
    merge_streams(*span, *after);
    span = free_.erase(after) - 1;
  }
  if (span != free_.begin()) {
    if (auto before = span - 1; before->end == start) {
      before->end = span->end;
      merge_streams(*before, *span);
      free_.erase(span);
    }
  }
}

size_t OutputArena::release_captures() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t bytes = 0;
  for (const Parked& b : parked_) {
    // the capture's stream as the last use (the caller synced; a wait on it then costs nothing)
    std::vector<void*> streams;
    if (b.stream) streams.push_back(b.stream);
    add_free_span(b.start, b.start + b.bytes, std::move(streams));
    bytes += b.bytes;
  }
  parked_.clear();
  return bytes;
}

bool OutputArena::record_use(int64_t offset, Stream stream) {
  if (offset < 0) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  auto block = taken_.find(static_cast<size_t>(offset));
  if (block == taken_.end()) return false;
  add_stream(block->second.streams, stream.handle);
  return true;
}

std::vector<void*> OutputArena::free_span_streams() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<void*> all;
  for (const Span& s : free_) {
    for (void* stream : s.streams) add_stream(all, stream);
  }
  return all;
}

size_t OutputArena::free_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t total = 0;
  for (const Span& s : free_) total += s.end - s.start;
  return total;
}

namespace {

struct ArenaRegistry {
  std::mutex mutex;
  std::map<std::pair<int64_t, int>, std::shared_ptr<OutputArena>> arenas;
};

ArenaRegistry& arena_registry() {
  static ArenaRegistry* instance = new ArenaRegistry();  // never destroyed: used at exit
  return *instance;
}

}  // namespace

std::shared_ptr<OutputArena> output_arena(int64_t group_id, int rank) {
  ArenaRegistry& reg = arena_registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  auto found = reg.arenas.find({group_id, rank});
  if (found != reg.arenas.end()) return found->second;
  auto buffer = buffer_get(group_id, rank);
  if (buffer->arena_bytes() == 0) return nullptr;
  auto arena = std::make_shared<OutputArena>(std::move(buffer));
  reg.arenas[{group_id, rank}] = arena;
  return arena;
}

void output_arena_drop(int64_t group_id) {
  ArenaRegistry& reg = arena_registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (auto it = reg.arenas.begin(); it != reg.arenas.end();) {
    it = it->first.first == group_id ? reg.arenas.erase(it) : std::next(it);
  }
}

}  // namespace fa2a
