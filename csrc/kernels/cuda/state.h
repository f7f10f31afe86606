// Host side of the CUDA backend: per-buffer state (host-mapped error word, device peer table,
// routing scratch), launch configuration and error checks shared by the ops.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/hybrid.h"
#include "fused_a2a/ops.h"

namespace fa2a::cuda {

#define FA2A_CUDA_CHECK(expr, what)                                          \
  do {                                                                       \
    cudaError_t err_ = (expr);                                               \
    if (err_ != cudaSuccess) {                                               \
      (void)cudaGetLastError();                                              \
      FA2A_FAIL(::fa2a::ErrorKind::kRuntime, "fused_a2a CUDA: ", what, ": ", \
                cudaGetErrorString(err_));                                   \
    }                                                                        \
  } while (0)

// kernel<<<blocks, threads, smem, stream>>>(args...), with programmatic dependent launch when
// pdl (the kernel calls griddep_wait before reading what the kernel before it wrote).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, size_t smem,
                   cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  FA2A_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...),
                  "cudaLaunchKernelEx");
}

// Makes `device` current for the scope (JAX calls ops from threads that may have another one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_;
};

// Routing scratch written by the route-scan kernel and read by dispatch / combine:
//   cum [G][N+1]: tokens before t routed to rank d; cum[d][N] = tokens routed to d
//   send_list [G][N]: the tokens routed to d, ascending
//   ecount [E]: (token, slot) pairs of this rank per expert
//   hist [Lcap]: per-local-expert counts accumulated by the blocks of one kernel (kept at 0)
//   ordinal [N*E]: HybridEP, token t's ordinal among this rank's tokens routed to expert e, or -1
//   fanout [1]: HybridEP, the largest number of one rank's experts picked by one token
//   masks [N], tile_count [kMaxScanTiles][kMaxRanks], tile_ecount [kMaxScanTiles][E]: the route
//   scan's first pass (per token, the ranks it is routed to; per tile, tokens per rank and pairs
//   per expert), read by its second pass; tile_flag [kMaxScanTiles]: the epoch of the op whose
//   kernel wrote tile j in its first pass (FUSED_A2A_CUDA_SCAN_PASS1=fused)
constexpr int kMaxScanTiles = 64;
constexpr int kScanThreads = 512;  // threads of a route-scan block; a tile is per x this tokens
struct Scratch {
  int* cum = nullptr;
  int* send_list = nullptr;
  int* ecount = nullptr;
  int* hist = nullptr;
  int* ordinal = nullptr;
  int* fanout = nullptr;
  unsigned long long* masks = nullptr;
  int* tile_count = nullptr;
  int* tile_ecount = nullptr;
  unsigned long long* tile_flag = nullptr;  // [kMaxScanTiles] pass 1 in the kernel (scan_pass2.cuh)
  int* counts_stage = nullptr;  // [3 + E] the count exchange's host counts, when the host
                                // memory is not device-writable (copied after the sync)
};

// Dispatch trace (FUSED_A2A_CUDA_TRACE=1): host-mapped, kTraceWarps slots of kTraceSlots u64
// (ns, accumulated over calls), slot = block * 16 + warp. Sender warps: 0 ready waits, 1 waits for
// the ring's reads at a chunk start, 2 metadata staging, 3 row pushes, 4 chunk ends, 5 final
// drain, 6 finish time after kernel start, 7 chunks. Receiver warps: 0 flag waits, 1 remote
// chunk copies, 2 own chunk copies, 3 zero rows, 4 round barriers, 5 time of the last chunk flag
// seen after kernel start, 6 finish time after kernel start, 7 chunks. Both: 8 role start (for
// receivers: the data phase start) after kernel start, 9 the role's item loop in cycles (senders:
// up to the final drain), so that the time outside the phases above is slot 9 minus their sum.
// Senders' slot 10: their item claims (next_item; inside slot 9, outside slots 0-4). Both, 11 and
// 12: the block's prologue marks after kernel start (the send lists' grid barrier passed, every
// source's layout read; 0 where the path has no such step).
// Combine trace (the same words, written by the combine kernel): sender warps 0 ready waits (a
// later round's), 3 row pushes, 4 chunk ends, 5 final drain, 6 finish, 7 chunks, 8 start, 9 item
// loop, 10 claims; reducer warps 0 source lookups and their flag waits, 1 reductions, 4 round
// barriers, 5 time of the latest token with a remote row, 6 finish, 7 tokens, 8 start, 9 loop.
// Both, 11 and 12: the route scan's grid barrier passed (fused scan), every peer's message in.
// The constants and WarpTrace: common.cuh.

// Host time of a buffer's CUDA op calls by phase (cuda_host_phases, benchmarks/host_profile.py):
// words [op][0] calls, [op][1] ns to the end of the route scan's launch (locks, checks, state,
// scratch), [op][2] ns to the kernel's parameters (environment reads, launch config, the FP8
// records kernel), [op][3] ns of the kernel's launch; op kHostDispatch (static, data, cached) or
// kHostCombine. About 80 ns a call (four steady_clock reads).
constexpr int kHostDispatch = 0, kHostCombine = 1, kHostOps = 2, kHostWords = 4;
// The phases are kept in the timer until done() adds them to an op's sums (the state holding
// them is found after the first phase).
class HostPhaseTimer {
 public:
  HostPhaseTimer() : last_(now()) {}
  void mark(int phase) {
    const uint64_t t = now();
    words_[phase] += t - last_;
    last_ = t;
  }
  void done(uint64_t* sums) {  // the launch's end: the call counts
    mark(3);
    ++words_[0];
    for (int w = 0; w < kHostWords; ++w) sums[w] += words_[w];
  }

 private:
  static uint64_t now() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }
  uint64_t words_[kHostWords] = {};
  uint64_t last_;
};

struct CudaState {
  int device = 0;
  int num_ranks = 0;
  int sm_count = 0;
  size_t smem_optin = 0;
  HostError* host_error = nullptr;  // host-mapped, device-visible at the same address (UVA)
  // host-mapped [kHybridMetaSize + L + 1]: the HybridEP notify's meta, its padded counts per
  // local expert, a ticket (made by the first dynamic dispatch, grown with L);
  // hybrid_meta_host_words long
  int32_t* hybrid_meta_host = nullptr;
  int hybrid_meta_host_words = 0;
  // the last HybridEP notify's host ticket (FUSED_A2A_HYBRID_NOTIFY_WAIT=spin)
  int32_t hybrid_ticket = 0;
  unsigned long long* trace = nullptr;  // host-mapped [kTraceWords] or null (tracing off)
  uint64_t host_phases[kHostOps][kHostWords] = {};  // HostPhaseTimer's sums
  void** peer_table = nullptr;                      // device array of the G bases
  void* scratch_mem = nullptr;
  size_t scratch_bytes = 0;
  int64_t cap_tokens = -1;
  int cap_experts = -1;
  Scratch scratch;
  uint32_t* records = nullptr;  // dispatch metadata records [G][N][M] (ensure_records)
  size_t records_words = 0;
  std::vector<void*> retired;  // outgrown scratch, kept alive for captured graphs
  uint64_t scratch_gen = 0;    // bumped by every ensure_scratch (every op's use of the scratch)
  // Whether every rank of the group lives in this process (-1: not yet looked up; see
  // group_in_process)
  int group_local = -1;
  // The route scan (send lists included) of the last dispatch_notify: the dispatch_data call of
  // the same op reuses it when nothing else used the scratch in between (scratch_gen unchanged)
  // and the routing arguments are the same, instead of scanning again after the host sync.
  struct NotifiedScan {
    const void* topk_idx = nullptr;
    int64_t num_tokens = -1;
    int num_topk = 0, num_experts = 0;
    bool idx64 = false;
    uint64_t gen = 0;
    bool layouts = false;  // it published every rank's layout (FUSED_A2A_CUDA_LAYOUT=dynamic)
  } notified;
  // The same for HybridEP: the routing pre-pass (ordinals, counts, fan-out) of the last
  // hybrid_dispatch_notify, reused by the hybrid_dispatch_data right after it.
  struct NotifiedRoute {
    const void* routing_map = nullptr;
    int64_t num_tokens = -1;
    int num_experts = 0, num_local_experts = 0;
    uint64_t gen = 0;
  } hybrid_notified;
  ~CudaState();
};

CudaState& cuda_state(Buffer& buffer);

// Throws ErrorKind::kTimeout if an earlier op on this buffer timed out (or kRuntime for a fault
// of an earlier kernel seen now).
void check_no_error(CudaState& st, Buffer& buffer);
// Synchronise the stream, then report a timeout of the op just run.
void sync_and_check(CudaState& st, Buffer& buffer, cudaStream_t stream, const char* op);
// Spins until the host-mapped *word == ticket (a kernel writes it after its other host-mapped
// outputs, fenced), instead of a stream sync: the host sees it as soon as it is written. Checks
// the error word every spin; every 1024 spins yields, checks the deadline (2 x timeout_ns() +
// 5 s: a backstop for a kernel that never runs) and, given `stream`, the stream (a fault, or the
// kernel ended without writing the ticket). op: the op's name for the messages.
// FUSED_A2A_HOST_WAIT=pause adds a PAUSE to every spin; =sleep sleeps 10 us between checks after
// the first 20 us (state.cu).
void wait_host_ticket(CudaState& st, Buffer& buffer, const volatile int32_t* word, int32_t ticket,
                      const cudaStream_t* stream, const char* op);
// Throws ErrorKind::kValue for a FUSED_A2A_HOST_WAIT that wait_host_ticket would refuse: called
// before an op that will wait launches anything.
void check_host_wait_env();

// Scratch for N tokens, E experts (grows; never while the stream is being captured).
const Scratch& ensure_scratch(CudaState& st, int num_ranks, int64_t num_tokens, int num_experts,
                              cudaStream_t stream);

// The dispatch's precomputed metadata records, `words` 32-bit words (grows like the scratch).
uint32_t* ensure_records(CudaState& st, size_t words, cudaStream_t stream);

// Launch shape of the communication kernels.
struct LaunchConfig {
  int blocks = 24;
  int send_warps = 4;
  int recv_warps = 12;
  int stages = 3;
  uint32_t stage_bytes = 0;
  bool tma = true;
  // A fence.sc.sys before each chunk flag besides the release store (FUSED_A2A_CUDA_FLAG_FENCE:
  // "sc", the default, or "release").
  bool flag_fence_sc = true;
  int loads_ahead =
      0;  // TmaPipe's loads ahead of its stores (FUSED_A2A_CUDA_LOADS_AHEAD; 0: S - 2)
  // TmaPipe::end_chunk releases a pending chunk once its own writes are complete, not all of the
  // warp's (FUSED_A2A_CUDA_CHUNK_END=lean; session 10, lost in run 50)
  bool lean_chunk_end = false;
  // The flag waits' first load an acquire (FUSED_A2A_CUDA_WAIT=acquire, the default since session
  // 26; "relaxed": a relaxed load, then an acquire once the flag is up, as before)
  bool wait_acquire_first = true;
};
// Blocks of a communication kernel: num_sms (0: 24; FUSED_A2A_CUDA_BLOCKS overrides), at most
// the device's SMs.
int comm_blocks(const CudaState& st, int num_sms);
int send_warps_env();  // FUSED_A2A_CUDA_SEND_WARPS (4), at most kMaxThreads / 32 - 1
// Shared memory besides the copy stages: fixed bytes, and bytes per sender / receiver warp.
// send_warps > 0: the caller's sender warps a block (combine_send_warps), and the receiver warps
// fill the block unless FUSED_A2A_CUDA_RECV_WARPS is set; 0: send_warps_env() and 12 receivers.
LaunchConfig launch_config(const CudaState& st, int num_sms, size_t row_bytes, size_t fixed_smem,
                           size_t per_send_warp, size_t per_recv_warp, int send_warps = 0);
// The combine's sender warps a block for launch_config: FUSED_A2A_CUDA_COMBINE_SEND_WARPS; unset,
// without FUSED_A2A_CUDA_SEND_WARPS, on 2 ranks 2 from 48 SMs and 3 below, on more 3 from 48
// SMs; else 0 (the same as the dispatch's).
int combine_send_warps(int num_ranks, int blocks);

unsigned long long timeout_ns();
bool env_is(const char* name, const char* value);  // the environment variable is set to value
// FUSED_A2A_CUDA_CHUNK_ROWS: the largest chunk (rows) of the dispatch and the combine; unset:
// `unset` (the combine's 8)
int chunk_rows_env(int unset = 8);
// The dispatch's largest chunk on `blocks` SMs: FUSED_A2A_CUDA_CHUNK_ROWS, else 32 / 16 / 8 rows
// up to 12 / below 24 / from 24 SMs; FP8 rows (fp8): 32 below 24, 16 below 48, 8 from 48
int dispatch_chunk_rows(int blocks, bool fp8);
// FUSED_A2A_CUDA_CHUNKS_PER_WARP: about the chunks a sender warp gets when chunks are below the
// largest size, default 1 since session 13 (2 before; small N: fewer, larger chunks mean fewer
// serial write-completion waits per warp)
int chunks_per_warp_env();
bool hybrid_pipeline_env();  // FUSED_A2A_HYBRID_PIPELINE=1: HybridEP rounds overlapped
// FUSED_A2A_HYBRID_OVERLAP (bits; session 14): 1 the HybridEP dispatch (and cached dispatch), 2
// the combine, run their sending and receiving blocks at once; 3 both; unset: 3 at G >= 4
// without FUSED_A2A_HYBRID_PIPELINE=1, else 0 (session 15). FUSED_A2A_HYBRID_SEND_BLOCKS: how many
// of `blocks` (>= 2) send (default half; clamped to [1, blocks - 1]).
constexpr int kOverlapDispatch = 1, kOverlapCombine = 2;
int hybrid_overlap_bits(int num_ranks);  // FUSED_A2A_HYBRID_OVERLAP (kOverlap* bits), default by G
int hybrid_send_blocks(int blocks);
bool order_dst_major();   // FUSED_A2A_CUDA_ORDER=dst: destination-major item order
int hybrid_ablate_env();  // FUSED_A2A_HYBRID_ABLATE: 1 / 2 = the data kernel's send / receive
                          // copies off (hybrid_dispatch.cu, diagnostic)
int ablate_env();         // FUSED_A2A_CUDA_ABLATE: diagnostic bits (DispatchParams::ablate)
int recv_unroll_env();    // FUSED_A2A_CUDA_RECV_UNROLL: 8 (default) or 16, see dispatch_kernel
// FUSED_A2A_CUDA_RECV_ROWS: rows of a dispatch receiver item (default 2; 0: the whole chunk)
int recv_rows_env();
// FUSED_A2A_CUDA_RECORDS=1 / 0: the dispatch's metadata records precomputed (dispatch.cu) or not;
// unset: for FP8 rows above 512 tokens when no receiver warps push (FUSED_A2A_CUDA_RECV_PUSH=0).
bool records_env(bool fp8, int64_t num_tokens);
bool meta_vec_env();  // FUSED_A2A_CUDA_META_VEC: the records' index and weight words as vectors
// The dispatch receivers zero the padding rows during their flag waits (default since run 50);
// FUSED_A2A_CUDA_ZERO=first: before their first item.
bool zero_while_waiting_env();
// The static dispatch's senders compute each receiver's placement of their rows from every rank's
// count row (LayoutSlot, G <= kLayoutMaxRanks; default since run 50). FUSED_A2A_CUDA_LAYOUT=ready:
// they wait for each receiver's ready message instead. Every rank must choose alike: a rank
// waiting for a message no peer sends fails with a timeout error.
bool layout_notify_env();
// The cached dispatch as a static dispatch (dispatch_cached): FUSED_A2A_CUDA_CACHED, default
// "static"; "data": through dispatch_data.
bool cached_static_env();
// Whether the static dispatch and the combine kernels run the route scan's second pass themselves
// (scan_pass2.cuh): by default where the scan takes two passes (N > 1024 tokens, layout.cu);
// FUSED_A2A_CUDA_SCAN=fused forces it, =tiles / =block force the two kernels / one block.
bool fused_scan(int64_t num_tokens);
// FUSED_A2A_CUDA_LAYOUT=dynamic: dispatch_notify also publishes every rank's layout, so the
// dispatch_data right after it skips its ready round trip (session 13, opt-in: GPU tests pass,
// no measured gain yet)
bool layout_dynamic_env();
// Direct rows (default since session 19, runs 100-101: the JAX dispatch -16 us at 48 SMs): the
// static dispatch's senders write rows straight into a receiver's recv_x when every rank of the
// group is in this process (DispatchParams::direct_recv). FUSED_A2A_CUDA_DIRECT=0: through the
// receiver's window; =require: direct, and a group spread over processes is an error (the
// tests' proof that the path ran).
constexpr int kDirectOff = 0, kDirectOn = 1, kDirectRequire = 2;
int direct_rows_env();
// Direct rows on the dispatches whose receivers send a ready message too (default since session
// 20; FUSED_A2A_CUDA_DIRECT_READY=0: only the layout notify's) (the cached dispatch, dispatch_data,
// the static one with FUSED_A2A_CUDA_LAYOUT=ready): the message carries recv_x's delta and the
// source's P offset
bool direct_ready_env();
// Whether every rank of the buffer's group is in this process (JAX with several local GPUs), so
// that a peer's own allocations are reachable here through peer access (looked up once)
bool group_in_process(CudaState& st, const Buffer& buffer);
bool claim_items_env();  // FUSED_A2A_CUDA_CLAIM (default 1): senders claim items; 0: dealt
// How the dispatch receivers take their items (dispatch_kernel's kRecvItems); kRecvPush:
// claimed, after some of them pushed rows beside the senders (recv_push_env).
constexpr int kRecvDealt = 0, kRecvClaim = 1, kRecvHelp = 2, kRecvPush = 3;
// Programmatic dependent launch (FUSED_A2A_CUDA_PDL): unset, the combine, and the dispatch from
// 48 blocks (`blocks`: the kernel's grid) unless the FP8 records kernel runs before it
// (after_records); "combine", the combine only; 1 / "all", both; 0, neither. kind: "dispatch"
// or "combine".
bool pdl_env(const char* kind, int blocks, bool after_records = false);
// The dispatch receivers' items (FUSED_A2A_CUDA_RECV_ITEMS=dealt|claim|help): kRecvDealt /
// kRecvClaim / kRecvHelp above; unset, help from 32 blocks on, else dealt.
int recv_items_env(int blocks);
// FUSED_A2A_CUDA_RECV_PUSH=n (session 25; default 4 since session 26; 0: off): n receiver warps
// of each block of the static dispatch (the fused scan's vector kernel, claimed items) first push
// rows with plain stores beside the senders' bulk copies, in one-round ops (run 139's probe: 12
// SMs 328 -> 353 GB/s with 4 + 4 warps), then claim receiver items.
int recv_push_env();
bool combine_claim_env();  // FUSED_A2A_CUDA_COMBINE_CLAIM (default 1): as CLAIM, in the combine
// FUSED_A2A_CUDA_COMBINE_WEIGHTS=bulk (default since session 28) | lanes: the combine's weights
// (the dispatch backward's) as one more piece of the senders' rings where they are 16-byte
// aligned spans, or stored by the lanes with a system fence before each chunk's flag (before)
bool combine_weights_bulk_env();
// FUSED_A2A_CUDA_REDUCE=few (default) | batch: on 2 ranks the combine's rows reduced with 8
// vectors a source a lane in one step (combine.cu, reduce_row_once), or 4 as on more ranks
// (before session 26)
bool reduce_few_env();
// FUSED_A2A_CUDA_REDUCE_PREFETCH=0 (default) | 1: the combine's reducers prefetch their next
// token's rows to L2 (cp.async.bulk.prefetch) before reducing the current one (session 28: lost
// at 12 SMs, level elsewhere)
bool reduce_prefetch_env();
void check_launch(const char* what);
void check_aligned(const void* p, const char* name);
// p is host memory that kernels may write through the same pointer (pinned, mapped by UVA).
bool device_writable_host(const void* p);
// Whether the stream is capturing a CUDA graph (scratch cannot be allocated then, nor the host
// wait for the dynamic dispatch's counts be satisfied).
bool capturing(cudaStream_t stream);

// Extra entry points for the bindings (not part of ops.h): the text of a pending timeout on this
// buffer ("" if none), and the device's SM count.
std::string pending_error(Buffer& buffer);
int device_sm_count(int device);

}  // namespace fa2a::cuda
