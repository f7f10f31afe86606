// Per-buffer CUDA state, launch configuration and error reporting of the CUDA backend.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "state.h"

namespace fa2a::cuda {

DeviceGuard::DeviceGuard(int device) : device_(device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  if (previous_ != device_) FA2A_CUDA_CHECK(cudaSetDevice(device_), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
}

CudaState::~CudaState() {
  int previous = -1;
  (void)cudaGetDevice(&previous);
  (void)cudaSetDevice(device);
  if (host_error) (void)cudaFreeHost(host_error);
  if (hybrid_meta_host) (void)cudaFreeHost(hybrid_meta_host);
  if (trace) (void)cudaFreeHost(trace);
  if (peer_table) (void)cudaFree(peer_table);
  if (scratch_mem) (void)cudaFree(scratch_mem);
  if (records) (void)cudaFree(records);
  for (void* p : retired) (void)cudaFree(p);
  (void)cudaGetLastError();
  if (previous >= 0) (void)cudaSetDevice(previous);
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  FA2A_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  return capture != cudaStreamCaptureStatusNone;
}

namespace {
std::mutex g_state_mutex;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end && *end == '\0') ? static_cast<int>(x) : fallback;
}

const char* op_name(int op) {
  switch (op) {
    case kOpDispatch:
      return "dispatch";
    case kOpNotify:
      return "dispatch_notify";
    case kOpDispatchData:
      return "dispatch_data";
    case kOpCombine:
      return "combine";
    case kOpHybridNotify:
      return "hybrid dispatch (count exchange)";
    case kOpHybridDispatch:
      return "hybrid dispatch";
    case kOpHybridCombine:
      return "hybrid combine";
    default:
      return "unknown op";
  }
}

const char* phase_name(int phase) {
  switch (phase) {
    case kPhaseNotify:
      return "count exchange (waiting for the peers' token counts)";
    case kPhaseReady:
      return "start (waiting for the peers to enter the op)";
    case kPhaseData:
      return "data (waiting for the peers' rows)";
    case kPhaseRound:
      return "round (waiting for the peers to drain their buffer)";
    default:
      return "unknown phase";
  }
}

std::string error_text(const HostError* e) {
  if (!e || e->code == 0) return "";
  std::string ranks;
  unsigned long long m = e->missing;
  for (int i = 0; i < 64; ++i) {
    if (m & (1ull << i)) ranks += (ranks.empty() ? "" : ", ") + std::to_string(i);
  }
  char secs[32];
  std::snprintf(secs, sizeof(secs), "%g", static_cast<double>(e->seconds));
  // No iostreams on this path (see benchmarks/NOTES.md, "libstdc++ in GPU builds").
  return std::string("fused_a2a: ") + op_name(e->op) + " timed out after " + secs + " s on rank " +
         std::to_string(e->rank) + ", phase " + phase_name(e->phase) + "; rank(s) [" + ranks +
         "] did not arrive. This buffer is unusable now: release it and create a new one "
         "(FUSED_A2A_TIMEOUT_S sets the bound).";
}
}  // namespace

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

CudaState& cuda_state(Buffer& buffer) {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  auto& slot = buffer.backend_state();
  if (slot) return *static_cast<CudaState*>(slot.get());
  FA2A_CHECK_RUNTIME(buffer.connected(), "fused_a2a CUDA: buffer of group ", buffer.group_id(),
                     " rank ", buffer.rank(), " is not connected");
  auto st = std::make_shared<CudaState>();
  st->device = buffer.device();
  st->num_ranks = buffer.num_ranks();
  int v = 0;
  FA2A_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, st->device),
                  "SM count");
  st->sm_count = v;
  FA2A_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, st->device),
                  "shared memory limit");
  st->smem_optin = static_cast<size_t>(v);
  void* host = nullptr;
  FA2A_CUDA_CHECK(
      cudaHostAlloc(&host, sizeof(HostError), cudaHostAllocMapped | cudaHostAllocPortable),
      "cudaHostAlloc (error word)");
  std::memset(host, 0, sizeof(HostError));
  st->host_error = static_cast<HostError*>(host);
  if (env_int("FUSED_A2A_CUDA_TRACE", 0) != 0) {
    void* trace = nullptr;
    FA2A_CUDA_CHECK(cudaHostAlloc(&trace, sizeof(unsigned long long) * kTraceWords,
                                  cudaHostAllocMapped | cudaHostAllocPortable),
                    "cudaHostAlloc (trace)");
    std::memset(trace, 0, sizeof(unsigned long long) * kTraceWords);
    st->trace = static_cast<unsigned long long*>(trace);
  }
  const int g = buffer.num_ranks();
  std::vector<void*> bases(g);
  for (int r = 0; r < g; ++r) bases[r] = buffer.base(r);
  FA2A_CUDA_CHECK(cudaMalloc(&st->peer_table, sizeof(void*) * g), "cudaMalloc (peer table)");
  FA2A_CUDA_CHECK(
      cudaMemcpy(st->peer_table, bases.data(), sizeof(void*) * g, cudaMemcpyHostToDevice),
      "peer table upload");
  buffer.set_device_peer_table(st->peer_table);
  slot = st;
  return *st;
}

void check_no_error(CudaState& st, Buffer& buffer) {
  if (st.host_error->code != 0) {
    const std::string text = error_text(st.host_error);
    if (buffer.poisoned().empty()) buffer.poison(text);
    FA2A_FAIL(ErrorKind::kTimeout, text);
  }
  FA2A_CHECK_RUNTIME(buffer.poisoned().empty(),
                     "fused_a2a: the buffer is unusable after an earlier failure (",
                     buffer.poisoned(), ")");
}

void sync_and_check(CudaState& st, Buffer& buffer, cudaStream_t stream, const char* op) {
  cudaError_t err = cudaStreamSynchronize(stream);
  if (st.host_error->code != 0) {
    (void)cudaGetLastError();
    check_no_error(st, buffer);
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA: ", op, " on rank ", buffer.rank(), ": ",
              cudaGetErrorString(err));
  }
}

}  // namespace fa2a::cuda

namespace fa2a {
std::vector<uint64_t> cuda_dispatch_trace(Buffer& buffer, bool reset) {
  auto& slot = buffer.backend_state();
  if (!slot || buffer.platform() != Platform::kCUDA) return {};
  auto* st = static_cast<cuda::CudaState*>(slot.get());
  if (!st->trace) return {};
  cuda::DeviceGuard guard(buffer.device());
  FA2A_CUDA_CHECK(cudaDeviceSynchronize(), "synchronising before reading the trace");
  std::vector<uint64_t> out(st->trace, st->trace + cuda::kTraceWords);
  if (reset) std::memset(st->trace, 0, sizeof(unsigned long long) * cuda::kTraceWords);
  return out;
}

std::vector<uint64_t> cuda_host_phases(Buffer& buffer, bool reset) {
  auto& slot = buffer.backend_state();
  if (!slot || buffer.platform() != Platform::kCUDA) return {};
  auto* st = static_cast<cuda::CudaState*>(slot.get());
  std::lock_guard<std::mutex> lock(buffer.op_mutex());  // the ops add to the sums under it
  const uint64_t* words = &st->host_phases[0][0];
  std::vector<uint64_t> out(words, words + cuda::kHostOps * cuda::kHostWords);
  if (reset) std::memset(st->host_phases, 0, sizeof(st->host_phases));
  return out;
}
}  // namespace fa2a

namespace fa2a::cuda {
std::string pending_error(Buffer& buffer) {
  auto& slot = buffer.backend_state();
  if (!slot) return "";
  return error_text(static_cast<CudaState*>(slot.get())->host_error);
}

const Scratch& ensure_scratch(CudaState& st, int num_ranks, int64_t num_tokens, int num_experts,
                              cudaStream_t stream) {
  ++st.scratch_gen;
  const int lpr = num_experts / std::max(num_ranks, 1);
  if (num_tokens <= st.cap_tokens && num_experts <= st.cap_experts && st.scratch_mem &&
      lpr <= st.cap_experts)
    return st.scratch;
  FA2A_CHECK_RUNTIME(!capturing(stream), "fused_a2a CUDA: the op needs more scratch memory (",
                     num_tokens, " tokens, ", num_experts,
                     " experts) than earlier calls, which cannot be allocated while a CUDA graph "
                     "is being captured: run the op once with these sizes before capturing");
  const int64_t n = std::max<int64_t>(num_tokens, std::max<int64_t>(st.cap_tokens, 1024));
  const int e = std::max(num_experts, std::max(st.cap_experts, 256));
  const size_t g = static_cast<size_t>(num_ranks);
  auto align = [](size_t b) { return (b + 255) & ~size_t(255); };
  const size_t cum_b = align(g * static_cast<size_t>(n + 1) * 4);
  const size_t list_b = align(g * static_cast<size_t>(n) * 4);
  const size_t ecount_b = align(static_cast<size_t>(e) * 4);
  const size_t hist_b = align(static_cast<size_t>(e) * 4);
  const size_t ordinal_b = align(static_cast<size_t>(n) * static_cast<size_t>(e) * 4);
  const size_t fanout_b = align(4);
  const size_t masks_b = align(static_cast<size_t>(n) * 8);
  const size_t tile_count_b = align(static_cast<size_t>(kMaxScanTiles) * kMaxRanks * 4);
  const size_t tile_ecount_b = align(static_cast<size_t>(kMaxScanTiles) * e * 4);
  const size_t tile_flag_b = align(static_cast<size_t>(kMaxScanTiles) * 8);
  const size_t stage_b = align(static_cast<size_t>(3 + e) * 4);
  const size_t sizes[] = {cum_b,   list_b,       ecount_b,      hist_b,      ordinal_b, fanout_b,
                          masks_b, tile_count_b, tile_ecount_b, tile_flag_b, stage_b};
  size_t total = 0;
  for (size_t b : sizes) total += b;
  void* mem = nullptr;
  FA2A_CUDA_CHECK(cudaMalloc(&mem, total), "cudaMalloc (routing scratch)");
  FA2A_CUDA_CHECK(cudaMemset(mem, 0, total), "cudaMemset (routing scratch)");
  if (st.scratch_mem) st.retired.push_back(st.scratch_mem);
  st.scratch_mem = mem;
  st.scratch_bytes = total;
  st.cap_tokens = n;
  st.cap_experts = e;
  uint8_t* next = static_cast<uint8_t*>(mem);
  auto take = [&](size_t bytes) {  // consecutive regions in the order of sizes[]
    uint8_t* at = next;
    next += bytes;
    return at;
  };
  st.scratch.cum = reinterpret_cast<int*>(take(cum_b));
  st.scratch.send_list = reinterpret_cast<int*>(take(list_b));
  st.scratch.ecount = reinterpret_cast<int*>(take(ecount_b));
  st.scratch.hist = reinterpret_cast<int*>(take(hist_b));
  st.scratch.ordinal = reinterpret_cast<int*>(take(ordinal_b));
  st.scratch.fanout = reinterpret_cast<int*>(take(fanout_b));
  st.scratch.masks = reinterpret_cast<unsigned long long*>(take(masks_b));
  st.scratch.tile_count = reinterpret_cast<int*>(take(tile_count_b));
  st.scratch.tile_ecount = reinterpret_cast<int*>(take(tile_ecount_b));
  st.scratch.tile_flag = reinterpret_cast<unsigned long long*>(take(tile_flag_b));
  st.scratch.counts_stage = reinterpret_cast<int*>(take(stage_b));
  return st.scratch;
}

uint32_t* ensure_records(CudaState& st, size_t words, cudaStream_t stream) {
  if (words <= st.records_words && st.records) return st.records;
  FA2A_CHECK_RUNTIME(!capturing(stream), "fused_a2a CUDA: the dispatch needs more record memory (",
                     words,
                     " words) than earlier calls, which cannot be allocated while a CUDA "
                     "graph is being captured: run the op once with these sizes before capturing");
  const size_t want = std::max(words, st.records_words * 2);
  void* mem = nullptr;
  FA2A_CUDA_CHECK(cudaMalloc(&mem, want * 4), "cudaMalloc (dispatch records)");
  if (st.records) st.retired.push_back(st.records);
  st.records = static_cast<uint32_t*>(mem);
  st.records_words = want;
  return st.records;
}

int comm_blocks(const CudaState& st, int num_sms) {
  const int sms = env_int("FUSED_A2A_CUDA_BLOCKS", num_sms > 0 ? num_sms : 24);
  return std::max(1, std::min(sms, st.sm_count > 0 ? st.sm_count : sms));
}

int send_warps_env() {
  return std::max(1, std::min(kMaxThreads / 32 - 1, env_int("FUSED_A2A_CUDA_SEND_WARPS", 4)));
}

LaunchConfig launch_config(const CudaState& st, int num_sms, size_t row_bytes, size_t fixed_smem,
                           size_t per_send_warp, size_t per_recv_warp, int send_warps) {
  LaunchConfig c;
  c.blocks = comm_blocks(st, num_sms);
  c.send_warps = send_warps > 0 ? std::min(kMaxThreads / 32 - 1, send_warps) : send_warps_env();
  const int recv_default = send_warps > 0 ? kMaxThreads / 32 - c.send_warps : 12;
  c.recv_warps = std::max(1, env_int("FUSED_A2A_CUDA_RECV_WARPS", recv_default));
  c.recv_warps = std::min(c.recv_warps, kMaxThreads / 32 - c.send_warps);
  c.tma = !env_is("FUSED_A2A_CUDA_COPY", "simt");
  c.flag_fence_sc = !env_is("FUSED_A2A_CUDA_FLAG_FENCE", "release");
  c.loads_ahead = env_int("FUSED_A2A_CUDA_LOADS_AHEAD", 0);
  c.lean_chunk_end = env_is("FUSED_A2A_CUDA_CHUNK_END", "lean");
  c.wait_acquire_first = !env_is("FUSED_A2A_CUDA_WAIT", "relaxed");
  const size_t extra = fixed_smem + 128 * 4 + per_send_warp * c.send_warps +
                       per_recv_warp * c.recv_warps + 128 * c.send_warps;
  const size_t reserve = 8192;  // static shared memory of the kernels, and slack
  const size_t budget = st.smem_optin > extra + reserve ? st.smem_optin - extra - reserve : 0;
  size_t stage = static_cast<size_t>(env_int("FUSED_A2A_CUDA_STAGE_KB", 0)) * 1024;
  if (stage == 0) stage = std::min<size_t>((row_bytes + 15) & ~size_t(15), 16384);
  stage = std::max<size_t>(16, stage & ~size_t(15));
  const size_t per_stage = tma_pipe_bytes(stage, 1);
  int stages = static_cast<int>(budget / (per_stage * c.send_warps));
  stages = std::min(stages, env_int("FUSED_A2A_CUDA_STAGES", kMaxStages));
  if (c.tma && stages < 3) {
    // Smaller stages so that every sender warp gets three.
    const size_t fit = budget / (3 * c.send_warps);
    stage = fit > 36 ? (fit - 20) & ~size_t(15) : 0;
    stages = 3;
    if (stage < 256) c.tma = false;
  }
  c.stages = std::max(3, std::min(stages, kMaxStages));
  c.stage_bytes = static_cast<uint32_t>(stage);
  return c;
}

unsigned long long timeout_ns() {
  double s = timeout_seconds();
  if (!(s > 0)) s = 100.0;
  return static_cast<unsigned long long>(s * 1e9);
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA: launching ", what, ": ",
              cudaGetErrorString(err));
}

void check_aligned(const void* p, const char* name) {
  FA2A_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, name,
             " must be 16-byte aligned for the CUDA backend, got address ", p);
}

bool device_writable_host(const void* p) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess && attr.type == cudaMemoryTypeHost && attr.devicePointer == p;
}

int chunk_rows_env(int unset) {  // the dispatch's and the combine's largest chunk
  const int v = env_int("FUSED_A2A_CUDA_CHUNK_ROWS", 0);
  // Run 3 (EP 2) chose 32 over 8 while every sender warp walked every item of a round; with the
  // per-warp item deal (rect_item) run 22 (4x H200, EP 4) measured 8 rows 656 us, 16 686, 32 776:
  // a receiver copies a chunk after its flag, and a shorter last chunk shortens that tail.
  return v > 0 ? v : unset;
}

// Runs 125-126 (4x H200, standard case, static dispatch at 8 / 16 / 32 / 64 rows): 12 SMs
// 663 / 572 / 560 / 612 us, 16 SMs 568 / 538 / 541, 24 SMs 528 / 532 / 552, 48 SMs 515 / 520
// (16). With few sender warps each pushes many chunks, and a chunk's metadata (about three load
// latencies: its list, two batches of words) is not hidden by its pushes: 26% of a 12-SM sender
// warp's loop in run 124's traces, 12% at 48 SMs. The combine keeps chunk_rows_env() (12 SMs:
// 600 us at 8 rows, 624 at 16, 653 at 32).
// FP8 rows (7 KB at H = 7168, half of bf16's for the same per-chunk and per-row work), session 27
// (2x H200, EP 2, runs 151-152, 8 / 16 / 32 rows): 16 SMs 272 / 233 / 205 us, 24 SMs 196 / 176 /
// 182, 32 SMs 165 / 156-161 / 165, 48 SMs 139-163 / 144-166 / 165: twice the rows below 48 SMs.
int dispatch_chunk_rows(int blocks, bool fp8) {
  if (fp8) return chunk_rows_env(blocks < 24 ? 32 : blocks < 48 ? 16 : 8);
  return chunk_rows_env(blocks <= 12 ? 32 : blocks < 24 ? 16 : 8);
}

// Session 27 (2x H200, EP 2, standard, runs 151-152; SEND_WARPS / RECV_WARPS for both ops): the
// combine at 12 SMs 318 us with 4 sender warps, 308 with 3, 362 with 2; 24 SMs 239 / 231 / 239;
// 48 SMs 226 / 218 / 212. One peer to send to, and the reducers bound it: more of them. With the
// weights through the rings (session 28, run 158) the dispatch backward's combine too: 12 SMs
// 330 us with 3 against 342 with 4 (the lanes: 344), 24 SMs 240 against 256 (246). EP 4's
// combine sends to 3 peers (runs 156-157): 24 SMs 558 us with 3 against 534 with 4; 48 SMs
// 516.6 / 515.1 with 3 against 523.3 / 524.3, with weights 519 against 528.
int combine_send_warps(int num_ranks, int blocks) {
  const int v = env_int("FUSED_A2A_CUDA_COMBINE_SEND_WARPS", 0);
  if (v > 0) return v;
  if (env_int("FUSED_A2A_CUDA_SEND_WARPS", 0) > 0) return 0;
  if (num_ranks == 2) return blocks >= 48 ? 2 : 3;
  return blocks >= 48 ? 3 : 0;
}

// Chunk rows are about (rows to a receiver) / (chunks_per_warp x its sender warps), at least 1,
// at most dispatch_chunk_rows(). Sessions 4-12: 2 chunks a warp, so that a receiver copies a first
// chunk while the second is sent; at N = 128 a sender warp then ended ~2 chunks of 2 rows, each
// end waiting for its writes to complete on the peer (run 39 trace: chunk end 18.8K + final drain
// 13.9K of 47.6K cycles). One chunk a warp (run 65, 4x H100, CUDA graphs): decode dispatch 78.6
// -> 67.5 us, combine 69.7 -> 59.3 (again in the same call: 73.2 -> 69.6, 67.4 -> 63.7, and the
// traced build 77.4 -> 67.0); EP 2 55.1 -> 49.6, 48.5 -> 44.0; N = 1024 and 4096 unchanged (their
// chunks are 8 rows either way: only rows to a receiver < 16 x its sender warps are affected).
int chunks_per_warp_env() { return std::max(1, env_int("FUSED_A2A_CUDA_CHUNKS_PER_WARP", 1)); }

bool hybrid_pipeline_env() { return env_int("FUSED_A2A_HYBRID_PIPELINE", 0) != 0; }

// Default: both overlapped at G >= 4 (runs 76-77, 4x H200, N = 4096: data kernel 941 / 935 us
// against 980 / 977 plain, combine 2171 / 2165 against 2381 / 2344), plain below (run 74, G = 2:
// 887 against 710, combine 2096 against 1816: the permute and the reduction, not the sends, bound
// there, and half the blocks do them) and with FUSED_A2A_HYBRID_PIPELINE=1.
int hybrid_overlap_bits(int num_ranks) {
  const int fallback =
      num_ranks >= 4 && !hybrid_pipeline_env() ? kOverlapDispatch | kOverlapCombine : 0;
  return env_int("FUSED_A2A_HYBRID_OVERLAP", fallback);
}

int hybrid_send_blocks(int blocks) {
  return std::clamp(env_int("FUSED_A2A_HYBRID_SEND_BLOCKS", blocks / 2), 1, blocks - 1);
}

int hybrid_ablate_env() { return env_int("FUSED_A2A_HYBRID_ABLATE", 0); }

int ablate_env() { return env_int("FUSED_A2A_CUDA_ABLATE", 0); }

int recv_unroll_env() { return env_int("FUSED_A2A_CUDA_RECV_UNROLL", 8) == 16 ? 16 : 8; }

// Session 10: 2-row slices took the standard static dispatch from 587.7 to 582.0 us (4x H100)
// and from 566.6 to 562.0 us (4x H200, two runs); 1-row slices lost (712.8 us: items and flag
// waits per row).
int recv_rows_env() { return env_int("FUSED_A2A_CUDA_RECV_ROWS", 2); }

// Session 10 (4x H200, EP 4): the records kernel took the FP8 standard dispatch from 425.5 to
// 390 us (the senders' metadata phase fell from ~270K to ~85-155K cycles a warp), but the bf16
// one from 566.6 to 577 us (its senders are bound by the link, so the kernel's own time adds) and
// decode (CUDA graphs) from 63-70 to 74-76 us. Default: FP8 rows above kSelfRecvMaxTokens-like
// sizes only. Session 26 (runs 140, 144, 48 SMs): FP8 with records 322.5 / 323.7 us, without
// 323.3, without and with 4 pushing receiver warps (which need the fused scan, so no records)
// 290.2 / 289.9: so no records where the receivers push (recv_push_env, default 4).
bool records_env(bool fp8, int64_t num_tokens) {
  const int v = env_int("FUSED_A2A_CUDA_RECORDS", -1);
  if (v >= 0) return v != 0;
  return fp8 && num_tokens > 512 && recv_push_env() == 0;
}

// The senders' records load their index and weight words as 16-byte vectors (dispatch_common.cuh,
// head_quads; session 23). Run 129 (4x H200, static dispatch, words -> vectors): 12 SMs 555.7 /
// 557.6 -> 533.9 us, 24 SMs 527.5 -> 522.4, 48 SMs 516.3 -> 515.1, FP8 at 48 SMs 328.1 ->
// 321.3; on by default since (FUSED_A2A_CUDA_META_VEC=0: word by word).
bool meta_vec_env() { return env_int("FUSED_A2A_CUDA_META_VEC", 1) != 0; }

// Run 50 (4x H100, two A/Bs in one call): the worst-capacity static dispatch 581.5 / 583.0 us
// with the padding zeroed first, 575.5 / 576.4 while waiting; no change without padding.
bool zero_while_waiting_env() { return !env_is("FUSED_A2A_CUDA_ZERO", "first"); }

// Run 50 (4x H100, two A/Bs): static dispatch -0.4 / -1.8 us, FP8 -2.2 / -2.9, EP 2 -0.5.
bool layout_notify_env() { return !env_is("FUSED_A2A_CUDA_LAYOUT", "ready"); }

bool cached_static_env() { return !env_is("FUSED_A2A_CUDA_CACHED", "data"); }

bool layout_dynamic_env() { return env_is("FUSED_A2A_CUDA_LAYOUT", "dynamic"); }

int direct_rows_env() {
  if (env_is("FUSED_A2A_CUDA_DIRECT", "require")) return kDirectRequire;
  return env_is("FUSED_A2A_CUDA_DIRECT", "0") ? kDirectOff : kDirectOn;
}

// Run 104 (4x H200, JAX, 48 SMs): combine_bwd 542.3 -> 525.8 us, the other ops within 0.4 us.
bool direct_ready_env() { return !env_is("FUSED_A2A_CUDA_DIRECT_READY", "0"); }

bool group_in_process(CudaState& st, const Buffer& buffer) {
  if (st.group_local < 0) {  // the group's buffers all exist before the first op (connect)
    bool all = true;
    for (int r = 0; r < buffer.num_ranks() && all; ++r)
      all = buffer_find(buffer.group_id(), r) != nullptr;
    st.group_local = all ? 1 : 0;
  }
  return st.group_local == 1;
}

bool claim_items_env() { return env_int("FUSED_A2A_CUDA_CLAIM", 1) != 0; }  // run 32: -14%

// The dispatch / combine kernel is launched while the route scan before it runs. Runs 56-57
// (4x H100, EP 4 / EP 2, 24 SMs): the combine 558.7 -> 543.7 and 552.8 -> 544.2 us, 299.1 ->
// 288.2 and 300.7 -> 288.8; the static dispatch 560.4 -> 565.2 and 560.7 -> 565.2 (it lost), so
// the combine only by default. From 48 blocks (where the receivers are helped) the dispatch
// gained: 543.4 -> 539.0 (run 57), 545.1 -> 540.3 (run 63), 540.5 -> 535.8 us (run 64, 4x H200;
// EP 2 238.7 -> 235.1 and 231.0 -> 229.4), one loss (run 59: 543.7 -> 575.2); 32 blocks: 541.4
// -> 539.7 (run 64), so the dispatch from kPdlDispatchMinBlocks on. Not after the FP8 records
// kernel (which, unlike the route scans, lets no dependent start early): the only FP8 figure with
// PDL, torch's dynamic FP8 dispatch at 48 SMs, was 442 us in run 64's whole bench (4x H200)
// against 355 without (run 59, 4x H100), while bf16 gained.
bool pdl_env(const char* kind, int blocks, bool after_records) {
  constexpr int kPdlDispatchMinBlocks = 48;
  const bool combine = std::strcmp(kind, "combine") == 0;
  const char* v = std::getenv("FUSED_A2A_CUDA_PDL");
  if (!v) return combine || (blocks >= kPdlDispatchMinBlocks && !after_records);
  if (std::strcmp(v, "combine") == 0) return combine;
  return std::strcmp(v, "1") == 0 || std::strcmp(v, "all") == 0;
}

// Runs 56-57 (4x H100, EP 4): with help, the static dispatch at 32 / 40 / 48 SMs took 543.7 /
// 543.3 / 544.5 and 543.4 us, against 578-602 dealt; at 24 SMs, where the senders finish last,
// 561.5 against 560.4 (EP 2: 274.4 / 274.3).
int recv_items_env(int blocks) {
  constexpr int kHelpMinBlocks = 32;
  if (env_is("FUSED_A2A_CUDA_RECV_ITEMS", "help")) return kRecvHelp;
  if (env_is("FUSED_A2A_CUDA_RECV_ITEMS", "claim")) return kRecvClaim;
  if (env_is("FUSED_A2A_CUDA_RECV_ITEMS", "dealt")) return kRecvDealt;
  return blocks >= kHelpMinBlocks ? kRecvHelp : kRecvDealt;
}

// Session 26 (4x H200, EP 4, standard, runs 140-145): static dispatch with 4 pushing warps 533 ->
// 525 us at 12 SMs, 522 -> 507 at 24, 513 -> 502 at 48, FP8 at 48 SMs 323 -> 290; 8 lose.
int recv_push_env() { return std::max(0, env_int("FUSED_A2A_CUDA_RECV_PUSH", 4)); }

// Session 8 (4x H100, EP 4, standard): combine 597 us dealt, 537 claimed, NCCL 561.
bool combine_claim_env() { return env_int("FUSED_A2A_CUDA_COMBINE_CLAIM", 1) != 0; }

// Session 27 (2x H200, EP 2, standard, runs 148-149): the dispatch backward's combine at 24 SMs
// 252.3-253.3 us through the rings against 245.2-246.1 by the lanes; level at 12 and 48 SMs.
// Session 28 (4x H200, EP 4, runs 156-157): 24 SMs 536.5 / 534.3 us through the rings against
// 577.3 / 578.3 by the lanes (three peers' chunks each carry their weights' stores and fence),
// level at 48; EP 2 (run 157, with session 27's sender warps) 239.5 against 244.9: the rings.
bool combine_weights_bulk_env() { return !env_is("FUSED_A2A_CUDA_COMBINE_WEIGHTS", "lanes"); }
bool reduce_few_env() { return !env_is("FUSED_A2A_CUDA_REDUCE", "batch"); }
// Session 28 (runs 156-157): the prefetch at 12 SMs lost on every rank count (EP 4 634 / 634
// against 579 / 578 us without, EP 2 334.8 against 311.9: the few reducers' prefetched rows
// evict the ones they are reducing), and was level elsewhere (EP 4 24 SMs 534.6 / 532.3,
// 48 SMs 523.3 / 525.3; EP 2 24 SMs 231.5 / 234.1, then 232.3 / 232.0): off by default.
bool reduce_prefetch_env() { return env_int("FUSED_A2A_CUDA_REDUCE_PREFETCH", 0) != 0; }

bool order_dst_major() { return env_is("FUSED_A2A_CUDA_ORDER", "dst"); }

int device_sm_count(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

namespace {

// One spin's pause: the PAUSE instruction (x86) / YIELD (Arm) leaves the core's issue slots to
// its sibling hardware thread, which may be a peer rank's host path (session 22, run 120: the
// rank behind ran its whole host path ~2x slower while the rank ahead spun).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

enum class HostWait { kSpin, kPause, kSleep };

// FUSED_A2A_HOST_WAIT: "spin" (the default: a busy loop), "pause" (a PAUSE every spin), "sleep"
// (PAUSE for the first kSleepAfter, then 10-us sleeps between checks).
HostWait host_wait_env() {
  const char* v = std::getenv("FUSED_A2A_HOST_WAIT");
  if (!v || !*v || std::strcmp(v, "spin") == 0) return HostWait::kSpin;
  if (std::strcmp(v, "pause") == 0) return HostWait::kPause;
  if (std::strcmp(v, "sleep") == 0) return HostWait::kSleep;
  FA2A_FAIL(ErrorKind::kValue, "FUSED_A2A_HOST_WAIT must be spin, pause or sleep, got '", v, "'");
}

}  // namespace

void check_host_wait_env() { (void)host_wait_env(); }

void wait_host_ticket(CudaState& st, Buffer& buffer, const volatile int32_t* word, int32_t ticket,
                      const cudaStream_t* stream, const char* op) {
  const HostWait mode = host_wait_env();
  constexpr auto kSleepAfter = std::chrono::microseconds(20);
  const auto start = std::chrono::steady_clock::now();
  const auto limit = std::chrono::nanoseconds(2 * timeout_ns()) + std::chrono::seconds(5);
  bool sleeping = false;
  for (unsigned spins = 0;; ++spins) {
    if (*word == ticket) {
      std::atomic_thread_fence(std::memory_order_acquire);
      return;
    }
    if (st.host_error->code != 0) check_no_error(st, buffer);
    if (sleeping) {
      std::this_thread::sleep_for(std::chrono::microseconds(10));
    } else if (mode != HostWait::kSpin) {
      cpu_relax();
    }
    // every 1024 spins (every spin once sleeping): the stream, the deadline, a yield
    if (!sleeping && (spins & 1023u) != 1023u) continue;
    if (stream) {
      const cudaError_t err = cudaStreamQuery(*stream);
      if (err != cudaSuccess && err != cudaErrorNotReady) {
        (void)cudaGetLastError();
        FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA: ", op, " on rank ", buffer.rank(), ": ",
                  cudaGetErrorString(err));
      }
      if (err == cudaSuccess && *word != ticket) {  // the stream is idle: no write will come
        check_no_error(st, buffer);
        FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA: ", op, " on rank ", buffer.rank(),
                  ": the kernel ended without writing its host counts");
      }
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > limit)
      FA2A_FAIL(ErrorKind::kTimeout, "fused_a2a CUDA: ", op, " on rank ", buffer.rank(),
                ": the count exchange did not finish within ",
                std::chrono::duration<double>(limit).count(), " s");
    if (mode == HostWait::kSleep && waited > kSleepAfter) {
      sleeping = true;
    } else if (!sleeping) {
      std::this_thread::yield();
    }
  }
}

}  // namespace fa2a::cuda
