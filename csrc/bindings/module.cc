// pybind11 module `fused_a2a_core`: build info, the buffer manager and the normal-mode ops on raw
// pointers (torch passes data_ptr() values), with core errors mapped to Python exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "bindings.h"
#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/ops.h"

namespace py = pybind11;

namespace fa2a::bindings {
namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

size_t recommended_buffer_bytes(int64_t hidden_bytes, int num_ranks, int platform, int64_t rows) {
  FA2A_CHECK(hidden_bytes >= 1, "hidden_bytes must be >= 1, got ", hidden_bytes);
  FA2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks,
             "], got ", num_ranks);
  if (rows <= 0) rows = default_buffer_rows(static_cast<Platform>(platform));
  auto align16 = [](int64_t b) { return (b + 15) / 16 * 16; };
  // One row: the values, FP8 scales (at most hidden_bytes / 32), top-k indices and weights for
  // up to 32 experts, the token index.
  const int64_t row = align16(hidden_bytes) + align16(hidden_bytes / 32) + 256 + 16;
  const int64_t slot = (64 + rows * row + 63) / 64 * 64;
  return static_cast<size_t>(slot) * num_ranks;
}

void bind_args(py::module_& m) {
  py::class_<DispatchArgs>(m, "DispatchArgs")
      .def(py::init<>())
      .FA2A_POINTER_FIELD(DispatchArgs, x, const void)
      .FA2A_DTYPE_FIELD(DispatchArgs, x_dtype)
      .def_readwrite("num_tokens", &DispatchArgs::num_tokens)
      .def_readwrite("hidden", &DispatchArgs::hidden)
      .FA2A_POINTER_FIELD(DispatchArgs, x_scales, const float)
      .FA2A_POINTER_FIELD(DispatchArgs, topk_idx, const void)
      .FA2A_DTYPE_FIELD(DispatchArgs, idx_dtype)
      .def_readwrite("num_topk", &DispatchArgs::num_topk)
      .FA2A_POINTER_FIELD(DispatchArgs, topk_weights, const float)
      .def_readwrite("num_experts", &DispatchArgs::num_experts)
      .def_readwrite("capacity", &DispatchArgs::capacity)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_x, void)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_x_scales, float)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_topk_idx, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_topk_idx64, int64_t)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_topk_weights, float)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_src_counts, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, recv_src_token, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, tokens_per_expert, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, num_recv, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, num_dropped, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, group_max_tokens, int32_t)
      .FA2A_POINTER_FIELD(DispatchArgs, host_counts, int32_t)
      .def_readwrite("host_ticket", &DispatchArgs::host_ticket)
      .def_readwrite("next_capacity", &DispatchArgs::next_capacity)
      .def_readwrite("zero_padding", &DispatchArgs::zero_padding)
      .def_readwrite("num_sms", &DispatchArgs::num_sms)
      .def_readwrite("call_tag", &DispatchArgs::call_tag);

  py::class_<CombineArgs>(m, "CombineArgs")
      .def(py::init<>())
      .FA2A_POINTER_FIELD(CombineArgs, y, const void)
      .FA2A_DTYPE_FIELD(CombineArgs, y_dtype)
      .def_readwrite("num_rows", &CombineArgs::num_rows)
      .def_readwrite("hidden", &CombineArgs::hidden)
      .FA2A_POINTER_FIELD(CombineArgs, weights, const float)
      .def_readwrite("num_topk", &CombineArgs::num_topk)
      .def_readwrite("weights_owner_only", &CombineArgs::weights_owner_only)
      .FA2A_POINTER_FIELD(CombineArgs, recv_src_counts, const int32_t)
      .FA2A_POINTER_FIELD(CombineArgs, recv_src_token, const int32_t)
      .FA2A_POINTER_FIELD(CombineArgs, group_max_tokens, const int32_t)
      .FA2A_POINTER_FIELD(CombineArgs, topk_idx, const void)
      .FA2A_DTYPE_FIELD(CombineArgs, idx_dtype)
      .def_readwrite("num_experts", &CombineArgs::num_experts)
      .def_readwrite("num_tokens", &CombineArgs::num_tokens)
      .FA2A_POINTER_FIELD(CombineArgs, out, void)
      .FA2A_POINTER_FIELD(CombineArgs, out_weights, float)
      .def_readwrite("num_sms", &CombineArgs::num_sms)
      .def_readwrite("call_tag", &CombineArgs::call_tag);
}

}  // namespace

void register_core(py::module_& m) {
  static py::exception<Error> timeout_error(m, "TimeoutError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::kValue:
          PyErr_SetString(PyExc_ValueError, e.what());
          return;
        case ErrorKind::kType:
          PyErr_SetString(PyExc_TypeError, e.what());
          return;
        case ErrorKind::kTimeout:
          py::set_error(timeout_error, e.what());
          return;
        case ErrorKind::kNotImplemented:
          PyErr_SetString(PyExc_NotImplementedError, e.what());
          return;
        default:
          PyErr_SetString(PyExc_RuntimeError, e.what());
          return;
      }
    }
  });

  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = build_has_cuda();
    info["cuda_arch"] = std::string(build_cuda_arch());
    info["cuda_version"] = build_cuda_version();
#ifdef FA2A_HAVE_XLA_FFI
    info["xla_ffi"] = true;
#else
    info["xla_ffi"] = false;
#endif
    info["max_ranks"] = kMaxRanks;
    return info;
  });
  m.def("cuda_device_count", &cuda_device_count);
  m.def("timeout_seconds", &timeout_seconds);
  m.def("recommended_buffer_bytes", &recommended_buffer_bytes, py::arg("hidden_bytes"),
        py::arg("num_ranks"), py::arg("platform"), py::arg("rows") = 0);
  m.def(
      "default_buffer_rows",
      [](int platform) { return default_buffer_rows(static_cast<Platform>(platform)); },
      py::arg("platform"), "Rows per slot a new buffer is sized for (FUSED_A2A_BUFFER_ROWS).");

  m.def(
      "buffer_create",
      [](int64_t group_id, int rank, int num_ranks, size_t data_bytes, int platform, int device,
         size_t arena_bytes) {
        auto buffer = buffer_create(group_id, rank, num_ranks, data_bytes,
                                    static_cast<Platform>(platform), device, arena_bytes);
        return py::bytes(buffer->local_info());
      },
      py::arg("group_id"), py::arg("rank"), py::arg("num_ranks"), py::arg("data_bytes"),
      py::arg("platform"), py::arg("device"), py::arg("arena_bytes") = 0);
  m.def(
      "buffer_arena",
      [](int64_t group_id, int rank) -> std::pair<uintptr_t, size_t> {
        auto buffer = buffer_get(group_id, rank);
        if (buffer->arena_bytes() == 0) return {0, 0};
        return {reinterpret_cast<uintptr_t>(buffer->arena(rank)), buffer->arena_bytes()};
      },
      py::arg("group_id"), py::arg("rank"),
      "(address, bytes) of this rank's output arena (buffer_create's arena_bytes), or (0, 0).");
  // Tensors over a buffer's output arena hold one, so its memory outlives buffer_release.
  py::class_<Buffer, std::shared_ptr<Buffer>>(m, "BufferRef");
  m.def(
      "buffer_ref", [](int64_t group_id, int rank) { return buffer_get(group_id, rank); },
      py::arg("group_id"), py::arg("rank"), "A reference that keeps the buffer's memory alive.");
  m.def(
      "buffer_connect",
      [](int64_t group_id, int rank, const std::vector<py::bytes>& infos) {
        std::vector<std::string> texts(infos.begin(), infos.end());
        auto buffer = buffer_find(group_id, rank);
        FA2A_CHECK_RUNTIME(buffer, "no buffer for group ", group_id, " rank ", rank);
        buffer->connect(texts);
      },
      py::arg("group_id"), py::arg("rank"), py::arg("infos"));
  m.def(
      "buffer_seal",
      [](int64_t group_id, int rank) {
        auto buffer = buffer_find(group_id, rank);
        FA2A_CHECK_RUNTIME(buffer, "no buffer for group ", group_id, " rank ", rank);
        buffer->seal();
      },
      py::arg("group_id"), py::arg("rank"));
  m.def("buffer_release", &buffer_release, py::arg("group_id"));
  m.def("buffer_release_all", &buffer_release_all);
  m.def("buffer_bytes_held", &buffer_bytes_held);
  m.def(
      "buffer_data_bytes",
      [](int64_t group_id, int rank) -> size_t {
        auto buffer = buffer_find(group_id, rank);
        return buffer ? buffer->data_bytes() : 0;
      },
      py::arg("group_id"), py::arg("rank"));
  // Diagnostics read from a buffer's CUDA state: (group_id, rank, reset) -> words
  using BufferWordsFn = std::vector<uint64_t> (*)(Buffer&, bool);
  auto bind_buffer_words = [&](const char* name, BufferWordsFn fn, const char* doc) {
    m.def(
        name,
        [fn](int64_t group_id, int rank, bool reset) -> std::vector<uint64_t> {
          auto buffer = buffer_find(group_id, rank);
          FA2A_CHECK_RUNTIME(buffer, "no buffer for group ", group_id, " rank ", rank);
          return fn(*buffer, reset);
        },
        py::arg("group_id"), py::arg("rank"), py::arg("reset") = true, doc);
  };
  bind_buffer_words(
      "cuda_dispatch_trace", &cuda_dispatch_trace,
      "Per-warp phase times of the CUDA dispatch kernels since the last reset (a build with "
      "-DFA2A_CUDA_TRACE=1 and FUSED_A2A_CUDA_TRACE=1; layout in csrc/kernels/cuda/state.h), "
      "or [] when tracing is off.");
  bind_buffer_words(
      "cuda_host_phases", &cuda_host_phases,
      "Host time of the buffer's CUDA dispatch and combine calls since the last reset: [calls, "
      "ns to the route scan's launch, ns to the kernel's parameters, ns of the launch] for the "
      "dispatch (static, data, cached) then the combine; [] without CUDA ops.");
  m.def("link_ceiling_gbps", &link_ceiling_gbps, py::arg("num_gpus"), py::arg("sms") = 24,
        py::arg("bytes_per_peer") = size_t(256) << 20, py::arg("reps") = 10,
        py::call_guard<py::gil_scoped_release>(),
        "Issue 7's link ceiling: the slowest GPU's egress GB/s when the first num_gpus GPUs of "
        "this process push to each other at once (the faster of bulk copies alone and with "
        "plain-store "
        "warps beside them, all blocks released together).");
  m.def(
      "buffer_poisoned",
      [](int64_t group_id, int rank) -> std::string {
        auto buffer = buffer_find(group_id, rank);
        return buffer ? buffer->poisoned() : std::string();
      },
      py::arg("group_id"), py::arg("rank"));

  bind_args(m);
  m.def(
      "layout",
      [](int platform, uintptr_t stream, uintptr_t topk_idx, int idx_dtype, int64_t num_tokens,
         int num_topk, int num_experts, int num_ranks, uintptr_t num_tokens_per_rank,
         uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank) {
        layout(static_cast<Platform>(platform), Stream{as_ptr<void>(stream)},
               as_ptr<const void>(topk_idx), static_cast<DType>(idx_dtype), num_tokens, num_topk,
               num_experts, num_ranks, as_ptr<int32_t>(num_tokens_per_rank),
               as_ptr<int32_t>(num_tokens_per_expert), as_ptr<uint8_t>(is_token_in_rank));
      },
      py::call_guard<py::gil_scoped_release>());
  using DispatchFn = void (*)(Buffer&, const DispatchArgs&, Stream);
  auto bind_dispatch = [&](const char* name, DispatchFn fn) {
    m.def(
        name,
        [fn](int64_t group_id, int rank, uintptr_t stream, const DispatchArgs& args) {
          auto buffer = buffer_get(group_id, rank);
          fn(*buffer, args, Stream{as_ptr<void>(stream)});
        },
        py::arg("group_id"), py::arg("rank"), py::arg("stream"), py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  };
  bind_dispatch("dispatch", &dispatch);
  bind_dispatch("dispatch_notify", &dispatch_notify);
  bind_dispatch("dispatch_data", &dispatch_data);
  bind_dispatch("cached_dispatch", &cached_dispatch);
  m.def(
      "dispatch_notify_wait",
      [](int64_t group_id, int rank, uintptr_t host_counts, int num_local, int32_t ticket) {
        auto buffer = buffer_get(group_id, rank);
        dispatch_notify_wait(*buffer, as_ptr<const int32_t>(host_counts), num_local, ticket);
      },
      py::arg("group_id"), py::arg("rank"), py::arg("host_counts"), py::arg("num_local"),
      py::arg("ticket"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "combine",
      [](int64_t group_id, int rank, uintptr_t stream, const CombineArgs& args) {
        auto buffer = buffer_get(group_id, rank);
        combine(*buffer, args, Stream{as_ptr<void>(stream)});
      },
      py::arg("group_id"), py::arg("rank"), py::arg("stream"), py::arg("args"),
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace fa2a::bindings

PYBIND11_MODULE(fused_a2a_core, m) {
  m.doc() = "fused_a2a core: MoE expert-parallel dispatch/combine kernels and buffer manager";
  fa2a::bindings::register_core(m);
  fa2a::bindings::register_hybrid(m);
  fa2a::bindings::register_arena(m);
  fa2a::bindings::register_xla_ffi(m);
}
