// XLA FFI handlers of the JAX frontend (normal mode) and the one registration table of every
// target (the HybridEP handlers live in xla_ffi_hybrid.cc).
//
// Every target exists for the "cpu" platform and, when the CUDA backend is compiled in, for
// "CUDA" under the same name. Python gets {name: PyCapsule} per platform from `ffi_targets()` and
// registers them with `jax.ffi.register_ffi_target` (api_version 1, the typed FFI).
//
// Which buffer: every collective target gets the attribute `group_id` (the same on every device
// of the program) and the operands `rank` and `sub` (int32 scalars: the rank along the EP axis and
// the index of the EP group among the groups of a multi-axis mesh). The group's buffer id is
// `group_id + sub`. CPU handlers read both operands (host memory). CUDA handlers cannot read
// device memory without a sync, so they resolve (group_id, device ordinal) through a table that
// Python fills at bootstrap (`ffi_bind_device`), falling back to `group_id` itself.
//
// Errors: every exception is caught at the handler boundary and returned as an ffi::Error that
// keeps the core's text; fa2a::ErrorKind maps to an XLA error code (see to_ffi_error).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "bindings.h"
#include "fused_a2a/buffer.h"
#include "fused_a2a/config.h"
#include "fused_a2a/errors.h"
#include "fused_a2a/ops.h"

namespace py = pybind11;

#if defined(FA2A_HAVE_XLA_FFI) && FA2A_HAVE_XLA_FFI

#include "xla_ffi_common.h"

namespace fa2a::bindings {
namespace {

using namespace xffi;  // NOLINT(build/namespaces)

std::mutex g_bind_mutex;
std::map<std::pair<int64_t, int32_t>, int64_t> g_device_group;  // (group_id, ordinal) -> buffer id

int32_t read_scalar_i32(const Buf& b, const char* arg) {
  expect_dtype(b, ffi::DataType::S32, arg);
  FA2A_CHECK(b.element_count() == 1, "argument '", arg, "' must be a scalar");
  return *static_cast<const int32_t*>(b.untyped_data());
}

}  // namespace

std::shared_ptr<Buffer> xffi::resolve(const Where& w, int64_t group_id, const Buf& rank,
                                      const Buf& sub) {
  if (w.platform == Platform::kCPU) {
    const int32_t r = read_scalar_i32(rank, "rank");
    const int32_t s = read_scalar_i32(sub, "sub");
    return buffer_get(group_id + s, r);
  }
  int64_t id = group_id;
  {
    std::lock_guard<std::mutex> lock(g_bind_mutex);
    auto it = g_device_group.find({group_id, w.ordinal});
    if (it != g_device_group.end()) id = it->second;
  }
  return buffer_get_by_device(id, w.ordinal);
}

namespace {

// ---------------------------------------------------------------------------------------------
// Implementations (platform independent)

ffi::Error layout_impl(const Where& w, Buf topk_idx, Ret per_rank, Ret per_expert, Ret in_rank,
                       int64_t num_experts, int64_t num_ranks) {
  return guarded("layout", [&] {
    const int64_t n = dim(topk_idx, 2, 0, "topk_idx");
    const int64_t k = dim(topk_idx, 2, 1, "topk_idx");
    expect_dtype(*per_rank, ffi::DataType::S32, "num_tokens_per_rank");
    expect_dtype(*per_expert, ffi::DataType::S32, "num_tokens_per_expert");
    FA2A_CHECK(in_rank->size_bytes() == static_cast<size_t>(n * num_ranks),
               "result 'is_token_in_rank' must hold N*G = ", n * num_ranks, " bytes");
    layout(w.platform, stream_of(w), topk_idx.untyped_data(),
           to_dtype(topk_idx.element_type(), "topk_idx"), n, static_cast<int>(k),
           static_cast<int>(num_experts), static_cast<int>(num_ranks),
           static_cast<int32_t*>(per_rank->untyped_data()),
           static_cast<int32_t*>(per_expert->untyped_data()),
           static_cast<uint8_t*>(in_rank->untyped_data()));
  });
}

// read_clock: any arrays in, the same arrays out (each result aliases its operand, so nothing is
// copied) and clock [2] u32 last. The operands order the read after the ops that made them; the
// results order every op that uses them after the read.
ffi::Error read_clock_impl(const Where& w, ffi::RemainingArgs through, ffi::RemainingRets rets) {
  return guarded("read_clock", [&] {
    FA2A_CHECK(rets.size() == through.size() + 1, "read_clock: ", through.size(),
               " operands need as many results and the clock, got ", rets.size(), " results");
    for (size_t i = 0; i < through.size(); ++i) {
      auto in = through.get<Buf>(i);
      auto out = rets.get<Buf>(i);
      FA2A_CHECK(in.has_value() && out.has_value(), "read_clock operand ", i, " is not an array");
      FA2A_CHECK(in->untyped_data() == (*out)->untyped_data(), "read_clock result ", i,
                 " must alias operand ", i);
    }
    auto clock = rets.get<Buf>(through.size());
    FA2A_CHECK(clock.has_value(), "read_clock result 'clock' is not an array");
    expect_dtype(**clock, ffi::DataType::U32, "clock");
    FA2A_CHECK((*clock)->element_count() == 2, "result 'clock' must hold 2 elements, got ",
               (*clock)->element_count());
    read_clock(w.platform, stream_of(w), static_cast<uint32_t*>((*clock)->untyped_data()));
  });
}

// The send side shared by the dispatch and the cached dispatch: x [N,H] and topk_idx [N,K].
DispatchArgs dispatch_inputs(const Buf& x, const Buf& topk_idx) {
  DispatchArgs a;
  a.x = x.untyped_data();
  a.x_dtype = to_dtype(x.element_type(), "x");
  a.num_tokens = dim(x, 2, 0, "x");
  a.hidden = dim(x, 2, 1, "x");
  a.topk_idx = topk_idx.untyped_data();
  a.idx_dtype = to_dtype(topk_idx.element_type(), "topk_idx");
  a.num_topk = static_cast<int>(dim(topk_idx, 2, 1, "topk_idx"));
  return a;
}

// FP8 rows (x_scales != nullptr): x is e4m3 [N,H] with x_scales [N,H/128] f32, and the scales
// arrive in recv_x_scales [C,H/128] f32, moved like the rows.
ffi::Error dispatch_impl(const Where& w, Buf rank, Buf sub, Buf x, const Buf* x_scales,
                         Buf topk_idx, Buf topk_weights, Ret recv_x, Ret* recv_x_scales,
                         Ret recv_topk_idx, Ret recv_topk_weights, Ret src_counts, Ret src_token,
                         Ret tokens_per_expert, Ret num_recv, Ret num_dropped, Ret group_max_tokens,
                         int64_t group_id, int64_t num_experts) {
  return guarded("dispatch", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    DispatchArgs a = dispatch_inputs(x, topk_idx);
    if (x_scales != nullptr) {
      expect_dtype(*x_scales, ffi::DataType::F32, "x_scales");
      a.x_scales = static_cast<const float*>(x_scales->untyped_data());
      expect_dtype(**recv_x_scales, ffi::DataType::F32, "recv_x_scales");
      a.recv_x_scales = static_cast<float*>((*recv_x_scales)->untyped_data());
    }
    expect_dtype(topk_weights, ffi::DataType::F32, "topk_weights");
    a.topk_weights = static_cast<const float*>(topk_weights.untyped_data());
    a.num_experts = static_cast<int>(num_experts);
    a.capacity = dim(*recv_x, 2, 0, "recv_x");
    a.recv_x = recv_x->untyped_data();
    a.recv_topk_idx = i32(recv_topk_idx, "recv_topk_idx");
    expect_dtype(*recv_topk_weights, ffi::DataType::F32, "recv_topk_weights");
    a.recv_topk_weights = static_cast<float*>(recv_topk_weights->untyped_data());
    a.recv_src_counts = i32(src_counts, "recv_src_counts");
    a.recv_src_token = i32(src_token, "recv_src_token");
    a.tokens_per_expert = i32(tokens_per_expert, "tokens_per_expert");
    a.num_recv = i32(num_recv, "num_recv");
    a.num_dropped = i32(num_dropped, "num_dropped");
    a.group_max_tokens = i32(group_max_tokens, "group_max_tokens");
    dispatch(*buffer, a, stream_of(w));
  });
}

// Combine's backward: moves rows along a dispatch handle. `src_counts` and `group_max_tokens`
// are aliased to the inputs of the same name (XLA copies them if the handle is still live), so
// the core may clip the counts in place.
ffi::Error cached_dispatch_impl(const Where& w, Buf rank, Buf sub, Buf x, Buf topk_idx,
                                Buf /*src_counts_in*/, Buf /*group_max_tokens_in*/, Ret recv_x,
                                Ret src_counts, Ret group_max_tokens, Ret src_token,
                                Ret tokens_per_expert, Ret num_recv, Ret num_dropped,
                                int64_t group_id, int64_t num_experts) {
  return guarded("cached dispatch", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    DispatchArgs a = dispatch_inputs(x, topk_idx);
    a.num_experts = static_cast<int>(num_experts);
    a.capacity = dim(*recv_x, 2, 0, "recv_x");
    a.recv_x = recv_x->untyped_data();
    a.recv_src_counts = i32(src_counts, "recv_src_counts");
    a.group_max_tokens = i32(group_max_tokens, "group_max_tokens");
    a.recv_src_token = i32(src_token, "recv_src_token");
    a.tokens_per_expert = i32(tokens_per_expert, "tokens_per_expert");
    a.num_recv = i32(num_recv, "num_recv");
    a.num_dropped = i32(num_dropped, "num_dropped");
    cached_dispatch(*buffer, a, stream_of(w));
  });
}

// Combine, with or without weights carried back (weights == nullptr: none).
ffi::Error combine_impl(const Where& w, Buf rank, Buf sub, Buf y, const Buf* weights,
                        Buf src_counts, Buf src_token, Buf group_max_tokens, Buf topk_idx, Ret out,
                        Ret* out_weights, int64_t group_id, int64_t num_experts,
                        int64_t owner_only) {
  return guarded("combine", [&] {
    auto buffer = resolve(w, group_id, rank, sub);
    CombineArgs a;
    a.y = y.untyped_data();
    a.y_dtype = to_dtype(y.element_type(), "y");
    a.num_rows = dim(y, 2, 0, "y");
    a.hidden = dim(y, 2, 1, "y");
    a.num_topk = static_cast<int>(dim(topk_idx, 2, 1, "topk_idx"));
    if (weights != nullptr) {
      expect_dtype(*weights, ffi::DataType::F32, "weights");
      a.weights = static_cast<const float*>(weights->untyped_data());
      a.weights_owner_only = owner_only != 0;
      expect_dtype(**out_weights, ffi::DataType::F32, "out_weights");
      a.out_weights = static_cast<float*>((*out_weights)->untyped_data());
    }
    expect_dtype(src_counts, ffi::DataType::S32, "recv_src_counts");
    expect_dtype(src_token, ffi::DataType::S32, "recv_src_token");
    expect_dtype(group_max_tokens, ffi::DataType::S32, "group_max_tokens");
    a.recv_src_counts = static_cast<const int32_t*>(src_counts.untyped_data());
    a.recv_src_token = static_cast<const int32_t*>(src_token.untyped_data());
    a.group_max_tokens = static_cast<const int32_t*>(group_max_tokens.untyped_data());
    a.topk_idx = topk_idx.untyped_data();
    a.idx_dtype = to_dtype(topk_idx.element_type(), "topk_idx");
    a.num_experts = static_cast<int>(num_experts);
    a.num_tokens = dim(topk_idx, 2, 0, "topk_idx");
    a.out = out->untyped_data();
    combine(*buffer, a, stream_of(w));
  });
}

// ---------------------------------------------------------------------------------------------
// Bindings. The same argument lists on both platforms; CUDA adds the stream and device ordinal.

// Operands, results and attributes of each target, in this order:
//   layout:          topk_idx -> per_rank, per_expert, in_rank; num_experts, num_ranks
//   dispatch:        rank, sub, x, topk_idx, topk_weights -> recv_x, recv_topk_idx,
//                    recv_topk_weights, src_counts, src_token, tokens_per_expert, num_recv,
//                    num_dropped, group_max_tokens; group_id, num_experts
//   cached dispatch: rank, sub, x, topk_idx, src_counts, group_max_tokens -> recv_x,
//                    src_counts (aliased), group_max_tokens (aliased), src_token,
//                    tokens_per_expert, num_recv, num_dropped; group_id, num_experts
//   combine:         rank, sub, y, src_counts, src_token, group_max_tokens, topk_idx -> out;
//                    group_id, num_experts
//   combine weighted: rank, sub, y, weights, src_counts, src_token, group_max_tokens, topk_idx
//                    -> out, out_weights; group_id, num_experts, weights_owner_only
#define FA2A_ARGS2(B) B.Arg<Buf>().Arg<Buf>()
#define FA2A_ARGS4(B) FA2A_ARGS2(FA2A_ARGS2(B))
#define FA2A_RETS2(B) B.Ret<Buf>().Ret<Buf>()
#define FA2A_RETS4(B) FA2A_RETS2(FA2A_RETS2(B))
#define FA2A_COLLECTIVE_ATTRS(B) B.Attr<int64_t>("group_id").Attr<int64_t>("num_experts")

#define FA2A_LAYOUT_BINDING(B)      \
  B.Arg<Buf>()                      \
      .Ret<Buf>()                   \
      .Ret<Buf>()                   \
      .Ret<Buf>()                   \
      .Attr<int64_t>("num_experts") \
      .Attr<int64_t>("num_ranks")
#define FA2A_DISPATCH_BINDING(B) \
  FA2A_COLLECTIVE_ATTRS(FA2A_RETS4(FA2A_RETS4(FA2A_ARGS4(B).Arg<Buf>()).Ret<Buf>()))
// dispatch FP8: rank, sub, x, x_scales, topk_idx, topk_weights -> recv_x, recv_x_scales, then the
// dispatch's other results
#define FA2A_DISPATCH_FP8_BINDING(B) \
  FA2A_COLLECTIVE_ATTRS(FA2A_RETS2(FA2A_RETS4(FA2A_RETS4(FA2A_ARGS2(FA2A_ARGS4(B))))))
#define FA2A_CACHED_DISPATCH_BINDING(B) \
  FA2A_COLLECTIVE_ATTRS(FA2A_RETS4(FA2A_RETS2(FA2A_ARGS2(FA2A_ARGS4(B))).Ret<Buf>()))
#define FA2A_COMBINE_BINDING(B) \
  FA2A_COLLECTIVE_ATTRS(FA2A_ARGS4(FA2A_ARGS2(B).Arg<Buf>()).Ret<Buf>())
#define FA2A_READ_CLOCK_BINDING(B) B.RemainingArgs().RemainingRets()
#define FA2A_COMBINE_W_BINDING(B) \
  FA2A_COLLECTIVE_ATTRS(FA2A_RETS2(FA2A_ARGS4(FA2A_ARGS4(B)))).Attr<int64_t>("weights_owner_only")

// CPU --------------------------------------------------------------------------------------------

constexpr Where kCpu{Platform::kCPU, nullptr, -1};

ffi::Error read_clock_cpu(ffi::RemainingArgs through, ffi::RemainingRets rets) {
  return read_clock_impl(kCpu, through, rets);
}
ffi::Error layout_cpu(Buf idx, Ret a, Ret b, Ret c, int64_t e, int64_t g) {
  return layout_impl(kCpu, idx, a, b, c, e, g);
}
ffi::Error dispatch_cpu(Buf rank, Buf sub, Buf x, Buf idx, Buf wts, Ret rx, Ret ri, Ret rw, Ret sc,
                        Ret st, Ret tpe, Ret nr, Ret nd, Ret gm, int64_t gid, int64_t e) {
  return dispatch_impl(kCpu, rank, sub, x, nullptr, idx, wts, rx, nullptr, ri, rw, sc, st, tpe, nr,
                       nd, gm, gid, e);
}
ffi::Error dispatch_fp8_cpu(Buf rank, Buf sub, Buf x, Buf xs, Buf idx, Buf wts, Ret rx, Ret rxs,
                            Ret ri, Ret rw, Ret sc, Ret st, Ret tpe, Ret nr, Ret nd, Ret gm,
                            int64_t gid, int64_t e) {
  return dispatch_impl(kCpu, rank, sub, x, &xs, idx, wts, rx, &rxs, ri, rw, sc, st, tpe, nr, nd, gm,
                       gid, e);
}
ffi::Error cached_dispatch_cpu(Buf rank, Buf sub, Buf x, Buf idx, Buf sci, Buf gmi, Ret rx, Ret sc,
                               Ret gm, Ret st, Ret tpe, Ret nr, Ret nd, int64_t gid, int64_t e) {
  return cached_dispatch_impl(kCpu, rank, sub, x, idx, sci, gmi, rx, sc, gm, st, tpe, nr, nd, gid,
                              e);
}
ffi::Error combine_cpu(Buf rank, Buf sub, Buf y, Buf sc, Buf st, Buf gm, Buf idx, Ret out,
                       int64_t gid, int64_t e) {
  return combine_impl(kCpu, rank, sub, y, nullptr, sc, st, gm, idx, out, nullptr, gid, e, 0);
}
ffi::Error combine_w_cpu(Buf rank, Buf sub, Buf y, Buf w, Buf sc, Buf st, Buf gm, Buf idx, Ret out,
                         Ret ow, int64_t gid, int64_t e, int64_t owner_only) {
  return combine_impl(kCpu, rank, sub, y, &w, sc, st, gm, idx, out, &ow, gid, e, owner_only);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_read_clock_cpu, read_clock_cpu,
                              FA2A_READ_CLOCK_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_layout_cpu, layout_cpu, FA2A_LAYOUT_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_dispatch_cpu, dispatch_cpu,
                              FA2A_DISPATCH_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_dispatch_fp8_cpu, dispatch_fp8_cpu,
                              FA2A_DISPATCH_FP8_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_cached_dispatch_cpu, cached_dispatch_cpu,
                              FA2A_CACHED_DISPATCH_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_combine_cpu, combine_cpu,
                              FA2A_COMBINE_BINDING(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_combine_weighted_cpu, combine_w_cpu,
                              FA2A_COMBINE_W_BINDING(ffi::Ffi::Bind()));

// CUDA -------------------------------------------------------------------------------------------
#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
namespace {

ffi::Error read_clock_cuda(cudaStream_t s, int32_t dev, ffi::RemainingArgs through,
                           ffi::RemainingRets rets) {
  return read_clock_impl(cuda_where(s, dev), through, rets);
}
ffi::Error layout_cuda(cudaStream_t s, int32_t dev, Buf idx, Ret a, Ret b, Ret c, int64_t e,
                       int64_t g) {
  return layout_impl(cuda_where(s, dev), idx, a, b, c, e, g);
}
ffi::Error dispatch_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf x, Buf idx, Buf wts,
                         Ret rx, Ret ri, Ret rw, Ret sc, Ret st, Ret tpe, Ret nr, Ret nd, Ret gm,
                         int64_t gid, int64_t e) {
  return dispatch_impl(cuda_where(s, dev), rank, sub, x, nullptr, idx, wts, rx, nullptr, ri, rw, sc,
                       st, tpe, nr, nd, gm, gid, e);
}
ffi::Error dispatch_fp8_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf x, Buf xs, Buf idx,
                             Buf wts, Ret rx, Ret rxs, Ret ri, Ret rw, Ret sc, Ret st, Ret tpe,
                             Ret nr, Ret nd, Ret gm, int64_t gid, int64_t e) {
  return dispatch_impl(cuda_where(s, dev), rank, sub, x, &xs, idx, wts, rx, &rxs, ri, rw, sc, st,
                       tpe, nr, nd, gm, gid, e);
}
ffi::Error cached_dispatch_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf x, Buf idx,
                                Buf sci, Buf gmi, Ret rx, Ret sc, Ret gm, Ret st, Ret tpe, Ret nr,
                                Ret nd, int64_t gid, int64_t e) {
  return cached_dispatch_impl(cuda_where(s, dev), rank, sub, x, idx, sci, gmi, rx, sc, gm, st, tpe,
                              nr, nd, gid, e);
}
ffi::Error combine_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf y, Buf sc, Buf st,
                        Buf gm, Buf idx, Ret out, int64_t gid, int64_t e) {
  return combine_impl(cuda_where(s, dev), rank, sub, y, nullptr, sc, st, gm, idx, out, nullptr, gid,
                      e, 0);
}
ffi::Error combine_w_cuda(cudaStream_t s, int32_t dev, Buf rank, Buf sub, Buf y, Buf w, Buf sc,
                          Buf st, Buf gm, Buf idx, Ret out, Ret ow, int64_t gid, int64_t e,
                          int64_t owner_only) {
  return combine_impl(cuda_where(s, dev), rank, sub, y, &w, sc, st, gm, idx, out, &ow, gid, e,
                      owner_only);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_read_clock_cuda, read_clock_cuda,
                              FA2A_READ_CLOCK_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_layout_cuda, layout_cuda,
                              FA2A_LAYOUT_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_dispatch_cuda, dispatch_cuda,
                              FA2A_DISPATCH_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_dispatch_fp8_cuda, dispatch_fp8_cuda,
                              FA2A_DISPATCH_FP8_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_cached_dispatch_cuda, cached_dispatch_cuda,
                              FA2A_CACHED_DISPATCH_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_combine_cuda, combine_cuda,
                              FA2A_COMBINE_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa2a_combine_weighted_cuda, combine_w_cuda,
                              FA2A_COMBINE_W_BINDING(FA2A_CUDA_CTX(ffi::Ffi::Bind())));
#endif  // FA2A_HAVE_CUDA

// ---------------------------------------------------------------------------------------------
// The one registration table.

namespace {

struct Target {
  const char* name;
  const char* platform;
  XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*);
};

const Target kTargets[] = {
    {"fa2a_read_clock", "cpu", fa2a_read_clock_cpu},
    {"fa2a_layout", "cpu", fa2a_layout_cpu},
    {"fa2a_dispatch", "cpu", fa2a_dispatch_cpu},
    {"fa2a_dispatch_fp8", "cpu", fa2a_dispatch_fp8_cpu},
    {"fa2a_cached_dispatch", "cpu", fa2a_cached_dispatch_cpu},
    {"fa2a_combine", "cpu", fa2a_combine_cpu},
    {"fa2a_combine_weighted", "cpu", fa2a_combine_weighted_cpu},
    {"fa2a_hybrid_dispatch", "cpu", fa2a_hybrid_dispatch_cpu},
    {"fa2a_hybrid_cached_dispatch", "cpu", fa2a_hybrid_cached_dispatch_cpu},
    {"fa2a_hybrid_combine", "cpu", fa2a_hybrid_combine_cpu},
#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
    {"fa2a_read_clock", "CUDA", fa2a_read_clock_cuda},
    {"fa2a_layout", "CUDA", fa2a_layout_cuda},
    {"fa2a_dispatch", "CUDA", fa2a_dispatch_cuda},
    {"fa2a_dispatch_fp8", "CUDA", fa2a_dispatch_fp8_cuda},
    {"fa2a_cached_dispatch", "CUDA", fa2a_cached_dispatch_cuda},
    {"fa2a_combine", "CUDA", fa2a_combine_cuda},
    {"fa2a_combine_weighted", "CUDA", fa2a_combine_weighted_cuda},
    {"fa2a_hybrid_dispatch", "CUDA", fa2a_hybrid_dispatch_cuda},
    {"fa2a_hybrid_cached_dispatch", "CUDA", fa2a_hybrid_cached_dispatch_cuda},
    {"fa2a_hybrid_combine", "CUDA", fa2a_hybrid_combine_cuda},
#endif
};

}  // namespace

void register_xla_ffi(py::module_& m) {
  m.def(
      "ffi_targets",
      [](const std::string& platform) {
        py::dict out;
        for (const Target& t : kTargets) {
          if (platform == t.platform) {
            out[py::str(t.name)] = py::capsule(reinterpret_cast<void*>(t.fn));
          }
        }
        return out;
      },
      py::arg("platform") = "cpu",
      "{target name: PyCapsule} of the XLA FFI handlers for `platform` ('cpu' or 'CUDA'); empty "
      "when that platform (or XLA FFI) is not compiled in.");
  m.def(
      "ffi_platforms",
      [] {
        py::list out;
        out.append("cpu");
#if defined(FA2A_HAVE_CUDA) && FA2A_HAVE_CUDA
        out.append("CUDA");
#endif
        return out;
      },
      "Platforms with XLA FFI handlers in this build.");
  m.def(
      "ffi_api_version", [] { return py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); },
      "The XLA FFI API version (major, minor) of the headers this build used.");
  m.def(
      "ffi_bind_device",
      [](int64_t group_id, int32_t ordinal, int64_t buffer_group_id) {
        std::lock_guard<std::mutex> lock(g_bind_mutex);
        g_device_group[{group_id, ordinal}] = buffer_group_id;
      },
      py::arg("group_id"), py::arg("device_ordinal"), py::arg("buffer_group_id"),
      "CUDA handlers with attribute `group_id` on `device_ordinal` use buffer group "
      "`buffer_group_id` (multi-axis meshes: one EP group per slice).");
  m.def(
      "ffi_unbind_group",
      [](int64_t group_id) {
        std::lock_guard<std::mutex> lock(g_bind_mutex);
        for (auto it = g_device_group.begin(); it != g_device_group.end();) {
          it = it->first.first == group_id ? g_device_group.erase(it) : std::next(it);
        }
      },
      py::arg("group_id"));
}

}  // namespace fa2a::bindings

#else  // !FA2A_HAVE_XLA_FFI

namespace fa2a::bindings {

void register_xla_ffi(py::module_& m) {
  m.def(
      "ffi_targets", [](const std::string&) { return py::dict(); }, py::arg("platform") = "cpu",
      "Empty: this build has no XLA FFI headers (jax was not importable at build time).");
  m.def("ffi_platforms", [] { return py::list(); });
  m.def("ffi_api_version", [] { return py::none(); });
  m.def(
      "ffi_bind_device", [](int64_t, int32_t, int64_t) {}, py::arg("group_id"),
      py::arg("device_ordinal"), py::arg("buffer_group_id"));
  m.def("ffi_unbind_group", [](int64_t) {}, py::arg("group_id"));
}

}  // namespace fa2a::bindings

#endif  // FA2A_HAVE_XLA_FFI
