// Shared host-side helpers for the resnet_fused ops: layout detection and input checks.
//
// Every op validates its inputs here before any kernel runs, so bad input raises a
// c10::Error (RuntimeError in Python) naming what was expected and what came -- never a crash.
// Included by the CPU (.cpp) and CUDA (.cu) implementations, which dispatch on the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace resnet_fused {

// The two dense layouts the kernels read: NCHW (torch.contiguous_format) and
// NHWC (torch.channels_last). A tensor that is both (C == 1 or H*W == 1) counts as NCHW.
enum class Layout { NCHW, NHWC };

inline const char* layout_name(Layout l) {
  return l == Layout::NCHW ? "NCHW (contiguous)" : "NHWC (channels_last)";
}

inline bool in_layout(const at::Tensor& t, Layout l) {
  return l == Layout::NCHW ? t.is_contiguous()
                           : t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format(Layout l) {
  return l == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// fp32 arithmetic for fp16/bf16/fp32 activations, fp64 for fp64.
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// x: a defined 4-D (N, C, H, W) floating tensor, dense in NCHW or NHWC. Returns its layout.
inline Layout check_activation(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(x.dim() == 4, op, ": expected ", name,
              " of shape (N, C, H, W) (4-D), got a ", x.dim(), "-D tensor of shape ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()), op, ": expected ", name,
              " of dtype Half, BFloat16, Float or Double, got ", x.scalar_type());
  TORCH_CHECK(x.layout() == at::kStrided, op, ": expected a dense (strided) ", name,
              ", got layout ", x.layout());
  if (x.is_contiguous()) return Layout::NCHW;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": expected ", name,
              " dense in NCHW (contiguous) or NHWC (channels_last) layout, got shape ",
              x.sizes(), " with strides ", x.strides(),
              "; call .contiguous() or .contiguous(memory_format=torch.channels_last) first");
  return Layout::NHWC;
}

// t must match x exactly: shape, dtype, device and layout.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, Layout l,
                         const char* op) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": expected ", name, " of shape ", x.sizes(),
              " (x's shape), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ",
              x.scalar_type(), " (x's dtype), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on device ", x.device(),
              " (x's device), got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && in_layout(t, l), op, ": expected ", name,
              " in x's layout ", layout_name(l), ", got strides ", t.strides(), " for shape ",
              t.sizes());
}

// A per-channel vector: 1-D, C elements, contiguous, on x's device, of dtype `want`.
inline void check_channel_vector(const at::Tensor& t, const char* name, int64_t C,
                                 const at::Tensor& x, at::ScalarType want, const char* op) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": expected ", name, " of shape [", C,
              "] (one value per channel of x ", x.sizes(), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == want, op, ": expected ", name, " of dtype ", want, " for ",
              x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on device ", x.device(),
              " (x's device), got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), op, ": expected ", name,
              " contiguous, got strides ", t.strides());
}

// BatchNorm parameters and running stats (each optional) share one dtype: x's dtype, or
// Float for Half/BFloat16 x (mixed precision, as torch's batch_norm accepts). Returns it.
inline at::ScalarType check_bn_params(
    std::initializer_list<std::pair<const std::optional<at::Tensor>*, const char*>> params,
    const at::Tensor& x, const char* op) {
  const at::ScalarType xt = x.scalar_type();
  const bool reduced = xt == at::kHalf || xt == at::kBFloat16;
  std::optional<at::ScalarType> dtype;
  const char* first = nullptr;
  for (const auto& p : params) {
    const auto& t = *p.first;
    if (!t.has_value() || !t->defined()) continue;
    const at::ScalarType d = t->scalar_type();
    if (!dtype) {
      TORCH_CHECK(d == xt || (reduced && d == at::kFloat), op, ": expected ", p.second,
                  " of dtype ", xt, reduced ? " or Float" : "", " for ", xt, " x, got ", d);
      dtype = d;
      first = p.second;
    } else {
      TORCH_CHECK(d == *dtype, op, ": expected ", p.second, " of dtype ", *dtype, " (the dtype of ",
                  first, "), got ", d);
    }
    check_channel_vector(*t, p.second, x.size(1), x, d, op);
  }
  return dtype.value_or(opmath_type(xt));
}

// Number of values per channel: N * H * W.
inline int64_t per_channel_count(const at::Tensor& x) {
  return x.size(0) * x.size(2) * x.size(3);
}

}  // namespace resnet_fused
