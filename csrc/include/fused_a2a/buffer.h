// The common buffer manager: one communication buffer per (EP group, rank in this process), in a
// process-wide registry that every frontend shares.
//
// A buffer is the same number of bytes on every rank of the group:
//   [control region: kControlBytes][data region: data_bytes]
// and a table of every rank's base pointer, valid in this process (own memory, a peer's memory in
// this process, or a peer's memory mapped from another process by the transport).
//
// Bootstrap is done by the frontend, which owns an all-gather of bytes:
//   buf = buffer_create(...); infos = allgather(buf->local_info()); buf->connect(infos);
//   barrier (any collective); buf->seal();
// seal() drops names (POSIX shm names, ...) once every peer has mapped them, so that nothing is
// left behind in /dev/shm even if a process dies later.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fused_a2a/config.h"

namespace fa2a {

// How a rank reaches its peers' memory. One implementation per platform (CPU: POSIX shared
// memory, same-process peers by pointer; CUDA: cudaMalloc + CUDA IPC, same-process peers by
// pointer with peer access). A later internode engine (NVSHMEM, NCCL device API) is another one.
class Transport {
 public:
  virtual ~Transport() = default;
  virtual void* allocate(size_t bytes) = 0;                // this rank's region, zero-filled
  virtual std::string export_info() = 0;                   // what a peer needs to map it
  virtual void* import_peer(const std::string& info) = 0;  // a peer's region, usable here
  virtual void seal() = 0;                                 // all peers have imported: drop names
  virtual void release() = 0;                              // unmap peers, free own region
};

std::unique_ptr<Transport> make_cpu_transport(int64_t group_id, int rank, int device);
// Defined only when the CUDA backend is compiled in (see build_has_cuda()).
std::unique_ptr<Transport> make_cuda_transport(int64_t group_id, int rank, int device);

// Bytes reserved at the start of every rank's buffer for flags, counters and small messages.
constexpr size_t kControlBytes = 64 * 1024;

// Rows (tokens) of one peer a new buffer is sized for, normal mode and HybridEP alike:
// FUSED_A2A_BUFFER_ROWS, else kDefaultRowsCuda on GPUs and kDefaultRowsCpu on CPUs. More rows
// than fit take more rounds; the results never depend on it.
constexpr int64_t kDefaultRowsCuda = 8192;
constexpr int64_t kDefaultRowsCpu = 256;
int64_t default_buffer_rows(Platform platform);

class Buffer {
 public:
  // arena_bytes: an output arena after the data region (torch's recv_x rows, which peers can
  // then write straight into; torch_fused_a2a/_arena.py), 0 for none; a multiple of 64.
  Buffer(int64_t group_id, int rank, int num_ranks, size_t data_bytes, Platform platform,
         int device, size_t arena_bytes = 0);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  std::string local_info();                             // for the frontend's all-gather
  void connect(const std::vector<std::string>& infos);  // infos[r] = rank r's local_info()
  void seal();

  int64_t group_id() const { return group_id_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  Platform platform() const { return platform_; }
  int device() const { return device_; }
  size_t data_bytes() const { return data_bytes_; }
  size_t arena_bytes() const { return arena_bytes_; }
  size_t total_bytes() const { return kControlBytes + data_bytes_ + arena_bytes_; }
  bool connected() const { return connected_; }

  uint8_t* base(int rank) const;  // rank's buffer as seen from this process
  uint8_t* control(int rank) const { return base(rank); }
  uint8_t* data(int rank) const { return base(rank) + kControlBytes; }
  uint8_t* arena(int rank) const { return data(rank) + data_bytes_; }
  // Whether [p, p + bytes) lies in this rank's output arena (so every peer has it mapped)
  bool in_own_arena(const void* p, size_t bytes) const;
  // Device-visible table of the bases (CUDA: a device array of num_ranks pointers; CPU: host).
  void* const* peer_table() const {
    return peer_table_device_ ? peer_table_device_ : bases_.data();
  }
  void set_device_peer_table(void** table) { peer_table_device_ = table; }

  // Ops on one buffer run one at a time; the round counter orders them across ranks.
  std::mutex& op_mutex() { return op_mutex_; }
  uint64_t& round_counter() { return round_counter_; }
  // Backend state that lives as long as the buffer (CUDA: host-mapped counters, ...).
  std::shared_ptr<void>& backend_state() { return backend_state_; }
  // After a failed collective (timeout, mismatch) the ranks' counters disagree: every later op on
  // this buffer fails with this reason until the frontend resets the buffer.
  void poison(const std::string& reason) { poisoned_ = reason; }
  const std::string& poisoned() const { return poisoned_; }

 private:
  int64_t group_id_;
  int rank_;
  int num_ranks_;
  size_t data_bytes_;
  size_t arena_bytes_;
  Platform platform_;
  int device_;
  bool connected_ = false;
  std::unique_ptr<Transport> transport_;
  std::vector<void*> bases_;
  void** peer_table_device_ = nullptr;
  std::mutex op_mutex_;
  uint64_t round_counter_ = 0;
  std::shared_ptr<void> backend_state_;
  std::string poisoned_;
};

// Registry, keyed by (group id, rank). The group id is chosen by the frontend and is the same on
// every rank of the group (torch: derived from the ProcessGroup; JAX: from the mesh axis).
std::shared_ptr<Buffer> buffer_create(int64_t group_id, int rank, int num_ranks, size_t data_bytes,
                                      Platform platform, int device, size_t arena_bytes = 0);
std::shared_ptr<Buffer> buffer_get(int64_t group_id, int rank);              // throws if absent
std::shared_ptr<Buffer> buffer_find(int64_t group_id, int rank);             // null if absent
std::shared_ptr<Buffer> buffer_get_by_device(int64_t group_id, int device);  // CUDA handlers
void buffer_release(int64_t group_id);  // every local rank of the group
void buffer_release_all();
size_t buffer_bytes_held();  // total bytes of every local rank's region

}  // namespace fa2a
