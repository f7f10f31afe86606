// HybridEP part of the pybind11 module `fused_a2a_core`: the args structs (pointer fields as
// integers, like module.cc) and the ops on raw pointers. Errors map to Python exceptions through
// the translator that register_core installs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/hybrid.h"

namespace py = pybind11;

namespace fa2a::bindings {
namespace {

void bind_hybrid_args(py::module_& m) {
  using D = HybridDispatchArgs;
  py::class_<D>(m, "HybridDispatchArgs")
      .def(py::init<>())
      .FA2A_POINTER_FIELD(D, x, const void)
      .FA2A_DTYPE_FIELD(D, x_dtype)
      .def_readwrite("num_tokens", &D::num_tokens)
      .def_readwrite("hidden", &D::hidden)
      .FA2A_POINTER_FIELD(D, x_scales, const float)
      .FA2A_POINTER_FIELD(D, routing_map, const uint8_t)
      .FA2A_POINTER_FIELD(D, probs, const float)
      .def_readwrite("num_experts", &D::num_experts)
      .def_readwrite("num_local_experts", &D::num_local_experts)
      .def_readwrite("pad_multiple", &D::pad_multiple)
      .def_readwrite("quantize_fp8", &D::quantize_fp8)
      .def_readwrite("num_rows", &D::num_rows)
      .FA2A_POINTER_FIELD(D, permuted_x, void)
      .FA2A_POINTER_FIELD(D, permuted_probs, float)
      .FA2A_POINTER_FIELD(D, permuted_scales, float)
      .FA2A_POINTER_FIELD(D, tokens_per_expert, int32_t)
      .FA2A_POINTER_FIELD(D, tokens_per_expert_host, int32_t)
      .FA2A_POINTER_FIELD(D, src_expert_counts, int32_t)
      .FA2A_POINTER_FIELD(D, row_token, int32_t)
      .FA2A_POINTER_FIELD(D, meta, int32_t)
      .def_readwrite("num_sms", &D::num_sms);

  using C = HybridCombineArgs;
  py::class_<C>(m, "HybridCombineArgs")
      .def(py::init<>())
      .FA2A_POINTER_FIELD(C, y, const void)
      .FA2A_DTYPE_FIELD(C, y_dtype)
      .def_readwrite("num_rows", &C::num_rows)
      .def_readwrite("hidden", &C::hidden)
      .FA2A_POINTER_FIELD(C, probs, const float)
      .FA2A_POINTER_FIELD(C, src_expert_counts, const int32_t)
      .FA2A_POINTER_FIELD(C, row_token, const int32_t)
      .FA2A_POINTER_FIELD(C, meta, const int32_t)
      .def_readwrite("num_local_experts", &C::num_local_experts)
      .def_readwrite("pad_multiple", &C::pad_multiple)
      .def_readwrite("num_tokens", &C::num_tokens)
      .FA2A_POINTER_FIELD(C, out, void)
      .FA2A_POINTER_FIELD(C, out_probs, float)
      .def_readwrite("num_sms", &C::num_sms);
}

}  // namespace

void register_hybrid(py::module_& m) {
  bind_hybrid_args(m);
  m.attr("HYBRID_META_SIZE") = kHybridMetaSize;
  m.attr("HYBRID_META_TOTAL_ROWS") = kHybridMetaTotalRows;
  m.attr("HYBRID_META_OVERFLOW") = kHybridMetaOverflow;
  m.attr("HYBRID_META_NUM_TOKENS") = kHybridMetaNumTokens;
  m.attr("HYBRID_META_MAX_FANOUT") = kHybridMetaMaxFanout;

  using DispatchFn = void (*)(Buffer&, const HybridDispatchArgs&, Stream);
  auto bind_dispatch = [&](const char* name, DispatchFn fn) {
    m.def(
        name,
        [fn](int64_t group_id, int rank, uintptr_t stream, const HybridDispatchArgs& args) {
          auto buffer = buffer_get(group_id, rank);
          fn(*buffer, args, Stream{reinterpret_cast<void*>(stream)});
        },
        py::arg("group_id"), py::arg("rank"), py::arg("stream"), py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  };
  bind_dispatch("hybrid_dispatch", &hybrid_dispatch);
  m.def(
      "hybrid_dispatch_notify",
      [](int64_t group_id, int rank, uintptr_t stream, const HybridDispatchArgs& args) {
        auto buffer = buffer_get(group_id, rank);
        return hybrid_dispatch_notify(*buffer, args, Stream{reinterpret_cast<void*>(stream)});
      },
      py::arg("group_id"), py::arg("rank"), py::arg("stream"), py::arg("args"),
      py::call_guard<py::gil_scoped_release>(),
      "Dynamic P, phase 1 (count exchange); returns the padded total P for phase 2's outputs.");
  bind_dispatch("hybrid_dispatch_data", &hybrid_dispatch_data);
  bind_dispatch("hybrid_dispatch_cached", &hybrid_dispatch_cached);
  m.def(
      "hybrid_combine",
      [](int64_t group_id, int rank, uintptr_t stream, const HybridCombineArgs& args) {
        auto buffer = buffer_get(group_id, rank);
        hybrid_combine(*buffer, args, Stream{reinterpret_cast<void*>(stream)});
      },
      py::arg("group_id"), py::arg("rank"), py::arg("stream"), py::arg("args"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "hybrid_buffer_bytes",
      [](int64_t hidden, int64_t bytes_per_value, int num_local_experts, int num_ranks,
         int platform, int64_t rows) {
        return hybrid_buffer_bytes(hidden, bytes_per_value, num_local_experts, num_ranks,
                                   static_cast<Platform>(platform), rows);
      },
      py::arg("hidden"), py::arg("bytes_per_value"), py::arg("num_local_experts"),
      py::arg("num_ranks"), py::arg("platform"), py::arg("rows") = 0);
}

}  // namespace fa2a::bindings
