#include "exchange.h"

#include <chrono>
#include <cstring>
#include <exception>
#include <sstream>
#include <thread>
#include <vector>

#include "fused_a2a/errors.h"

namespace fa2a::cpu {
namespace {

uint64_t load_acquire(const uint64_t* flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }
void store_release(uint64_t* flag, uint64_t value) {
  __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}

// Waits until arrived(peer) holds for every peer in `peers`; returns the peers still missing when
// the deadline passed (empty on success). Backs off from yielding to short sleeps, so that many
// ranks sharing few cores still make progress.
template <typename Arrived>
std::vector<int> wait_for(const std::vector<int>& peers, Arrived arrived) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_seconds());
  std::vector<int> pending = peers;
  for (uint64_t spin = 0;; ++spin) {
    std::vector<int> still;
    for (int peer : pending) {
      if (!arrived(peer)) still.push_back(peer);
    }
    pending.swap(still);
    if (pending.empty()) return pending;
    if ((spin & 63) == 0 && Clock::now() > deadline) return pending;
    if (spin < 256) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(spin < 4096 ? 20 : 200));
    }
  }
}

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
  out << "]";
  return out.str();
}

std::vector<int> all_ranks(int n) {
  std::vector<int> ranks(n);
  for (int i = 0; i < n; ++i) ranks[i] = i;
  return ranks;
}

}  // namespace

const char* op_tag_name(OpTag tag) {
  switch (tag) {
    case OpTag::kDispatchNotify:
      return "dispatch (notify)";
    case OpTag::kDispatchData:
      return "dispatch";
    case OpTag::kCombine:
      return "combine";
    case OpTag::kHybridNotify:
      return "hybrid dispatch (notify)";
    case OpTag::kHybridData:
      return "hybrid dispatch";
    case OpTag::kHybridCombine:
      return "hybrid combine";
  }
  return "unknown op";
}

Exchange::Exchange(Buffer& buffer, const char* op_name, uint64_t call_tag)
    : buffer_(buffer),
      lock_(buffer.op_mutex()),
      op_name_(op_name),
      rank_(buffer.rank()),
      num_ranks_(buffer.num_ranks()),
      slot_bytes_((buffer.data_bytes() / buffer.num_ranks()) & ~size_t{63}),
      round_(buffer.round_counter()),
      first_round_(buffer.round_counter()),
      call_tag_(call_tag),
      uncaught_(std::uncaught_exceptions()) {
  FA2A_CHECK_RUNTIME(buffer.poisoned().empty(), "fused_a2a ", op_name,
                     ": the buffer is unusable after an earlier failure (", buffer.poisoned(),
                     "); reset the buffer (torch: it is re-created by get_buffer after "
                     "reset; jax: jax_fused_a2a.reset())");
  FA2A_CHECK_RUNTIME(buffer.connected(), "fused_a2a ", op_name, ": buffer is not connected");
  FA2A_CHECK(slot_bytes_ > sizeof(MessageHeader) + 64, "fused_a2a ", op_name, ": the buffer (",
             buffer.data_bytes(), " bytes for ", num_ranks_, " ranks) is too small");
  static_assert(2 * kMaxRanks * sizeof(uint64_t) <= kControlBytes, "control region too small");
}

Exchange::~Exchange() {
  // An exception left this op in the middle of a round: the peers wait for (or already sent) a
  // message this rank will never read or write, so the ranks' counters disagree from now on.
  if (in_round_ && std::uncaught_exceptions() > uncaught_ && buffer_.poisoned().empty()) {
    buffer_.poison(str_cat("fused_a2a ", op_name_, ": an error on rank ", rank_,
                           " interrupted the op in round ", op_round(), " of this op"));
  }
}

uint64_t* Exchange::ready_flags(int rank) const {
  return reinterpret_cast<uint64_t*>(buffer_.control(rank));
}
uint64_t* Exchange::consumed_flags(int rank) const {
  return reinterpret_cast<uint64_t*>(buffer_.control(rank)) + kMaxRanks;
}
uint8_t* Exchange::slot(int owner, int sender) const {
  return buffer_.data(owner) + static_cast<size_t>(sender) * slot_bytes_;
}

void Exchange::fail(const std::string& reason) {
  buffer_.poison(reason);
  throw Error(ErrorKind::kTimeout, reason);
}

void Exchange::timeout(const char* phase, const std::vector<int>& missing) {
  std::ostringstream why;
  why << "fused_a2a " << op_name_ << ": timeout after " << timeout_seconds() << " s in phase '"
      << phase << "' (round " << op_round() << " of this op) on rank " << rank_ << " of "
      << num_ranks_ << ": ranks " << rank_list(missing)
      << " did not arrive (crashed, hung, or called a different op; see FUSED_A2A_TIMEOUT_S)";
  fail(why.str());
}

uint8_t* Exchange::send_payload(int dst, const char* phase) {
  // dst raises consumed[dst] in our control region to round + 1 after reading round `round`.
  uint64_t* consumed = consumed_flags(rank_);
  in_round_ = true;
  auto arrived = [&](int peer) { return load_acquire(&consumed[peer]) >= round_; };
  if (!wait_for({dst}, arrived).empty()) {
    std::vector<int> missing;  // every peer that has not read this rank's previous message
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (peer == dst || !arrived(peer)) missing.push_back(peer);
    }
    timeout(phase, missing);
  }
  return slot(dst, rank_) + sizeof(MessageHeader);
}

void Exchange::publish(int dst, OpTag tag, int64_t count, const int64_t aux[5], int64_t status) {
  auto* header = reinterpret_cast<MessageHeader*>(slot(dst, rank_));
  header->op = static_cast<uint32_t>(tag);
  header->sender = static_cast<uint32_t>(rank_);
  header->round = round_;
  header->count = count;
  header->status = status;
  header->call_tag = call_tag_;
  in_round_ = true;
  for (int i = 0; i < 5; ++i) header->aux[i] = aux ? aux[i] : 0;
  store_release(&ready_flags(dst)[rank_], round_ + 1);
}

void Exchange::wait_all_messages(OpTag tag, const char* phase) {
  uint64_t* ready = ready_flags(rank_);
  in_round_ = true;
  auto missing = wait_for(all_ranks(num_ranks_),
                          [&](int peer) { return load_acquire(&ready[peer]) >= round_ + 1; });
  if (!missing.empty()) timeout(phase, missing);
  for (int src = 0; src < num_ranks_; ++src) {
    const MessageHeader& h = header(src);
    if (h.op != static_cast<uint32_t>(tag) || h.round != round_ || h.call_tag != call_tag_) {
      std::ostringstream why;
      why << "fused_a2a " << op_name_ << ": op mismatch on rank " << rank_ << ": rank " << src
          << " called " << op_tag_name(static_cast<OpTag>(h.op)) << " while this rank called "
          << op_tag_name(tag);
      if (h.op == static_cast<uint32_t>(tag) && h.call_tag != call_tag_) {
        why << " from a different call site";
      } else if (h.op == static_cast<uint32_t>(tag)) {
        why << " out of step (its message is for round " << h.round << ", this rank is at round "
            << round_ << ")";
      }
      why << " (all ranks must call the same ops in the same order)";
      buffer_.poison(why.str());
      throw Error(ErrorKind::kRuntime, why.str());
    }
  }
}

const MessageHeader& Exchange::header(int src) const {
  return *reinterpret_cast<const MessageHeader*>(slot(rank_, src));
}

const uint8_t* Exchange::payload(int src) const { return slot(rank_, src) + sizeof(MessageHeader); }

void Exchange::finish_round() {
  for (int src = 0; src < num_ranks_; ++src) {
    store_release(&consumed_flags(src)[rank_], round_ + 1);
  }
  ++round_;
  buffer_.round_counter() = round_;
  in_round_ = false;
}

std::vector<int> failed_ranks(const Exchange& ex) {
  std::vector<int> failed;
  for (int src = 0; src < ex.num_ranks(); ++src) {
    if (ex.header(src).status != 0) failed.push_back(src);
  }
  return failed;
}

std::string peers_failed(const char* op, const std::vector<int>& ranks, const char* what) {
  return str_cat("fused_a2a ", op, ": rank(s) ", rank_list(ranks), " ", what,
                 " (see the error raised there); every rank of the group stops this op");
}

}  // namespace fa2a::cpu
