// CPU kernels: bn_act_train (+ backward) and scale_shift_act.
//
// What is fused:
//   forward   out = relu?((x - mean[c]) * invstd[c] * w[c] + b[c] + residual), with the batch
//             statistics and the running-stat update computed in the same op;
//   backward  grad_x, grad_w, grad_b and the ReLU-masked grad for the residual, with the ReLU
//             mask recomputed from the saved output and x_hat recomputed from the saved input;
//   epilogue  out = relu?(x * scale[c] + shift[c] + residual) (the `cuda` backend's epilogue;
//             here for CPU users, tests and CI).
// Trade-offs: statistics are an exact (corrected) two-pass: two reads of x instead of one-pass
// Welford. Element arithmetic is in fp32 vectors (fp64 for fp64 input); per-channel sums are
// accumulated in double lanes (as torch's CPU batch norm accumulates in double) and per-channel
// scalars are computed in double and rounded once. Fixed chunking that does not depend on the
// thread count keeps results deterministic.
// Kernel -> launcher -> registration, top to bottom. No ATen composite ops are called: all
// arithmetic is in the loops below (at::parallel_for + at::vec::Vectorized).
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace resnet_fused {
namespace {

using at::vec::Vectorized;

// ---- vector load/store in the arithmetic type (fp32 for fp16/bf16/fp32, fp64 for fp64) -----
template <typename T>
struct VecIO {
  using acc_t = T;
  using V = Vectorized<T>;
  static V load(const T* p, int64_t n) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, n);
  }
  static void store(T* p, const V& v, int64_t n) {
    if (n == V::size()) v.store(p); else v.store(p, n);
  }
};

template <typename T>
struct ReducedVecIO {  // Half / BFloat16, through float
  using acc_t = float;
  using V = Vectorized<float>;
  static V load(const T* p, int64_t n) {
    V out;
    if (n == V::size()) {
      at::vec::load_to_float<T>(p, out);
    } else {
      T buf[V::size()] = {};
      std::memcpy(buf, p, n * sizeof(T));
      at::vec::load_to_float<T>(buf, out);
    }
    return out;
  }
  static void store(T* p, const V& v, int64_t n) {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
};
template <> struct VecIO<at::Half> : ReducedVecIO<at::Half> {};
template <> struct VecIO<at::BFloat16> : ReducedVecIO<at::BFloat16> {};

constexpr int64_t kGrain = 32768;  // elements per parallel task

// Per-channel values as a vector matching the elements being processed: in NCHW a run of
// elements is one channel (broadcast a[c]); in NHWC it is channels c .. c+n-1 (load them).
template <typename acc_t>
struct Chan {
  using V = Vectorized<acc_t>;
  bool nhwc;
  int64_t c, n;
  V operator()(const acc_t* a) const {
    if (!nhwc) return V(a[c]);
    return n == V::size() ? V::loadu(a + c) : V::loadu(a + c, n);
  }
};

// Sums NUM per-element quantities per channel over the N*H*W positions of every channel, in
// double: the backward's coefficients are sums with cancellation, where fp32 products and fp32
// accumulation both showed in the gradients. f(offset, chan, count, lanes) adds the NUM
// contributions of elements [offset, offset+count) to lanes[k][0 .. count).
// Result: out[k * C + c].
template <int NUM, typename acc_t, typename F>
std::vector<double> reduce_channels(const Shape& s, const F& f) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  const int64_t C = s.C;
  std::vector<double> out(NUM * C, 0.0);
  if (s.layout == Layout::NCHW) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.count()));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double lanes[NUM][K] = {};
        double* ptrs[NUM];
        for (int k = 0; k < NUM; ++k) ptrs[k] = lanes[k];
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t base = (n * C + c) * s.HW;
          for (int64_t i = 0; i < s.HW; i += K) {
            const int64_t m = std::min(K, s.HW - i);
            f(base + i, Chan<acc_t>{false, c, m}, m, ptrs);
          }
        }
        for (int k = 0; k < NUM; ++k) {
          double t = 0;
          for (int64_t i = 0; i < K; ++i) t += lanes[k][i];
          out[k * C + c] = t;
        }
      }
    });
    return out;
  }
  // NHWC: rows of C channels. Fixed chunks of rows -> partial sums per chunk -> combined in
  // chunk order (deterministic whatever the thread count).
  const int64_t rows = s.count();
  const int64_t rows_per_chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<double> partial(chunks * NUM * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* p = partial.data() + b * NUM * C;
      const int64_t r1 = std::min(rows, (b + 1) * rows_per_chunk);
      for (int64_t r = b * rows_per_chunk; r < r1; ++r) {
        for (int64_t c = 0; c < C; c += K) {
          const int64_t m = std::min(K, C - c);
          double* ptrs[NUM];
          for (int k = 0; k < NUM; ++k) ptrs[k] = p + k * C + c;
          f(r * C + c, Chan<acc_t>{true, c, m}, m, ptrs);
        }
      }
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int k = 0; k < NUM; ++k) {
        double t = 0;
        for (int64_t b = 0; b < chunks; ++b) t += partial[(b * NUM + k) * C + c];
        out[k * C + c] = t;
      }
  });
  return out;
}

// The lanes of a vector, for the double-precision loops of the reductions.
template <typename V>
struct Unpacked {
  typename V::value_type v[V::size()];
  explicit Unpacked(const V& x) { x.store(v); }
  double operator[](int64_t i) const { return static_cast<double>(v[i]); }
};

// Calls f(offset, chan, count) over all elements, in runs of at most one vector.
template <typename acc_t, typename F>
void for_each_vector(const Shape& s, const F& f) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  const int64_t C = s.C;
  if (s.layout == Layout::NCHW) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.HW));
    at::parallel_for(0, s.N * C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C, base = p * s.HW;
        for (int64_t i = 0; i < s.HW; i += K) {
          const int64_t m = std::min(K, s.HW - i);
          f(base + i, Chan<acc_t>{false, c, m}, m);
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
    at::parallel_for(0, s.count(), grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; c += K) {
          const int64_t m = std::min(K, C - c);
          f(r * C + c, Chan<acc_t>{true, c, m}, m);
        }
    });
  }
}

// Per-channel tensor (any of the four dtypes) -> acc_t values; `fill` when absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(C, fill);
  if (!given(t)) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values",
                                  [&] {
                                    const scalar_t* p = t->const_data_ptr<scalar_t>();
                                    for (int64_t c = 0; c < C; ++c) v[c] = acc_t(p[c]);
                                  });
  return v;
}

template <typename src_t>
void write_channels(at::Tensor& t, const std::vector<src_t>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_channels",
                                  [&] {
                                    scalar_t* p = t.mutable_data_ptr<scalar_t>();
                                    for (size_t c = 0; c < v.size(); ++c) p[c] = scalar_t(v[c]);
                                  });
}

// ---- bn_act_train -------------------------------------------------------------------------
template <typename scalar_t>
void bn_forward(const Shape& s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                const std::optional<at::Tensor>& running_mean,
                const std::optional<at::Tensor>& running_var, double momentum, double eps,
                bool relu, at::Tensor& out, at::Tensor& save_mean, at::Tensor& save_invstd,
                at::Tensor& new_rm, at::Tensor& new_rv) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = Vectorized<acc_t>;
  const int64_t C = s.C;
  const double M = static_cast<double>(s.count());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();

  // Pass 1: the mean.
  const auto sums = reduce_channels<1, acc_t>(
      s, [&](int64_t off, const Chan<acc_t>&, int64_t m, double* const* lanes) {
        const Unpacked<V> x(IO::load(xp + off, m));
        for (int64_t i = 0; i < m; ++i) lanes[0][i] += x[i];
      });
  std::vector<acc_t> mean0(C);
  for (int64_t c = 0; c < C; ++c) mean0[c] = acc_t(sums[c] / M);
  // Pass 2: sum of d and d^2 with d = x - mean0 (in double); var = (sum d^2 - (sum d)^2 / M) / M
  // (the corrected two-pass algorithm).
  const auto dev = reduce_channels<2, acc_t>(
      s, [&](int64_t off, const Chan<acc_t>& ch, int64_t m, double* const* lanes) {
        const Unpacked<V> x(IO::load(xp + off, m)), mu(ch(mean0.data()));
        for (int64_t i = 0; i < m; ++i) {
          const double d = x[i] - mu[i];
          lanes[0][i] += d;
          lanes[1][i] += d * d;
        }
      });

  const auto w = channel_values<acc_t>(weight, C, acc_t(1));
  const auto b = channel_values<double>(bias, C, 0.0);
  const bool update = given(running_mean);
  const auto rm = channel_values<double>(running_mean, C, 0.0);
  const auto rv = channel_values<double>(running_var, C, 0.0);
  std::vector<acc_t> mean(C), invstd(C), scale(C), shift(C);
  std::vector<double> rm_new(update ? C : 0), rv_new(update ? C : 0);
  for (int64_t c = 0; c < C; ++c) {
    const double d1 = dev[c], d2 = dev[C + c];
    const double m2 = std::max(d2 - d1 * d1 / M, 0.0);
    const double mu = sums[c] / M;  // double sum of the inputs: accurate
    const double is = 1.0 / std::sqrt(m2 / M + eps);
    mean[c] = acc_t(mu);
    invstd[c] = acc_t(is);
    const double sc = double(w[c]) * is;
    scale[c] = acc_t(sc);  // one rounding
    // out = (x - mean[c]) * scale[c] + shift[c]: mean[c] is the batch mean rounded to acc_t,
    // and that rounding times a large invstd would dominate the error; shift carries it.
    shift[c] = acc_t(b[c] - (mu - double(mean[c])) * sc);
    if (update) {
      rm_new[c] = momentum * mu + (1.0 - momentum) * rm[c];
      rv_new[c] = momentum * (m2 / (M - 1.0)) + (1.0 - momentum) * rv[c];
    }
  }
  write_channels(save_mean, mean);
  write_channels(save_invstd, invstd);
  if (update) {
    write_channels(new_rm, rm_new);
    write_channels(new_rv, rv_new);
  }

  // Pass 3: normalise, affine, residual, ReLU -> out.
  const scalar_t* rp = given(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  for_each_vector<acc_t>(s, [&](int64_t off, const Chan<acc_t>& ch, int64_t m) {
    V y = (IO::load(xp + off, m) - ch(mean.data())) * ch(scale.data()) + ch(shift.data());
    if (rp) y = y + IO::load(rp + off, m);
    if (relu) y = at::vec::maximum(y, V(acc_t(0)));
    IO::store(op + off, y, m);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  const auto checked = check_bn_act_train(x, weight, bias, residual, running_mean, running_var);
  const Shape s = checked.first;                // (no structured bindings: lambdas below
  const at::ScalarType pdtype = checked.second;  //  capture these, C++17)
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor out = empty_like_layout(x, s.layout);
  at::Tensor save_mean = empty_channels(x, s.C, acc), save_invstd = empty_channels(x, s.C, acc);
  const int64_t rc = given(running_mean) ? s.C : 0;
  at::Tensor new_rm = empty_channels(x, rc, pdtype), new_rv = empty_channels(x, rc, pdtype);
  if (s.C == 0) return {out, save_mean, save_invstd, new_rm, new_rv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_train_cpu",
                                  [&] {
                                    bn_forward<scalar_t>(s, x, weight, bias, residual,
                                                         running_mean, running_var, momentum,
                                                         eps, relu, out, save_mean, save_invstd,
                                                         new_rm, new_rv);
                                  });
  return {out, save_mean, save_invstd, new_rm, new_rv};
}

// ---- bn_act_train_backward ----------------------------------------------------------------
template <typename scalar_t>
void bn_backward(const Shape& s, const at::Tensor& grad_out, const at::Tensor& x,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& out,
                 const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
                 at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_b,
                 at::Tensor& grad_res) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = Vectorized<acc_t>;
  const int64_t C = s.C;
  const double M = static_cast<double>(s.count());
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* yp = relu ? out->const_data_ptr<scalar_t>() : nullptr;
  const acc_t* mean = save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = save_invstd.const_data_ptr<acc_t>();
  const V zero(acc_t(0));
  // The gradient below the ReLU: zero where the output is <= 0 (as torch's threshold_backward).
  auto masked_grad = [&](int64_t off, int64_t m) {
    const V g = IO::load(gp + off, m);
    return yp ? V::blendv(g, zero, IO::load(yp + off, m) <= zero) : g;
  };

  // Pass 1: sum g and sum g * (x - mean) per channel.
  const auto sums = reduce_channels<2, acc_t>(
      s, [&](int64_t off, const Chan<acc_t>& ch, int64_t m, double* const* lanes) {
        const Unpacked<V> g(masked_grad(off, m)), x(IO::load(xp + off, m)), mu(ch(mean));
        for (int64_t i = 0; i < m; ++i) {
          lanes[0][i] += g[i];
          lanes[1][i] += g[i] * (x[i] - mu[i]);
        }
      });
  const auto w = channel_values<acc_t>(weight, C, acc_t(1));
  std::vector<acc_t> gw(C), gb(C), k_mean(C), k_x(C), w_invstd(C);
  for (int64_t c = 0; c < C; ++c) {
    const double sg = sums[c], sgx = sums[C + c], is = invstd[c];
    gb[c] = acc_t(sg);
    gw[c] = acc_t(sgx * is);
    k_mean[c] = acc_t(sg / M);
    k_x[c] = acc_t(sgx / M * is * is);
    w_invstd[c] = acc_t(double(w[c]) * is);
  }
  write_channels(grad_w, gw);
  write_channels(grad_b, gb);

  // Pass 2: grad_x = (g - mean(g) - (x - mean) * mean(g * (x - mean)) * invstd^2) * w * invstd.
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* grp = grad_res.numel() ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
  for_each_vector<acc_t>(s, [&](int64_t off, const Chan<acc_t>& ch, int64_t m) {
    const V g = masked_grad(off, m);
    const V xc = IO::load(xp + off, m) - ch(mean);
    IO::store(gxp + off, (g - ch(k_mean.data()) - xc * ch(k_x.data())) * ch(w_invstd.data()), m);
    if (grp) IO::store(grp + off, g, m);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool relu, bool grad_residual) {
  const Shape s =
      check_bn_act_train_backward(grad_out, x, weight, out, save_mean, save_invstd, relu);
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor grad_x = empty_like_layout(x, s.layout);
  at::Tensor grad_w = empty_channels(x, s.C, acc), grad_b = empty_channels(x, s.C, acc);
  at::Tensor grad_res = (relu && grad_residual) ? empty_like_layout(x, s.layout)
                                                : empty_channels(x, 0, x.scalar_type());
  if (s.numel() == 0) {
    for (at::Tensor* t : {&grad_w, &grad_b}) {
      AT_DISPATCH_FLOATING_TYPES(acc, "zero", [&] {
        scalar_t* p = t->mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < s.C; ++c) p[c] = scalar_t(0);
      });
    }
    return {grad_x, grad_w, grad_b, grad_res};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "bn_act_train_backward_cpu", [&] {
                                    bn_backward<scalar_t>(s, grad_out, x, weight, out, save_mean,
                                                          save_invstd, relu, grad_x, grad_w,
                                                          grad_b, grad_res);
                                  });
  return {grad_x, grad_w, grad_b, grad_res};
}

// ---- scale_shift_act ----------------------------------------------------------------------
at::Tensor scale_shift_act_cpu(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                               bool relu) {
  const Shape s = check_scale_shift_act(x, scale, shift, residual);
  at::Tensor out = empty_like_layout(x, s.layout);
  if (s.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_cpu",
                                  [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using V = Vectorized<acc_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = given(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_vector<acc_t>(s, [&](int64_t off, const Chan<acc_t>& ch, int64_t m) {
      V y = IO::load(xp + off, m) * ch(sc) + ch(sh);
      if (rp) y = y + IO::load(rp + off, m);
      if (relu) y = at::vec::maximum(y, V(acc_t(0)));
      IO::store(op + off, y, m);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act_train", &bn_act_train_cpu);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cpu);
  m.impl("scale_shift_act", &scale_shift_act_cpu);
}

}  // namespace resnet_fused
