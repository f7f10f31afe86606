// CUDA transport: this rank's region is cudaMalloc'd (zero-filled) on its device. Peers in this
// process use the pointer directly (peer access enabled between the two devices); peers in other
// processes open a CUDA IPC handle. The info string is plain text (hex), safe for any all-gather.
#include <cuda_runtime.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"

namespace fa2a {
namespace {

#define FA2A_TRANSPORT_CHECK(expr, what)                                       \
  do {                                                                         \
    cudaError_t err_ = (expr);                                                 \
    if (err_ != cudaSuccess) {                                                 \
      (void)cudaGetLastError();                                                \
      FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA transport: ", what, ": ", \
                cudaGetErrorString(err_));                                     \
    }                                                                          \
  } while (0)

// Identifies this process among the processes of one host (pids can repeat across containers).
uint64_t process_nonce() {
  static const uint64_t nonce = [] {
    std::random_device rd;
    uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    v ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    v ^= static_cast<uint64_t>(getpid()) << 17;
    return v;
  }();
  return nonce;
}

std::string to_hex(const void* data, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out(2 * n, '0');
  const auto* b = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[b[i] >> 4];
    out[2 * i + 1] = digits[b[i] & 15];
  }
  return out;
}

void from_hex(const std::string& text, void* data, size_t n) {
  FA2A_CHECK_RUNTIME(text.size() == 2 * n, "fused_a2a CUDA transport: malformed peer info");
  auto* b = static_cast<unsigned char*>(data);
  auto val = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a CUDA transport: malformed peer info");
  };
  for (size_t i = 0; i < n; ++i)
    b[i] = static_cast<unsigned char>(val(text[2 * i]) * 16 + val(text[2 * i + 1]));
}

class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    FA2A_TRANSPORT_CHECK(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

class CudaTransport : public Transport {
 public:
  CudaTransport(int64_t group_id, int rank, int device)
      : group_id_(group_id), rank_(rank), device_(device) {}
  ~CudaTransport() override { release(); }

  void* allocate(size_t bytes) override {
    DeviceScope scope(device_);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      (void)cudaGetLastError();
      FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a: cannot allocate the ", bytes,
                "-byte communication buffer on GPU ", device_, " (", free_b,
                " bytes free): ", cudaGetErrorString(err),
                ". With JAX, leave room with XLA_PYTHON_CLIENT_MEM_FRACTION or "
                "XLA_PYTHON_CLIENT_PREALLOCATE=false.");
    }
    own_ = p;
    FA2A_TRANSPORT_CHECK(cudaMemset(p, 0, bytes), "cudaMemset");
    FA2A_TRANSPORT_CHECK(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return p;
  }

  std::string export_info() override {
    DeviceScope scope(device_);
    cudaIpcMemHandle_t handle;
    std::memset(&handle, 0, sizeof(handle));
    if (cudaIpcGetMemHandle(&handle, own_) != cudaSuccess) {
      (void)cudaGetLastError();  // IPC unavailable: same-process peers still work
    }
    const uint64_t nonce = process_nonce();
    const uint64_t ptr = reinterpret_cast<uintptr_t>(own_);
    // No iostreams here: std::to_string and concatenation only.
    return "cuda1:" + to_hex(&nonce, sizeof(nonce)) + ":" + std::to_string(device_) + ":" +
           to_hex(&ptr, sizeof(ptr)) + ":" + to_hex(&handle, sizeof(handle));
  }

  void* import_peer(const std::string& info) override {
    std::vector<std::string> parts;
    for (size_t start = 0;;) {
      const size_t colon = info.find(':', start);
      parts.push_back(info.substr(start, colon == std::string::npos ? colon : colon - start));
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
    FA2A_CHECK_RUNTIME(parts.size() == 5 && parts[0] == "cuda1",
                       "fused_a2a CUDA transport: a peer's info is not from the CUDA transport "
                       "(do all ranks use GPU buffers?)");
    uint64_t nonce = 0, ptr = 0;
    from_hex(parts[1], &nonce, sizeof(nonce));
    const int peer_device = std::stoi(parts[2]);
    from_hex(parts[3], &ptr, sizeof(ptr));
    DeviceScope scope(device_);
    if (nonce == process_nonce()) {
      if (peer_device != device_) {
        int can = 0;
        FA2A_TRANSPORT_CHECK(cudaDeviceCanAccessPeer(&can, device_, peer_device),
                             "cudaDeviceCanAccessPeer");
        FA2A_CHECK_RUNTIME(can, "fused_a2a: GPU ", device_, " cannot access GPU ", peer_device,
                           " directly (no NVLink/PCIe peer access)");
        cudaError_t err = cudaDeviceEnablePeerAccess(peer_device, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          (void)cudaGetLastError();  // XLA enables it itself
        } else {
          FA2A_TRANSPORT_CHECK(err, "cudaDeviceEnablePeerAccess");
        }
      }
      return reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
    }
    cudaIpcMemHandle_t handle;
    from_hex(parts[4], &handle, sizeof(handle));
    void* p = nullptr;
    FA2A_TRANSPORT_CHECK(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess),
                         "cudaIpcOpenMemHandle (peer in another process)");
    opened_.push_back(p);
    return p;
  }

  void seal() override {}

  void release() override {
    if (!own_ && opened_.empty()) return;
    int previous = -1;
    (void)cudaGetDevice(&previous);
    if (cudaSetDevice(device_) == cudaSuccess) {
      // Peers may still be writing into our region if an op failed; let the device settle.
      (void)cudaDeviceSynchronize();
      for (void* p : opened_) (void)cudaIpcCloseMemHandle(p);
      if (own_) (void)cudaFree(own_);
    }
    (void)cudaGetLastError();
    if (previous >= 0) (void)cudaSetDevice(previous);
    opened_.clear();
    own_ = nullptr;
  }

 private:
  int64_t group_id_;
  int rank_;
  int device_;
  void* own_ = nullptr;
  std::vector<void*> opened_;
};

}  // namespace

std::unique_ptr<Transport> make_cuda_transport(int64_t group_id, int rank, int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    FA2A_FAIL(ErrorKind::kRuntime, "fused_a2a: no CUDA device is usable (driver missing?)");
  }
  FA2A_CHECK(device >= 0 && device < count, "CUDA device ", device, " does not exist (", count,
             " visible)");
  return std::make_unique<CudaTransport>(group_id, rank, device);
}

}  // namespace fa2a
