// XLA FFI handlers of the JAX frontend, HybridEP mode (dispatch with permute, combine with
// unpermute; SEMANTICS.md section 2). Registered through the one table in xla_ffi.cc; buffer
// resolution, errors and platforms as described there. The handlers only call the C++ API of
// fused_a2a/hybrid.h (the static-P dispatch needs no host synchronisation), so the CUDA handlers
// work as soon as the core has a CUDA HybridEP backend (until then they report the core's
// NotImplementedError as UNIMPLEMENTED).
//
// Optional operands (probs, the scales of an e4m3 x) are always passed; the attributes say
// whether they are meaningful. Absent ones are zero-size arrays and their results are zero-size
// too. A present operand with zero elements (N = 0) gets a non-null placeholder pointer, because
// the core carries "present" as "pointer is non-null" and every rank must agree.
#include <algorithm>
#include <cstdint>

#if defined(FA2A_HAVE_XLA_FFI) && FA2A_HAVE_XLA_FFI

#include "fused_a2a/hybrid.h"
#include "xla_ffi_common.h"

namespace fa2a::bindings {
namespace {

using namespace xffi;  // NOLINT(build/namespaces)

alignas(64) const unsigned char kPlaceholder[64] = {};

// Data of an operand that is present; non-null even when it has no elements.
template <typename T>
const T* present(const Buf& b) {
  const void* p = b.untyped_data();
  return static_cast<const T*>(p != nullptr ? p : kPlaceholder);
}

float* f32_out(Ret& r, const char* name) {
  expect_dtype(*r, ffi::DataType::F32, name);
  return static_cast<float*>(r->untyped_data());
}

// The handle operands, checked.
struct HandleIn {
  const int32_t* src_expert_counts;
  const int32_t* meta;
};

HandleIn handle_in(const Buf& src_counts, const Buf& meta, int64_t num_ranks, int64_t num_local) {
  expect_dtype(src_counts, ffi::DataType::S32, "handle.src_expert_counts");
  expect_dtype(meta, ffi::DataType::S32, "handle.meta");
  FA2A_CHECK(static_cast<int64_t>(src_counts.element_count()) == num_ranks * num_local,
             "argument 'handle.src_expert_counts' must have G*L = ", num_ranks * num_local,
             " elements, got ", src_counts.element_count());
  FA2A_CHECK(meta.element_count() == static_cast<size_t>(kHybridMetaSize),
             "argument 'handle.meta' must have ", kHybridMetaSize, " elements, got ",
             meta.element_count());
  return {static_cast<const int32_t*>(src_counts.untyped_data()),
          static_cast<const int32_t*>(meta.untyped_data())};
}

void set_x(HybridDispatchArgs& a, const Buf& x, const Buf& routing_map, int64_t num_local) {
  a.x = present<void>(x);
  a.x_dtype = to_dtype(x.element_type(), "x");
  a.num_tokens = dim(x, 2, 0, "x");
  a.hidden = dim(x, 2, 1, "x");
  expect_dtype(routing_map, ffi::DataType::PRED, "routing_map");
  FA2A_CHECK(dim(routing_map, 2, 0, "routing_map") == a.num_tokens,
             "argument 'routing_map' must have N = ", a.num_tokens, " rows");
  a.routing_map = present<uint8_t>(routing_map);
  a.num_experts = static_cast<int>(dim(routing_map, 2, 1, "routing_map"));
  a.num_local_experts = static_cast<int>(num_local);
}

void set_probs(HybridDispatchArgs& a, const Buf& probs, Ret& probs_out, int64_t has_probs) {
  if (!has_probs) return;
  expect_dtype(probs, ffi::DataType::F32, "probs");
  FA2A_CHECK(static_cast<int64_t>(probs.element_count()) == a.num_tokens * a.num_experts,
             "argument 'probs' must have N*E = ", a.num_tokens * a.num_experts, " elements");
  a.probs = present<float>(probs);
  a.permuted_probs = f32_out(probs_out, "dispatched probs");
}

// P, the static rows: the attribute num_rows. The row buffers have max(P, 1) rows, because XLA
// on GPU crashed compiling a custom call whose results were all zero-sized (P = 0).
int64_t rows_of(const Buf& rows_buffer, int64_t num_rows, const char* name) {
  const int64_t have = dim(rows_buffer, 2, 0, name);
  FA2A_CHECK(num_rows >= 0 && have == std::max<int64_t>(num_rows, 1), "argument '", name,
             "' must have max(P, 1) = ", std::max<int64_t>(num_rows, 1), " rows (P = ", num_rows,
             "), got ", have);
  return num_rows;
}

// Dispatch with permute, static P (num_rows); one collective call, no host sync.
ffi::Error dispatch_impl(const Where& w, Buf rank, Buf sub, Buf x, Buf x_scales, Buf routing_map,
                         Buf probs, Ret hidden, Ret probs_out, Ret scales_out, Ret src_counts,
                         Ret row_token, Ret tokens_per_expert, Ret meta, int64_t group_id,
                         int64_t num_local, int64_t pad_multiple, int64_t has_probs,
                         int64_t num_rows, int64_t quantize_fp8) {
  return guarded("hybrid dispatch", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    HybridDispatchArgs a;
    set_x(a, x, routing_map, num_local);
    if (a.x_dtype == DType::kE4M3) {
      expect_dtype(x_scales, ffi::DataType::F32, "scaling_factor");
      a.x_scales = present<float>(x_scales);
    }
    set_probs(a, probs, probs_out, has_probs);
    a.pad_multiple = pad_multiple;
    a.quantize_fp8 = quantize_fp8 != 0;
    a.num_rows = rows_of(*hidden, num_rows, "dispatched hidden");
    a.permuted_x = hidden->untyped_data();
    if (a.quantize_fp8 || a.x_dtype == DType::kE4M3) {
      a.permuted_scales = f32_out(scales_out, "dispatched scaling_factor");
    }
    a.tokens_per_expert = i32(tokens_per_expert, "tokens_per_expert");
    a.src_expert_counts = i32(src_counts, "handle.src_expert_counts");
    a.row_token = i32(row_token, "handle.row_token");
    a.meta = i32(meta, "handle.meta");
    hybrid_dispatch(*buffer, a, stream_of(w));
  });
}

// Combine's backward: x [N,H] (and probs [N,E]) to the rows of the forward's handle.
ffi::Error cached_dispatch_impl(const Where& w, Buf rank, Buf sub, Buf x, Buf routing_map,
                                Buf probs, Buf src_counts, Buf meta, Ret hidden, Ret probs_out,
                                int64_t group_id, int64_t num_local, int64_t pad_multiple,
                                int64_t has_probs, int64_t num_rows) {
  return guarded("hybrid dispatch (cached, combine backward)", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    HybridDispatchArgs a;
    set_x(a, x, routing_map, num_local);
    set_probs(a, probs, probs_out, has_probs);
    const HandleIn h = handle_in(src_counts, meta, buffer->num_ranks(), num_local);
    a.src_expert_counts = const_cast<int32_t*>(h.src_expert_counts);  // read only
    a.meta = const_cast<int32_t*>(h.meta);                            // read only
    a.pad_multiple = pad_multiple;
    a.num_rows = rows_of(*hidden, num_rows, "hidden");
    a.permuted_x = hidden->untyped_data();
    hybrid_dispatch_cached(*buffer, a, stream_of(w));
  });
}

// Combine with unpermute (and probs carried back to [N,E] when has_probs).
ffi::Error combine_impl(const Where& w, Buf rank, Buf sub, Buf y, Buf probs, Buf src_counts,
                        Buf row_token, Buf meta, Ret out, Ret out_probs, int64_t group_id,
                        int64_t num_local, int64_t pad_multiple, int64_t has_probs,
                        int64_t num_rows) {
  return guarded("hybrid combine", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    HybridCombineArgs a;
    a.y = present<void>(y);
    a.y_dtype = to_dtype(y.element_type(), "y");
    a.num_rows = rows_of(y, num_rows, "y");
    a.hidden = dim(y, 2, 1, "y");
    const HandleIn h = handle_in(src_counts, meta, buffer->num_ranks(), num_local);
    a.src_expert_counts = h.src_expert_counts;
    a.meta = h.meta;
    expect_dtype(row_token, ffi::DataType::S32, "handle.row_token");
    FA2A_CHECK(static_cast<int64_t>(row_token.element_count()) == dim(y, 2, 0, "y"),
               "argument 'handle.row_token' must have P = ", a.num_rows, " elements (rows of y)");
    a.row_token = present<int32_t>(row_token);
    a.num_local_experts = static_cast<int>(num_local);
    a.pad_multiple = pad_multiple;
    a.num_tokens = dim(*out, 2, 0, "out");
    a.out = out->untyped_data();
    if (has_probs) {
      expect_dtype(probs, ffi::DataType::F32, "probs");
      FA2A_CHECK(static_cast<int64_t>(probs.element_count()) == dim(y, 2, 0, "y"),
                 "argument 'probs' must have P = ", a.num_rows, " elements");
      a.probs = present<float>(probs);
      a.out_probs = f32_out(out_probs, "combined probs");
    }
    hybrid_combine(*buffer, a, stream_of(w));
  });
}

// Operands, results and attributes of each target, in this order:
//   hybrid dispatch:        rank, sub, x, x_scales, routing_map, probs -> hidden, probs,
//                           scaling_factor, src_expert_counts, row_token, tokens_per_expert,
//                           meta; group_id, num_local_experts, pad_multiple, has_probs,
//                           num_rows, quantize_fp8
//   hybrid cached dispatch: rank, sub, x, routing_map, probs, src_expert_counts, meta -> hidden,
//                           probs; group_id, num_local_experts, pad_multiple, has_probs,
//                           num_rows
//   hybrid combine:         rank, sub, y, probs, src_expert_counts, row_token, meta -> out,
//                           probs [N,E]; group_id, num_local_experts, pad_multiple, has_probs,
//                           num_rows
#define FA2A_H_ARGS2(B) B.Arg<Buf>().Arg<Buf>()
#define FA2A_H_ARGS3(B) FA2A_H_ARGS2(B).Arg<Buf>()
#define FA2A_H_RETS2(B) B.Ret<Buf>().Ret<Buf>()
#define FA2A_H_ATTRS(B)                   \
  B.Attr<int64_t>("group_id")             \
      .Attr<int64_t>("num_local_experts") \
      .Attr<int64_t>("pad_multiple")      \
      .Attr<int64_t>("has_probs")         \
      .Attr<int64_t>("num_rows")
#define FA2A_H_DISPATCH_BINDING(B)                                                                 \
  FA2A_H_ATTRS(FA2A_H_RETS2(FA2A_H_RETS2(FA2A_H_RETS2(FA2A_H_ARGS3(FA2A_H_ARGS3(B))))).Ret<Buf>()) \
      .Attr<int64_t>("quantize_fp8")
#define FA2A_H_CACHED_BINDING(B) \
  FA2A_H_ATTRS(FA2A_H_RETS2(FA2A_H_ARGS2(FA2A_H_ARGS2(FA2A_H_ARGS3(B)))))
#define FA2A_H_COMBINE_BINDING(B) \
  FA2A_H_ATTRS(FA2A_H_RETS2(FA2A_H_ARGS2(FA2A_H_ARGS2(FA2A_H_ARGS3(B)))))

constexpr Where kCpu{Platform::kCPU, nullptr, -1};

ffi::Error dispatch_cpu(Buf rank, Buf sub, Buf x, Buf xs, Buf rm, Buf p, Ret h, Ret hp, Ret hs,
                        Ret sc, Ret rt, Ret tpe, Ret meta, int64_t gid, int64_t l, int64_t pad,
                        int64_t has_p, int64_t rows, int64_t q) {
  return dispatch_impl(kCpu, rank, sub, x, xs, rm, p, h, hp, hs, sc, rt, tpe, meta, gid, l, pad,
                       has_p, rows, q);
}
ffi::Error cached_dispatch_cpu(Buf rank, Buf sub, Buf x, Buf rm, Buf p, Buf sc, Buf meta, Ret h,
                               Ret hp, int64_t gid, int64_t l, int64_t pad, int64_t has_p,
                               int64_t rows) {
  return cached_dispatch_impl(kCpu, rank, sub, x, rm, p, sc, meta, h, hp, gid, l, pad, has_p, rows);
}
ffi::Error combine_cpu(Buf rank, Buf sub, Buf y, Buf p, Buf sc, Buf rt, Buf meta, Ret out, Ret op,
                       int64_t gid, int64_t l, int64_t pad, int64_t has_p, int64_t rows) {
  return combine_impl(kCpu, rank, sub, y, p, sc, rt, meta, out, op, gid, l, pad, has_p, rows);
}

#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
ffi::Error dispatch_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf x, Buf xs, Buf rm,
                         Buf p, Ret h, Ret hp, Ret hs, Ret sc, Ret rt, Ret tpe, Ret meta,
                         int64_t gid, int64_t l, int64_t pad, int64_t has_p, int64_t rows,
                         int64_t q) {
  return dispatch_impl(cuda_where(s, dev), rank, sub, x, xs, rm, p, h, hp, hs, sc, rt, tpe, meta,
                       gid, l, pad, has_p, rows, q);
}
ffi::Error cached_dispatch_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf x, Buf rm,
                                Buf p, Buf sc, Buf meta, Ret h, Ret hp, int64_t gid, int64_t l,
                                int64_t pad, int64_t has_p, int64_t rows) {
  return cached_dispatch_impl(cuda_where(s, dev), rank, sub, x, rm, p, sc, meta, h, hp, gid, l, pad,
                              has_p, rows);
}
ffi::Error combine_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf y, Buf p, Buf sc,
                        Buf rt, Buf meta, Ret out, Ret op, int64_t gid, int64_t l, int64_t pad,
                        int64_t has_p, int64_t rows) {
  return combine_impl(cuda_where(s, dev), rank, sub, y, p, sc, rt, meta, out, op, gid, l, pad,
                      has_p, rows);
}
#endif  // FA2A_HAVE_CUDA

}  // namespace
}  // namespace fa2a::bindings

namespace fa2a::bindings {

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_dispatch_cpu, dispatch_cpu,
                              FA2A_H_DISPATCH_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_cached_dispatch_cpu, cached_dispatch_cpu,
                              FA2A_H_CACHED_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_combine_cpu, combine_cpu,
                              FA2A_H_COMBINE_BINDING(ffi::Ffi::Bind()));
#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_dispatch_cuda, dispatch_cuda,
                              FA2A_H_DISPATCH_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_cached_dispatch_cuda, cached_dispatch_cuda,
                              FA2A_H_CACHED_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_hybrid_combine_cuda, combine_cuda,
                              FA2A_H_COMBINE_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
#endif  // FA2A_HAVE_CUDA

}  // namespace fa2a::bindings

#endif  // FA2A_HAVE_XLA_FFI
