// Pieces of the one extension module (fused_a2a_core), each in its own file.
#pragma once

#include <pybind11/pybind11.h>

// Binding an args struct (ops.h, hybrid.h) field by field: pointers travel as integers (torch's
// data_ptr()), dtypes as the core's integer codes.
#define FA2A_POINTER_FIELD(cls, field, type)                                     \
  def_property(                                                                  \
      #field, [](const cls& a) { return reinterpret_cast<uintptr_t>(a.field); }, \
      [](cls& a, uintptr_t address) { a.field = reinterpret_cast<type*>(address); })
#define FA2A_DTYPE_FIELD(cls, field)                                  \
  def_property(                                                       \
      #field, [](const cls& a) { return static_cast<int>(a.field); }, \
      [](cls& a, int v) { a.field = static_cast<::fa2a::DType>(v); })

namespace fa2a::bindings {
// module.cc: build info, buffer manager, torch-facing ops on raw pointers, error mapping.
void register_core(pybind11::module_& m);
// xla_ffi.cc: `ffi_targets()` -> {name: capsule} for every XLA FFI handler (one table).
void register_xla_ffi(pybind11::module_& m);
// module_hybrid.cc: HybridEP args structs and ops (dispatch with permute, combine with unpermute).
void register_hybrid(pybind11::module_& m);
// module_arena.cc: output-arena blocks as DLPack capsules (torch's recv_x in the buffer).
void register_arena(pybind11::module_& m);
}  // namespace fa2a::bindings
