// Buffer and the process-wide registry.
#include "fused_a2a/buffer.h"

#include <cstdlib>
#include <map>
#include <utility>

#include "fused_a2a/errors.h"

namespace fa2a {

Buffer::Buffer(int64_t group_id, int rank, int num_ranks, size_t data_bytes, Platform platform,
               int device, size_t arena_bytes)
    : group_id_(group_id),
      rank_(rank),
      num_ranks_(num_ranks),
      data_bytes_(data_bytes),
      arena_bytes_(arena_bytes),
      platform_(platform),
      device_(device) {
  FA2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks,
             "], got ", num_ranks);
  FA2A_CHECK(rank >= 0 && rank < num_ranks, "rank must be in [0, ", num_ranks, "), got ", rank);
  FA2A_CHECK(data_bytes > 0 && data_bytes % 64 == 0,
             "buffer data_bytes must be a positive multiple of 64, got ", data_bytes);
  FA2A_CHECK(arena_bytes % 64 == 0, "buffer arena_bytes must be a multiple of 64, got ",
             arena_bytes);
  if (platform == Platform::kCPU) {
    transport_ = make_cpu_transport(group_id, rank, device);
  } else {
    transport_ = make_cuda_transport(group_id, rank, device);
  }
  bases_.assign(num_ranks, nullptr);
  bases_[rank] = transport_->allocate(total_bytes());
}

Buffer::~Buffer() {
  backend_state_.reset();  // may reference the regions below
  if (transport_) transport_->release();
}

std::string Buffer::local_info() { return transport_->export_info(); }

void Buffer::connect(const std::vector<std::string>& infos) {
  FA2A_CHECK(static_cast<int>(infos.size()) == num_ranks_, "connect needs one info per rank (",
             num_ranks_, "), got ", infos.size());
  FA2A_CHECK(!connected_, "buffer of group ", group_id_, " rank ", rank_, " is already connected");
  for (int peer = 0; peer < num_ranks_; ++peer) {
    if (peer == rank_) continue;
    bases_[peer] = transport_->import_peer(infos[peer]);
  }
  connected_ = true;
}

void Buffer::seal() { transport_->seal(); }

bool Buffer::in_own_arena(const void* p, size_t bytes) const {
  const auto at = reinterpret_cast<uintptr_t>(p);
  const auto lo = reinterpret_cast<uintptr_t>(arena(rank_));
  return arena_bytes_ > 0 && at >= lo && bytes <= arena_bytes_ && at - lo <= arena_bytes_ - bytes;
}

uint8_t* Buffer::base(int rank) const {
  FA2A_CHECK_RUNTIME(rank >= 0 && rank < num_ranks_ && bases_[rank] != nullptr, "buffer of group ",
                     group_id_, " has no mapping for rank ", rank, " (not connected?)");
  return static_cast<uint8_t*>(bases_[rank]);
}

namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::pair<int64_t, int>, std::shared_ptr<Buffer>> buffers;
};

Registry& registry() {
  static Registry* instance = new Registry();  // never destroyed: used from atexit paths
  return *instance;
}

}  // namespace

// GPUs: 8192 rows, so N <= 8192 tokens per rank is one round (a peer sends at most N rows).
// With 4096 (sessions 1-12) N = 8192 took two rounds at EP 4 and the dispatch 1654 us against
// 1045 in one (runs 62-63, 4x H100; NCCL 1000-1031); the buffer is then ~0.5 GB a GPU at EP 4
// and H = 7168 (bf16). CPUs: 256, so the tests cover several rounds.
int64_t default_buffer_rows(Platform platform) {
  if (const char* text = std::getenv("FUSED_A2A_BUFFER_ROWS")) {
    const int64_t rows = std::strtoll(text, nullptr, 10);
    FA2A_CHECK(rows >= 1, "FUSED_A2A_BUFFER_ROWS must be a positive integer, got '", text, "'");
    return rows;
  }
  return platform == Platform::kCUDA ? kDefaultRowsCuda : kDefaultRowsCpu;
}

std::shared_ptr<Buffer> buffer_create(int64_t group_id, int rank, int num_ranks, size_t data_bytes,
                                      Platform platform, int device, size_t arena_bytes) {
  auto buffer = std::make_shared<Buffer>(group_id, rank, num_ranks, data_bytes, platform, device,
                                         arena_bytes);
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  // A running op keeps its own reference to a replaced buffer, so replacing is safe in-process.
  reg.buffers[{group_id, rank}] = buffer;
  return buffer;
}

std::shared_ptr<Buffer> buffer_find(int64_t group_id, int rank) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  auto it = reg.buffers.find({group_id, rank});
  return it == reg.buffers.end() ? nullptr : it->second;
}

std::shared_ptr<Buffer> buffer_get(int64_t group_id, int rank) {
  auto buffer = buffer_find(group_id, rank);
  FA2A_CHECK_RUNTIME(buffer != nullptr, "no fused_a2a buffer for group ", group_id, " rank ", rank,
                     " in this process (not initialised, or reset)");
  FA2A_CHECK_RUNTIME(buffer->connected(), "fused_a2a buffer for group ", group_id, " rank ", rank,
                     " is not connected to its peers yet");
  return buffer;
}

std::shared_ptr<Buffer> buffer_get_by_device(int64_t group_id, int device) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (auto& [key, buffer] : reg.buffers) {
    if (key.first == group_id && buffer->device() == device && buffer->connected()) return buffer;
  }
  FA2A_FAIL(ErrorKind::kRuntime, "no fused_a2a buffer for group ", group_id, " on device ", device,
            " in this process (not initialised, or reset)");
}

void buffer_release(int64_t group_id) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (auto it = reg.buffers.begin(); it != reg.buffers.end();) {
    it = it->first.first == group_id ? reg.buffers.erase(it) : std::next(it);
  }
}

void buffer_release_all() {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  reg.buffers.clear();
}

size_t buffer_bytes_held() {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  size_t total = 0;
  for (auto& [key, buffer] : reg.buffers) total += buffer->total_bytes();
  return total;
}

}  // namespace fa2a
