// The CPU backend's communication primitive: a round of all-to-all messages through the buffers.
//
// Every rank's data region is split into G slots; slot s of rank d's buffer holds the message of
// sender s to d. One round: each sender waits until d has consumed its previous message, writes
// slot s of d's buffer and raises d's ready[s] flag; each receiver waits for every ready flag,
// reads its G slots and raises consumed[d] in every sender's control region. Flags hold a global
// round number (the same sequence on every rank), so they never need resetting. Every wait is
// bounded by timeout_seconds() and names the op, the phase, the round of the op, this rank and the
// ranks that did not arrive. An error that leaves an op in the middle of a round (the peers are
// then left waiting for this rank) poisons the buffer, so that the next op fails at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "fused_a2a/buffer.h"

namespace fa2a::cpu {

enum class OpTag : uint32_t {
  kDispatchNotify = 1,
  kDispatchData = 2,
  kCombine = 3,
  kHybridNotify = 4,
  kHybridData = 5,
  kHybridCombine = 6,
};
const char* op_tag_name(OpTag tag);

// The first bytes of every message.
struct alignas(64) MessageHeader {
  uint32_t op;
  uint32_t sender;
  uint64_t round;
  int64_t count;      // rows (data) or entries (notify) in the payload
  int64_t status;     // 0, or non-zero: the sender rejected its input (it raises the details)
  uint64_t call_tag;  // the frontend's id of the call site; ranks must agree
  int64_t aux[5];     // op-specific (shapes checked for agreement)
};
static_assert(sizeof(MessageHeader) == 128, "header is two cache lines");

class Exchange {
 public:
  // Takes the buffer's op lock for the lifetime of the object; fails if the buffer is poisoned.
  // Destroyed by an exception in the middle of a round: poisons the buffer (the ranks disagree).
  // call_tag: the frontend's id of the call site (0: none); a message with another tag is an
  // op mismatch, so two different calls can never be paired even when their shapes agree.
  Exchange(Buffer& buffer, const char* op_name, uint64_t call_tag = 0);
  ~Exchange();
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  size_t payload_bytes() const { return slot_bytes_ - sizeof(MessageHeader); }

  // Sending side of the current round: the payload area of this rank's slot in dst's buffer
  // (waits until dst consumed the previous round), then publish it.
  uint8_t* send_payload(int dst, const char* phase);
  void publish(int dst, OpTag tag, int64_t count, const int64_t aux[5], int64_t status = 0);
  // Receiving side: waits for every sender's message of this round and checks its op tag.
  void wait_all_messages(OpTag tag, const char* phase);
  const MessageHeader& header(int src) const;
  const uint8_t* payload(int src) const;
  // Ends the round: tells every sender its slot here is free again.
  void finish_round();
  // Rounds this op has finished.
  uint64_t op_round() const { return round_ - first_round_; }

 private:
  uint64_t* ready_flags(int rank) const;     // ready[sender] in rank's control region
  uint64_t* consumed_flags(int rank) const;  // consumed[receiver] in rank's control region
  uint8_t* slot(int owner, int sender) const;
  [[noreturn]] void fail(const std::string& reason);
  [[noreturn]] void timeout(const char* phase, const std::vector<int>& missing);

  Buffer& buffer_;
  std::unique_lock<std::mutex> lock_;
  const char* op_name_;
  int rank_;
  int num_ranks_;
  size_t slot_bytes_;
  uint64_t round_;
  uint64_t first_round_;
  uint64_t call_tag_;
  bool in_round_ = false;  // published or waited in round_, not finished yet
  int uncaught_;           // std::uncaught_exceptions() when constructed
};

// Ranks whose message of this round says that they failed (status != 0). Every rank sees every
// rank's status in the same round, so every rank stops after the same round.
std::vector<int> failed_ranks(const Exchange& ex);
// The error a rank raises when peers reported a failure: names them and what they rejected.
std::string peers_failed(const char* op, const std::vector<int>& ranks, const char* what);

}  // namespace fa2a::cpu
