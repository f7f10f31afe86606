// Output-arena part of the pybind11 module `fused_a2a_core`: blocks of a buffer's output arena
// (fused_a2a/arena.h) handed to torch as DLPack capsules, so torch's recv_x can live where every
// peer writes rows straight into it. A block returns to the arena when torch frees the tensor's
// storage: the capsule's deleter runs in C++, with no Python and no CUDA call (torch_fused_a2a/
// _arena.py's Python blocks took 52-60 us of host time an allocation in the rank processes).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "bindings.h"
#include "core/backends.h"
#include "fused_a2a/arena.h"
#include "fused_a2a/errors.h"

namespace py = pybind11;

namespace fa2a::bindings {
namespace {

// The DLPack ABI of unversioned "dltensor" capsules, declared from the DLPack specification
// (torch.from_dlpack reads these; the structs' layout is the contract, not their names).
struct DlDevice {
  int32_t device_type;  // 1: CPU, 2: CUDA
  int32_t device_id;
};
struct DlDataType {
  uint8_t code;  // 0: int, 1: uint, 2: float, 4: bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct DlTensor {
  void* data;
  DlDevice device;
  int32_t ndim;
  DlDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements
  uint64_t byte_offset;
};
struct DlManagedTensor {
  DlTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DlManagedTensor* self);
};
constexpr int32_t kDlCpu = 1, kDlCuda = 2;

// What a capsule's tensor keeps: the arena (and through it the buffer's memory) and its block.
struct ArenaBlock {
  std::shared_ptr<OutputArena> arena;
  int64_t offset;
  std::vector<int64_t> shape, strides;
  DlManagedTensor managed{};
};

// Called by torch when it frees the storage (any thread, no GIL): nothing may escape it
void delete_block(DlManagedTensor* self) noexcept {
  auto* block = static_cast<ArenaBlock*>(self->manager_ctx);
  try {
    block->arena->release(block->offset);
  } catch (...) {  // a block the arena does not know: keep its span taken rather than crash
  }
  delete block;
}

// A capsule nobody consumed (torch renames the ones it takes to "used_dltensor")
void free_unused_capsule(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DlManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (managed && managed->deleter) managed->deleter(managed);
  }
}

py::object arena_tensor(int64_t group_id, int rank, const std::vector<int64_t>& shape,
                        int dtype_code, int dtype_bits, uintptr_t stream, uint64_t capture) {
  FA2A_CHECK(dtype_bits > 0 && dtype_bits % 8 == 0,
             "arena_tensor dtype_bits must be a positive "
             "multiple of 8, got ",
             dtype_bits);
  size_t bytes = static_cast<size_t>(dtype_bits / 8);
  for (int64_t extent : shape) {
    FA2A_CHECK(extent >= 0, "arena_tensor shape extents must be >= 0, got ", extent);
    bytes *= static_cast<size_t>(extent);
  }
  auto arena = output_arena(group_id, rank);
  if (!arena || bytes == 0) return py::none();
  const Stream on{reinterpret_cast<void*>(stream)};
  // On CUDA the capture's id comes from the stream (0 there: not capturing after all); CPU tests
  // stand in for captures with ids of their own
  if (capture != 0 && arena->buffer().platform() == Platform::kCUDA) {
    capture = cuda::capture_id(arena->buffer().device(), on);
  }
  const int64_t offset = arena->allocate(bytes, on, capture);
  if (offset < 0) return py::none();
  auto block = std::make_unique<ArenaBlock>();
  block->arena = arena;
  block->offset = offset;
  block->shape = shape;
  block->strides.assign(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) block->strides[d - 1] = block->strides[d] * shape[d];
  DlTensor& t = block->managed.dl_tensor;
  t.data = arena->base() + offset;
  const bool cuda = arena->buffer().platform() == Platform::kCUDA;
  t.device = {cuda ? kDlCuda : kDlCpu, cuda ? arena->buffer().device() : 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {static_cast<uint8_t>(dtype_code), static_cast<uint8_t>(dtype_bits), 1};
  t.shape = block->shape.data();
  t.strides = block->strides.data();
  t.byte_offset = 0;
  block->managed.manager_ctx = block.get();
  block->managed.deleter = delete_block;
  DlManagedTensor* managed = &block.release()->managed;
  return py::capsule(managed, "dltensor", free_unused_capsule);
}

}  // namespace

void register_arena(py::module_& m) {
  m.def("arena_tensor", &arena_tensor, py::arg("group_id"), py::arg("rank"), py::arg("shape"),
        py::arg("dtype_code"), py::arg("dtype_bits"), py::arg("stream"), py::arg("capture") = 0,
        "A DLPack capsule of an uninitialised C-contiguous tensor (DLPack dtype code and bits) "
        "in the output arena of the buffer (group_id, rank), for work on `stream` (a "
        "cudaStream_t as an integer; 0 on CPU); None when the buffer has no arena, the tensor is "
        "empty, or no free span fits it. capture (nonzero): the block is for a CUDA graph's "
        "capture (the stream's, on CUDA; on CPU this id stands in for one): a freed block of "
        "that capture or never-used memory at the arena's top, never reused after the capture "
        "(fused_a2a/arena.h).");
  m.def(
      "arena_free_bytes",
      [](int64_t group_id, int rank) -> size_t {
        auto arena = output_arena(group_id, rank);
        return arena ? arena->free_bytes() : 0;
      },
      py::arg("group_id"), py::arg("rank"), "Free bytes of the buffer's output arena.");
  m.def(
      "arena_record_use",
      [](int64_t group_id, int rank, uintptr_t address, uintptr_t stream) -> bool {
        auto arena = output_arena(group_id, rank);
        const auto base = reinterpret_cast<uintptr_t>(arena ? arena->base() : nullptr);
        if (!arena || address < base || address >= base + arena->size()) return false;
        return arena->record_use(static_cast<int64_t>(address - base),
                                 Stream{reinterpret_cast<void*>(stream)});
      },
      py::arg("group_id"), py::arg("rank"), py::arg("address"), py::arg("stream"),
      "Records `stream` (a cudaStream_t as an integer) as a user of the arena block that starts "
      "at `address` (torch's record_stream): its memory's next allocation for another stream "
      "waits for it. False when no live block of this buffer's arena starts there.");
  m.def(
      "arena_free_span_streams",
      [](int64_t group_id, int rank) {
        std::vector<uintptr_t> out;
        if (auto arena = output_arena(group_id, rank)) {
          for (void* s : arena->free_span_streams()) out.push_back(reinterpret_cast<uintptr_t>(s));
        }
        return out;
      },
      py::arg("group_id"), py::arg("rank"),
      "The streams (as integers) of the arena's free spans' last uses, each once (tests).");
  m.def(
      "arena_release_captures",
      [](int64_t group_id, int rank) -> size_t {
        auto arena = output_arena(group_id, rank);
        return arena ? arena->release_captures() : 0;
      },
      py::arg("group_id"), py::arg("rank"),
      "Returns the arena's freed CUDA-graph blocks to its free spans (fused_a2a/arena.h); the "
      "bytes. Only once no graph captured with them will replay again.");
  m.def("arena_drop", &output_arena_drop, py::arg("group_id"),
        "At the buffer's release: no new arena blocks; live ones keep the memory.");
}

}  // namespace fa2a::bindings
