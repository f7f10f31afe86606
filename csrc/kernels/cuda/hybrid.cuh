// HybridEP on CUDA (hybrid_dispatch.cu, hybrid_combine.cu): the message channel between ranks,
// exact conversions (bit for bit as csrc/kernels/cpu/convert.h and fp8.h) and host helpers.
//
// Transport: the data region of every rank's buffer is cut into G slots; slot s of rank d is
// written only by rank s. Every op is a sequence of messages that every rank of the group sends
// and receives in the same order (one per round). Message m (a per-buffer counter, kept in the
// control region, so it is the same on every rank and strictly increasing) from s to d:
//   s waits until d acknowledged message m - 1 from s (ack[d] in s's control region >= m - 1),
//   writes its slot on d, fences (system scope), releases data[s] = m in d's control region;
//   d waits for data[s] >= m, reads the slot, releases ack[d] = m in s's control region.
// Every wait is bounded (wait_flag: FUSED_A2A_TIMEOUT_S, reported through the host-mapped error
// word, which poisons the buffer); nothing but the message counter lives across ops, so CUDA
// graphs replay the same kernels with the counter read on the device. Every op starts with an
// empty message (enter), so that no rank writes a peer's data region before that peer has left
// its previous op on this buffer (normal mode shares the data region in JAX).
//
// The count exchange (notify) runs as one block. The data kernels run as B blocks (num_sms) that
// all take part in every message: each block waits for the flags itself, and the block that
// arrives last at the end of a message's send (receive) phase releases the data (ack) flags for
// the whole grid (arrival counters in Ctrl, reset by the kernel's last block). The B blocks must
// be resident together (B <= SMs, one block per SM fits), as for the normal-mode kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "common.cuh"
#include "fused_a2a/buffer.h"
#include "state.h"

namespace fa2a::cuda::hybrid {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// How a data kernel runs its rounds (each mode its own instantiation): every block sends, then
// receives; two half slots (FUSED_A2A_HYBRID_PIPELINE=1); sending and receiving blocks at once
// with per-row / per-token tags (FUSED_A2A_HYBRID_OVERLAP, hybrid_dispatch.cu / _combine.cu).
constexpr int kRoundsPlain = 0, kRoundsHalves = 1, kRoundsOverlap = 2;

struct Ctrl {
  unsigned long long msgs;   // messages completed on this buffer (same on every rank)
  long long group_tokens;    // the largest N of the last notify (rounds of its data phase)
  unsigned int sent_blocks;  // blocks of the running kernel done sending, over its messages
  unsigned int recv_blocks;  // blocks of the running kernel done receiving, over its messages
  unsigned int blocks_done;  // blocks of the running kernel that finished
  unsigned int unused;
  unsigned long long pad[4];           // to 64 bytes
  unsigned long long data[kMaxRanks];  // data[s] = m: message m from s is in slot s
  unsigned long long ack[kMaxRanks];   // ack[d] = m: d has read message m from this rank
};
static_assert(sizeof(Ctrl) <= kHybridBytes, "hybrid control words");

__host__ __device__ inline Ctrl* ctrl_of(uint8_t* base) {
  return reinterpret_cast<Ctrl*>(base + kHybridOffset);
}

// Everything a kernel needs to talk to its peers.
struct Comm {
  uint8_t* const* peers;  // device table of the G buffer bases
  int rank;
  int num_ranks;
  size_t slot_bytes;  // bytes of one slot (16-byte multiple)
  HostError* host_error;
  unsigned long long timeout_ns;
  int op;

  __device__ uint8_t* slot_on(int dst) const {  // this rank's slot in dst's buffer
    return peers[dst] + kControlBytes + static_cast<size_t>(rank) * slot_bytes;
  }
  __device__ const uint8_t* slot_from(int src) const {  // src's slot in this rank's buffer
    return peers[rank] + kControlBytes + static_cast<size_t>(src) * slot_bytes;
  }
  __device__ WaitCtx wait_ctx() const {
    return WaitCtx{local_state(peers[rank]), host_error, timeout_ns, op, rank};
  }
};

// Block-wide steps of one message; `fail` is a shared flag, every thread returns its value
// after a __syncthreads (so the whole block leaves together).
// `lag`: messages that may be unread by a peer when this one is written (1: the slot holds one
// message; 2: two halves, see grid_send).
__device__ inline bool send_begin(const Comm& c, unsigned long long m, int* fail,
                                  unsigned long long lag = 1) {
  const WaitCtx ctx = c.wait_ctx();
  Ctrl* mine = ctrl_of(c.peers[c.rank]);
  for (int d = threadIdx.x; d < c.num_ranks; d += blockDim.x) {
    if (!wait_flag(&mine->ack[d], m > lag ? m - lag : 0ull, ctx, kPhaseRound, d)) *fail = 1;
  }
  __syncthreads();
  return *fail == 0;
}

__device__ inline void send_end(const Comm& c, unsigned long long m) {
  __threadfence_system();
  __syncthreads();
  for (int d = threadIdx.x; d < c.num_ranks; d += blockDim.x) {
    st_release_sys(&ctrl_of(c.peers[d])->data[c.rank], m);
  }
}

__device__ inline bool recv_begin(const Comm& c, unsigned long long m, int* fail) {
  const WaitCtx ctx = c.wait_ctx();
  Ctrl* mine = ctrl_of(c.peers[c.rank]);
  // The notify's message carries the counts: a missing peer is reported as the count exchange.
  const int phase = c.op == kOpHybridNotify ? kPhaseNotify : kPhaseData;
  for (int s = threadIdx.x; s < c.num_ranks; s += blockDim.x) {
    if (!wait_flag(&mine->data[s], m, ctx, phase, s)) *fail = 1;
  }
  __syncthreads();
  if (*fail) return false;
  // Every thread acquires every flag itself, so its reads of the slots are ordered after them.
  for (int s = 0; s < c.num_ranks; ++s) (void)ld_acquire_sys(&mine->data[s]);
  return true;
}

__device__ inline void recv_end(const Comm& c, unsigned long long m) {
  __threadfence_system();
  __syncthreads();
  for (int s = threadIdx.x; s < c.num_ranks; s += blockDim.x) {
    st_release_sys(&ctrl_of(c.peers[s])->ack[c.rank], m);
  }
}

// An empty message that every op sends first: once it has arrived from every peer, each peer has
// entered this op, so its earlier kernels on this buffer (normal-mode ops included, which use the
// same data region with their own protocol) are done with this rank's data region and with its
// own. Advances m.
__device__ inline bool enter(const Comm& c, unsigned long long& m, int* fail) {
  ++m;
  if (!send_begin(c, m, fail)) return false;
  send_end(c, m);
  if (!recv_begin(c, m, fail)) return false;
  recv_end(c, m);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Multi-block messages. Message number q (1-based) of a kernel of B blocks: every block calls
// send_begin (block-level wait for the acks), writes its share, grid_send_end(q * B); then
// recv_begin, reads its share, grid_recv_end(q * B).

// Thread 0 of the block that brings *counter to target returns true (after a fence that orders
// every arrived block's writes before what it does next). Each block fences its own writes first.
__device__ inline bool grid_arrive(unsigned int* counter, unsigned int target) {
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    __threadfence_system();
    last = atomicAdd(counter, 1u) + 1u == target;
    if (last) __threadfence_system();
  }
  return last;
}

__device__ inline void grid_send_end(const Comm& c, unsigned long long m, unsigned int target) {
  if (grid_arrive(&ctrl_of(c.peers[c.rank])->sent_blocks, target)) {
    for (int d = 0; d < c.num_ranks; ++d) st_release_sys(&ctrl_of(c.peers[d])->data[c.rank], m);
  }
}

__device__ inline void grid_recv_end(const Comm& c, unsigned long long m, unsigned int target) {
  if (grid_arrive(&ctrl_of(c.peers[c.rank])->recv_blocks, target)) {
    for (int s = 0; s < c.num_ranks; ++s) st_release_sys(&ctrl_of(c.peers[s])->ack[c.rank], m);
  }
}

// The halves of a message of the grid (m and q, the kernel's message counter, advanced by
// each): grid_send waits until every peer has read message m - lag (lag 1: the slot holds one
// message; 2: two halves, the message two back is the one in this half), writes this block's
// share with send(), publishes; grid_recv waits for message m's data, reads this block's share
// with recv(), acknowledges. False (the block leaves) on a timeout or abort. Kernels with two
// halves interleave send(k + 1), recv(k): the arrival counters still see every block's arrival
// for one message before any for the next (a block's send(k + 2) waits for its own rank's ack of
// k, i.e. every local block's recv(k)).
template <typename Send>
__device__ inline bool grid_send(const Comm& c, unsigned long long& m, unsigned int& q, int* fail,
                                 Send&& send, unsigned long long lag = 2) {
  ++m;
  ++q;
  if (!send_begin(c, m, fail, lag)) return false;
  send();
  grid_send_end(c, m, q * gridDim.x);
  return true;
}
template <typename Recv>
__device__ inline bool grid_recv(const Comm& c, unsigned long long& m, unsigned int& q, int* fail,
                                 Recv&& recv) {
  ++m;
  ++q;
  if (!recv_begin(c, m, fail)) return false;
  recv();
  grid_recv_end(c, m, q * gridDim.x);
  return true;
}
// One whole message (one slot): send, then receive.
template <typename Send, typename Recv>
__device__ inline bool grid_message(const Comm& c, unsigned long long& m, unsigned int& q,
                                    int* fail, Send&& send, Recv&& recv) {
  unsigned long long m_read = m;
  unsigned int q_read = q;
  return grid_send(c, m, q, fail, send, 1) && grid_recv(c, m_read, q_read, fail, recv);
}
// A kernel's rounds, round k being message m0 + 1 + k for its sender and its receivers alike:
// send_round(k, m) writes this block's share of round k, recv_round(k, m) reads it. One whole
// message per round, or (kTwoHalves: each slot in two halves, round k in half k % 2) round k + 1
// sent before round k is read, so one round's transfer overlaps the previous round's reading.
template <bool kTwoHalves, typename SendRound, typename RecvRound>
__device__ inline bool grid_rounds(const Comm& c, unsigned long long& m, unsigned int& q, int* fail,
                                   long long rounds, SendRound&& send_round,
                                   RecvRound&& recv_round) {
  if constexpr (!kTwoHalves) {
    for (long long round = 0; round < rounds; ++round) {
      if (!grid_message(
              c, m, q, fail, [&] { send_round(round, m); }, [&] { recv_round(round, m); }))
        return false;
    }
    return true;
  } else {
    unsigned long long m_sent = m, m_read = m;
    unsigned int q_sent = q, q_read = q;
    bool ok = rounds == 0 || grid_send(c, m_sent, q_sent, fail, [&] { send_round(0, m_sent); });
    for (long long round = 0; ok && round < rounds; ++round) {
      if (round + 1 < rounds)
        ok = grid_send(c, m_sent, q_sent, fail, [&] { send_round(round + 1, m_sent); });
      if (ok) ok = grid_recv(c, m_read, q_read, fail, [&] { recv_round(round, m_read); });
    }
    m = m_read;
    q = q_read;
    return ok;
  }
}
// kRoundsOverlap's block roles: blocks [0, send_blocks) send, the others receive; a warp's index
// and count within its role.
struct OverlapRoles {
  bool sender;
  int recv_blocks;
  long long warps, warp_index;
  __device__ OverlapRoles(int send_blocks) {
    recv_blocks = static_cast<int>(gridDim.x) - send_blocks;
    sender = static_cast<int>(blockIdx.x) < send_blocks;
    warps = static_cast<long long>(sender ? send_blocks : recv_blocks) * kWarps;
    warp_index = static_cast<long long>(sender ? blockIdx.x : blockIdx.x - send_blocks) * kWarps +
                 (threadIdx.x >> 5);
  }
};

// kRoundsOverlap's entry message: every thread of the grid zeroes its share of `count` tags (u64
// words), tag i at at(i), before the message's ack lets any sender write (a stale word could equal
// a message number).
template <typename At>
__device__ inline void grid_zero_tags(long long count, At&& at) {
  const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += threads) {
    *at(i) = 0ull;
  }
}

// kRoundsOverlap, a sending warp after writing what `tag` covers: every lane's writes first (as
// send_end), then lane 0 releases the tag m to the reader.
__device__ inline void warp_release_tag(unsigned long long* tag, unsigned long long m, int lane) {
  __threadfence_system();
  __syncwarp();
  if (lane == 0) st_release_sys(tag, m);
}

// kRoundsOverlap, a receiving block before message m's round: wait for this rank's ack of
// message m - 1, i.e. every local receiving block is done with the round before (and, for the
// first round, cleared its share of the tags in the entry message). False (the block leaves) on
// a timeout or abort.
__device__ inline bool overlap_recv_begin(const Comm& c, unsigned long long m, int* fail) {
  if (threadIdx.x == 0 && !wait_flag(&ctrl_of(c.peers[c.rank])->ack[c.rank], m - 1, c.wait_ctx(),
                                     kPhaseRound, c.rank)) {
    *fail = 1;
  }
  __syncthreads();
  return *fail == 0;
}

// The grid's empty first message (see enter).
__device__ inline bool grid_enter(const Comm& c, unsigned long long& m, unsigned int& q,
                                  int* fail) {
  return grid_message(c, m, q, fail, [] {}, [] {});
}

// Kernel end: true in every thread of the last block to finish, which then owns the epilogue;
// it resets the arrival counters for the next kernel on this buffer (stream order).
__device__ inline bool grid_finish(const Comm& c, int* s_last) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    Ctrl* mine = ctrl_of(c.peers[c.rank]);
    *s_last = atomicAdd(&mine->blocks_done, 1u) + 1u == gridDim.x ? 1 : 0;
    if (*s_last) {
      __threadfence();
      mine->sent_blocks = 0;
      mine->recv_blocks = 0;
      mine->blocks_done = 0;
    }
  }
  __syncthreads();
  return *s_last != 0;
}

__device__ inline unsigned long long read_msgs(const Comm& c) {
  return *reinterpret_cast<volatile unsigned long long*>(&ctrl_of(c.peers[c.rank])->msgs);
}
__device__ inline void write_msgs(const Comm& c, unsigned long long m) {
  *reinterpret_cast<volatile unsigned long long*>(&ctrl_of(c.peers[c.rank])->msgs) = m;
}

// ---------------------------------------------------------------------------------------------
// Exact conversions (copies of the CPU backend's, which define the contract).
__device__ __forceinline__ float bf16_to_f32(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

__device__ __forceinline__ uint16_t f32_to_bf16(float value) {
  uint32_t bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

__device__ __forceinline__ float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = __fmul_rn(static_cast<float>(mantissa), 5.9604644775390625e-08f);
    return __uint_as_float(sign | __float_as_uint(magnitude));
  }
  if (exponent == 31) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ uint16_t f32_to_f16(float value) {
  uint32_t bits = __float_as_uint(value);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t out;
  if (bits >= 0x47800000u) {
    out = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < 0x38800000u) {
    const float shifted = __fadd_rn(__uint_as_float(bits), 0.5f);
    out = __float_as_uint(shifted) - 0x3f000000u;
  } else {
    const uint32_t mantissa_odd = (bits >> 13) & 1u;
    bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = bits >> 13;
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

// dtype: 0 f32, 1 f16, otherwise bf16 (host maps DType to this code).
enum ValueCode { kValF32 = 0, kValF16 = 1, kValBF16 = 2 };

inline int value_code(DType d) {
  return d == DType::kF32 ? kValF32 : d == DType::kF16 ? kValF16 : kValBF16;
}

__device__ __forceinline__ float load_f32(const void* row, int64_t i, int code) {
  if (code == kValF32) return __ldg(static_cast<const float*>(row) + i);
  const uint16_t h = __ldg(static_cast<const unsigned short*>(row) + i);
  return code == kValF16 ? f16_to_f32(h) : bf16_to_f32(h);
}

__device__ __forceinline__ void store_f32(void* row, int64_t i, int code, float v) {
  if (code == kValF32) {
    static_cast<float*>(row)[i] = v;
  } else {
    static_cast<uint16_t*>(row)[i] = code == kValF16 ? f32_to_f16(v) : f32_to_bf16(v);
  }
}

__device__ __forceinline__ uint8_t f32_to_e4m3(float value) {
  uint32_t bits = __float_as_uint(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  bits &= 0x7fffffffu;
  if (bits >= 0x7f800000u) return sign | 0x7fu;
  uint32_t code;
  if (bits < 0x3c800000u) {
    const float shifted = __fadd_rn(__uint_as_float(bits), 16384.0f);
    code = __float_as_uint(shifted) - 0x46800000u;
  } else {
    bits += 0x7ffffu + ((bits >> 20) & 1u);
    code = (bits >> 20) - (120u << 3);
  }
  if (code > 0x7eu) code = 0x7fu;
  return static_cast<uint8_t>(sign | code);
}

// One warp quantises a row of H values (H % 128 == 0) into q (e4m3) and scales (one f32 per 128
// values), as fp8_quantize_row in csrc/kernels/cpu/fp8.h: lane l handles values 4l..4l+3 of each
// block. q must be 4-byte aligned.
__device__ inline void warp_quantize_row(const void* row, int code, int64_t hidden, uint8_t* q,
                                         float* scales, int lane) {
  for (int64_t b = 0; b < hidden / kFp8BlockSize; ++b) {
    const int64_t h0 = b * kFp8BlockSize + lane * 4;
    float v[4];
    float amax = 0.0f;
    bool nan = false;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = load_f32(row, h0 + k, code);
      const float a = fabsf(v[k]);
      nan |= isnan(a);
      amax = a > amax ? a : amax;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, amax, off);
      amax = o > amax ? o : amax;
    }
    nan = __any_sync(0xffffffffu, nan);
    if (nan) amax = __uint_as_float(0x7fc00000u);
    if (!(amax >= 1e-4f) && !nan) amax = 1e-4f;
    const float scale = __fdiv_rn(amax, 448.0f);
    uint32_t packed = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      packed |= static_cast<uint32_t>(f32_to_e4m3(__fdiv_rn(v[k], scale))) << (8 * k);
    }
    *reinterpret_cast<uint32_t*>(q + h0) = packed;
    if (lane == 0) scales[b] = scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side of the ops (hybrid_dispatch.cu, hybrid_combine.cu).

inline Comm make_comm(Buffer& buffer, CudaState& st, int op) {
  Comm c;
  c.peers = reinterpret_cast<uint8_t* const*>(buffer.peer_table());
  c.rank = buffer.rank();
  c.num_ranks = buffer.num_ranks();
  c.slot_bytes = (buffer.data_bytes() / c.num_ranks) & ~size_t{15};
  c.host_error = st.host_error;
  c.timeout_ns = timeout_ns();
  c.op = op;
  return c;
}

// An op's hold on its buffer: the buffer's op lock, its device, and its CUDA state, checked for
// an earlier failure.
struct OpScope {
  std::lock_guard<std::mutex> lock;
  DeviceGuard guard;
  CudaState& st;
  explicit OpScope(Buffer& buffer)
      : lock(buffer.op_mutex()), guard(buffer.device()), st(cuda_state(buffer)) {
    check_no_error(st, buffer);
  }
};

}  // namespace fa2a::cuda::hybrid

namespace fa2a {
struct HybridDispatchArgs;
namespace cuda {
// The routing pre-pass (hybrid_route.cu) into the buffer's scratch: ordinal [N, E] i32 (a token's
// ordinal among this rank's tokens routed to an expert, -1 if not routed), ecount [E] i32 (tokens
// per expert), fanout (largest number of one rank's experts one token picked). Every HybridEP
// dispatch entry point runs it before its kernels.
void launch_hybrid_route(Buffer& buffer, CudaState& st, const HybridDispatchArgs& a,
                         cudaStream_t s);
}  // namespace cuda
}  // namespace fa2a
