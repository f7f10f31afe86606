// Pieces of the one extension module (fused_a2a_core), each in its own file.
#pragma once

#include <pybind11/pybind11.h>

namespace fa2a::bindings {
// module.cc: build info, buffer manager, torch-facing ops on raw pointers, error mapping.
void register_core(pybind11::module_& m);
// xla_ffi.cc: `ffi_targets()` -> {name: capsule} for every XLA FFI handler (one table).
void register_xla_ffi(pybind11::module_& m);
// module_hybrid.cc: HybridEP args structs and ops (dispatch with permute, combine with unpermute).
void register_hybrid(pybind11::module_& m);
}  // namespace fa2a::bindings
