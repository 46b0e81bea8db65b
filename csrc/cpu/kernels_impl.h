// The element loops of the CPU kernels, included once per instruction set by kernels_<isa>.cpp
// (which defines RESNET_FUSED_ISA, the namespace, and switches the target first). Loops over
// GCC/Clang vector types, which the compiler lowers for the target: no intrinsics.
//
// What is fused:
//   forward   out = relu?((x - mean[c]) * scale[c] + shift[c] + residual), with the batch
//             statistics and the running-stat update computed in the same op;
//   backward  grad_x, grad_w, grad_b and the ReLU-masked grad for the residual, with the ReLU
//             mask recomputed from the saved output and x_hat from the saved input;
//   epilogue  out = relu?((x - center[c]) * scale[c] + shift[c] + residual) (the `cuda` backend's
//             epilogue, center 0; on CPU the epilogue of eval-mode chains with autograd; with
//             bn_act_train's mean, scale and shift, its output again), and its backward in one
//             sweep (grad_x = g * scale[c], grad_scale = sum g * x, grad_shift = sum g).
// Memory traffic. NCHW: one task per channel does the statistics, the coefficients and the
// output while the channel's N x H x W values are in cache: x is read once from memory.
// NHWC: one sweep over fixed chunks of rows gives each chunk's exact two-pass moments (the
// second pass reads the chunk from cache), merged in chunk order in double; a second sweep
// writes the output. The backward has the same two shapes. Stock BatchNorm + add + ReLU reads
// and writes the tensor several times more.
// Numerics (as torch's CPU batch norm): element arithmetic in fp32 (fp64 for fp64 input);
// sums in fp32 lanes over one plane (NCHW) or a chunk of at most kMaxChunkRows rows (NHWC),
// then in double; per-channel scalars in double, rounded once. The chunking does not depend
// on the thread count, so results are deterministic.
#ifndef RESNET_FUSED_ISA
#error "define RESNET_FUSED_ISA (the instruction set's namespace) before including kernels_impl.h"
#endif

namespace resnet_fused {
namespace cpu {
namespace RESNET_FUSED_ISA {

constexpr int64_t kGrain = 16384;       // elements per parallel task
constexpr int64_t kMaxChunkRows = 256;  // NHWC: rows per chunk, bounding the fp32 sums
constexpr int64_t kMinChunkRows = 32;   // ... and at least this many: per-chunk partial sums
                                        // of wide rows must stay small next to the data

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One vector of A (GCC/Clang vector extensions: the compiler lowers them to the target's
// registers, 2 SSE or 1 AVX2 register), and Lanes<V>: the element type and width of V, where V
// is a vector or a plain A (the tail of a run uses the same expressions on scalars).
// (typedefs, not alias templates: GCC drops the attributes on those). The `unaligned` forms
// read and write memory as typed vectors: a memcpy would be a char access that may alias every
// pointer, forcing the compiler to reload them after each store.
typedef float float8 __attribute__((vector_size(32)));
typedef double double4 __attribute__((vector_size(32)));
typedef float float8_unaligned __attribute__((vector_size(32), aligned(4)));
typedef double double4_unaligned __attribute__((vector_size(32), aligned(8)));
template <typename A>
using vec = std::conditional_t<std::is_same_v<A, double>, double4, float8>;
template <typename V>
struct Lanes { using type = V; using unaligned = V; static constexpr int64_t n = 1; };
template <>
struct Lanes<float8> {
  using type = float;
  using unaligned = float8_unaligned;
  static constexpr int64_t n = 8;
};
template <>
struct Lanes<double4> {
  using type = double;
  using unaligned = double4_unaligned;
  static constexpr int64_t n = 4;
};

// fp16/bf16 <-> fp32 on a whole vector, rounding as c10::Half / c10::BFloat16 do (nearest even;
// NaN stays NaN): bf16 with integer ops, fp16 through the compiler's _Float16 (F16C
// instructions on the AVX2 build). Where _Float16 is missing, element by element.
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
#ifdef __FLT16_MAX__
typedef _Float16 f16x8 __attribute__((vector_size(16), aligned(2)));
#endif

template <typename T>
constexpr bool kVectorConvert =
    std::is_same_v<T, c10::BFloat16>
#ifdef __FLT16_MAX__
    || std::is_same_v<T, c10::Half>
#endif
    ;

template <typename T>
inline float8 widen(const T* p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const u32x8 bits = __builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16;
    float8 f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
#ifdef __FLT16_MAX__
    return __builtin_convertvector(*reinterpret_cast<const f16x8*>(p), float8);
#endif
  }
}

template <typename T>
inline void narrow(T* p, const float8& f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    u32x8 u;
    std::memcpy(&u, &f, sizeof u);
    const u32x8 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const u32x8 nan = {0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0};
    *reinterpret_cast<u16x8*>(p) = __builtin_convertvector(f != f ? nan : rounded, u16x8);
  } else {
#ifdef __FLT16_MAX__
    *reinterpret_cast<f16x8*>(p) = __builtin_convertvector(f, f16x8);
#endif
  }
}

// Loads n = Lanes<V>::n elements of T at p as V (converting fp16/bf16 to fp32), and stores.
template <typename V, typename T>
inline V get(const T* p) {
  using A = typename Lanes<V>::type;
  constexpr int64_t n = Lanes<V>::n;
  if constexpr (n == 1) {
    return A(*p);
  } else if constexpr (std::is_same_v<T, A>) {
    return *reinterpret_cast<const typename Lanes<V>::unaligned*>(p);
  } else if constexpr (std::is_same_v<V, float8> && kVectorConvert<T>) {
    return widen(p);
  } else {
    V v;
    for (int64_t l = 0; l < n; ++l) v[l] = A(p[l]);
    return v;
  }
}

template <typename T, typename V>
inline void put(T* p, const V& v) {
  using A = typename Lanes<V>::type;
  constexpr int64_t n = Lanes<V>::n;
  if constexpr (n == 1) {
    *p = T(v);
  } else if constexpr (std::is_same_v<T, A>) {
    *reinterpret_cast<typename Lanes<V>::unaligned*>(p) = v;
  } else if constexpr (std::is_same_v<V, float8> && kVectorConvert<T>) {
    narrow(p, v);
  } else {
    for (int64_t l = 0; l < n; ++l) p[l] = T(v[l]);
  }
}

// f(V{}, i) for the vectors of [0, n), then f(A{}, i) for the tail: f is a generic lambda
// whose first argument gives the type to compute in.
template <typename A, typename F>
inline void for_lanes(int64_t n, const F& f) {
  constexpr int64_t K = Lanes<vec<A>>::n;
  int64_t i = 0;
  for (; i + K <= n; i += K) f(vec<A>{}, i);
  for (; i < n; ++i) f(A{}, i);
}

// sum_{i<n} f(z, i), with two vector accumulators; the total in double.
template <typename A, typename F>
inline double lane_sum(int64_t n, const F& f) {
  using V = vec<A>;
  constexpr int64_t K = Lanes<V>::n;
  V a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    a0 += f(V{}, i);
    a1 += f(V{}, i + K);
  }
  for (; i + K <= n; i += K) a0 += f(V{}, i);
  A tail = 0;
  for (; i < n; ++i) tail += f(A{}, i);
  a0 += a1;
  double t = tail;
  for (int64_t l = 0; l < K; ++l) t += a0[l];
  return t;
}

// Two sums at once: f(z, i, a, b) adds element (vector) i's two terms to a and b; the totals
// are added to s0 and s1.
template <typename A, typename F>
inline void lane_sum2(int64_t n, const F& f, double& s0, double& s1) {
  using V = vec<A>;
  constexpr int64_t K = Lanes<V>::n;
  V a = {}, b = {};
  int64_t i = 0;
  for (; i + K <= n; i += K) f(V{}, i, a, b);
  A ta = 0, tb = 0;
  for (; i < n; ++i) f(A{}, i, ta, tb);
  double t0 = ta, t1 = tb;
  for (int64_t l = 0; l < K; ++l) {
    t0 += a[l];
    t1 += b[l];
  }
  s0 += t0;
  s1 += t1;
}

// relu keeps NaN (as torch.relu); the mask zeroes the grad where the output is <= 0 (as
// torch's threshold_backward: NaN outputs pass the grad). V: a vector or a scalar.
template <typename V>
inline V relu_of(const V& v) { return v < 0 ? V{} : v; }
template <typename V>
inline V below_relu(const V& g, const V& y) { return y <= 0 ? V{} : g; }

// NHWC chunking: fixed rows per chunk (not per thread), so sums do not depend on threads.
struct Chunks {
  int64_t rows, per, count;
  Chunks(const Shape& s)
      : rows(s.count()),
        per(std::clamp<int64_t>(kGrain / std::max<int64_t>(1, s.C), kMinChunkRows,
                                kMaxChunkRows)),
        count((rows + per - 1) / per) {}
  int64_t begin(int64_t b) const { return b * per; }
  int64_t end(int64_t b) const { return std::min(rows, (b + 1) * per); }
};

// NHWC: two per-channel sums over all rows, in fp32 lanes per chunk of rows, then in double in
// chunk order (deterministic). f(z, i, c, a, q) adds the terms of element (vector) i, channel(s)
// from c, to a and q. Adds the totals to s0[c] and s1[c].
template <typename A, typename F>
void chunked_sums2(const Chunks& chunks, int64_t C, const F& f, std::vector<double>& s0,
                   std::vector<double>& s1) {
  std::vector<double> part0(chunks.count * C), part1(chunks.count * C);
  at::parallel_for(0, chunks.count, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> acc0(C), acc1(C);
    A* const p0 = acc0.data();
    A* const p1 = acc1.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      std::fill(acc0.begin(), acc0.end(), A(0));
      std::fill(acc1.begin(), acc1.end(), A(0));
      for (int64_t r = chunks.begin(blk); r < chunks.end(blk); ++r)
        for_lanes<A>(C, [&](auto z, int64_t c) {
          using V = decltype(z);
          V a = get<V>(p0 + c), q = get<V>(p1 + c);
          f(z, r * C + c, c, a, q);
          put(p0 + c, a);
          put(p1 + c, q);
        });
      for (int64_t c = 0; c < C; ++c) {
        part0[blk * C + c] = acc0[c];
        part1[blk * C + c] = acc1[c];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t blk = 0; blk < chunks.count; ++blk) {
      s0[c] += part0[blk * C + c];
      s1[c] += part1[blk * C + c];
    }
}

// Per-channel tensor (any of the four dtypes) -> values of type V; `fill` when absent.
template <typename V>
std::vector<V> channel_values(const std::optional<at::Tensor>& t, int64_t C, V fill) {
  std::vector<V> v(C, fill);
  if (!given(t)) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values",
                                  [&] {
                                    const scalar_t* p = t->const_data_ptr<scalar_t>();
                                    for (int64_t c = 0; c < C; ++c) v[c] = V(p[c]);
                                  });
  return v;
}

template <typename V>
void write_channels(at::Tensor& t, const std::vector<V>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_channels",
                                  [&] {
                                    scalar_t* p = t.mutable_data_ptr<scalar_t>();
                                    for (size_t c = 0; c < v.size(); ++c) p[c] = scalar_t(v[c]);
                                  });
}

// out[i] = relu?((x[i] - mean) * scale + shift + res[i]): over a run of one channel with its
// scalars (NCHW), or over one row of C channels with per-channel arrays (NHWC).
template <typename V, typename T, typename M>
inline V affine(const T* x, const T* res, int64_t i, const M& mean, const M& scale,
                const M& shift, bool relu) {
  V v = (get<V>(x + i) - mean) * scale + shift;
  if (res) v += get<V>(res + i);
  return relu ? relu_of(v) : v;
}

template <typename T, typename A>
inline void apply_run(const T* x, const T* res, T* out, int64_t n, A mean, A scale, A shift,
                      bool relu) {
  for_lanes<A>(n, [&](auto z, int64_t i) {
    using V = decltype(z);
    put(out + i, affine<V>(x, res, i, mean, scale, shift, relu));
  });
}

template <typename T, typename A>
inline void apply_row(const T* x, const T* res, T* out, int64_t C, const A* mean, const A* scale,
                      const A* shift, bool relu) {
  for_lanes<A>(C, [&](auto z, int64_t c) {
    using V = decltype(z);
    put(out + c, affine<V>(x, res, c, get<V>(mean + c), get<V>(scale + c), get<V>(shift + c),
                           relu));
  });
}

// ---- bn_act_train -------------------------------------------------------------------------
// From a channel's batch mean and M2 (sum of squared deviations), both in double: the saved
// mean/invstd, the output's scale/shift and the new running stats.
template <typename A>
struct Coefficients {
  const std::vector<A>& w;
  const std::vector<double>& b;
  const std::vector<double>& rm;
  const std::vector<double>& rv;
  bool update;
  double momentum, eps, M;
  std::vector<A>& mean;
  std::vector<A>& invstd;
  std::vector<A>& scale;
  std::vector<A>& shift;
  std::vector<double>& rm_new;
  std::vector<double>& rv_new;

  void operator()(int64_t c, double mu, double m2) const {
    m2 = std::max(m2, 0.0);
    const double is = 1.0 / std::sqrt(m2 / M + eps);
    mean[c] = A(mu);
    invstd[c] = A(is);
    const double sc = double(w[c]) * is;
    scale[c] = A(sc);  // one rounding
    // out = (x - mean[c]) * scale[c] + shift[c]: mean[c] is the batch mean rounded to A, and
    // that rounding times a large invstd would dominate the error; shift carries it.
    shift[c] = A(b[c] - (mu - double(mean[c])) * sc);
    if (update) {
      rm_new[c] = momentum * mu + (1.0 - momentum) * rm[c];
      rv_new[c] = momentum * (m2 / (M - 1.0)) + (1.0 - momentum) * rv[c];
    }
  }
};

template <typename T>
void bn_forward_typed(const Shape& s, const at::Tensor& x,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, double momentum, double eps,
                      bool relu, at::Tensor& out, at::Tensor& save_mean, at::Tensor& save_invstd,
                      at::Tensor& new_rm, at::Tensor& new_rv, at::Tensor& save_scale,
                      at::Tensor& save_shift) {
  using A = acc_type<T>;
  const int64_t C = s.C, HW = s.HW, N = s.N;
  const double M = static_cast<double>(s.count());
  const T* xp = x.const_data_ptr<T>();
  const T* rp = given(residual) ? residual->const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();

  const auto w = channel_values<A>(weight, C, A(1));
  const auto b = channel_values<double>(bias, C, 0.0);
  const bool update = given(running_mean);
  const auto rm = channel_values<double>(running_mean, C, 0.0);
  const auto rv = channel_values<double>(running_var, C, 0.0);
  std::vector<A> mean(C), invstd(C), scale(C), shift(C);
  std::vector<double> rm_new(update ? C : 0), rv_new(update ? C : 0);
  const Coefficients<A> coefficients{w, b, rm, rv, update, momentum, eps, M,
                                     mean, invstd, scale, shift, rm_new, rv_new};

  if (s.layout == Layout::NCHW) {
    // One task per channel: statistics (the corrected two-pass algorithm), coefficients and
    // output, reading the channel's planes from cache after the first pass.
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.count()));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* p = xp + (n * C + c) * HW;
          sum += lane_sum<A>(HW, [&](auto z, int64_t i) { return get<decltype(z)>(p + i); });
        }
        const double mu = sum / M;
        const A mu0 = A(mu);
        double d1 = 0, d2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* p = xp + (n * C + c) * HW;
          lane_sum2<A>(HW, [&](auto z, int64_t i, auto& a, auto& q) {
            const auto d = get<decltype(z)>(p + i) - mu0;
            a += d;
            q += d * d;
          }, d1, d2);
        }
        coefficients(c, mu, d2 - d1 * d1 / M);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          apply_run<T, A>(xp + base, rp ? rp + base : nullptr, op + base, HW, mean[c], scale[c],
                          shift[c], relu);
        }
      }
    });
  } else {
    // Sweep 1: each chunk's mean and M2 per channel (two passes over the chunk, in cache).
    const Chunks chunks(s);
    std::vector<double> part_mean(chunks.count * C), part_m2(chunks.count * C);
    at::parallel_for(0, chunks.count, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> sum(C), d1(C), d2(C);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = chunks.begin(blk), r1 = chunks.end(blk);
        const A rows = A(r1 - r0);
        std::fill(sum.begin(), sum.end(), A(0));
        A* const sp = sum.data();
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = xp + r * C;
          for_lanes<A>(C, [&](auto z, int64_t c) {
            using V = decltype(z);
            put(sp + c, get<V>(sp + c) + get<V>(row + c));
          });
        }
        for (int64_t c = 0; c < C; ++c) sum[c] /= rows;  // the chunk's mean, rounded
        std::fill(d1.begin(), d1.end(), A(0));
        std::fill(d2.begin(), d2.end(), A(0));
        A* const p1 = d1.data();
        A* const p2 = d2.data();
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = xp + r * C;
          for_lanes<A>(C, [&](auto z, int64_t c) {
            using V = decltype(z);
            const V d = get<V>(row + c) - get<V>(sp + c);
            put(p1 + c, get<V>(p1 + c) + d);
            put(p2 + c, get<V>(p2 + c) + d * d);
          });
        }
        double* pm = part_mean.data() + blk * C;
        double* pq = part_m2.data() + blk * C;
        const double n = double(r1 - r0);
        for (int64_t c = 0; c < C; ++c) {
          pm[c] = double(sum[c]) + double(d1[c]) / n;
          pq[c] = double(d2[c]) - double(d1[c]) * double(d1[c]) / n;
        }
      }
    });
    // Merge the chunks in order (Chan et al.'s pairwise update, in double).
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double n = 0, mu = 0, m2 = 0;
        for (int64_t blk = 0; blk < chunks.count; ++blk) {
          const double nb = double(chunks.end(blk) - chunks.begin(blk));
          const double total = n + nb, delta = part_mean[blk * C + c] - mu;
          mu += delta * (nb / total);
          m2 += part_m2[blk * C + c] + delta * delta * (n * nb / total);
          n = total;
        }
        coefficients(c, mu, m2);
      }
    });
    // Sweep 2: the output.
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
    at::parallel_for(0, chunks.rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        apply_row<T, A>(xp + r * C, rp ? rp + r * C : nullptr, op + r * C, C, mean.data(),
                        scale.data(), shift.data(), relu);
    });
  }
  write_channels(save_mean, mean);
  write_channels(save_invstd, invstd);
  write_channels(save_scale, scale);
  write_channels(save_shift, shift);
  if (update) {
    write_channels(new_rm, rm_new);
    write_channels(new_rv, rv_new);
  }
}

void bn_forward(const Shape& s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                const std::optional<at::Tensor>& running_mean,
                const std::optional<at::Tensor>& running_var, double momentum, double eps,
                bool relu, at::Tensor& out, at::Tensor& save_mean, at::Tensor& save_invstd,
                at::Tensor& new_rm, at::Tensor& new_rv, at::Tensor& scale, at::Tensor& shift) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_train_cpu",
                                  [&] {
                                    bn_forward_typed<scalar_t>(
                                        s, x, weight, bias, residual, running_mean, running_var,
                                        momentum, eps, relu, out, save_mean, save_invstd, new_rm,
                                        new_rv, scale, shift);
                                  });
}

// ---- bn_act_train_backward ----------------------------------------------------------------
// With g the grad below the ReLU: grad_b = sum g, grad_w = sum g * x_hat and
// grad_x = (g - mean(g) - (x - mean) * mean(g * (x - mean)) * invstd^2) * w * invstd.
template <typename T>
void bn_backward_typed(const Shape& s, const at::Tensor& grad_out, const at::Tensor& x,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
                       const at::Tensor& save_invstd, bool relu, at::Tensor& grad_x,
                       at::Tensor& grad_w, at::Tensor& grad_b, at::Tensor& grad_res) {
  using A = acc_type<T>;
  const int64_t C = s.C, HW = s.HW, N = s.N;
  const double M = static_cast<double>(s.count());
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* yp = relu ? out->const_data_ptr<T>() : nullptr;
  const A* mean = save_mean.const_data_ptr<A>();
  const A* invstd = save_invstd.const_data_ptr<A>();
  T* gxp = grad_x.mutable_data_ptr<T>();
  T* grp = grad_res.numel() ? grad_res.mutable_data_ptr<T>() : nullptr;
  const auto w = channel_values<A>(weight, C, A(1));
  std::vector<A> gw(C), gb(C), k_mean(C), k_x(C), w_invstd(C);
  auto coefficients = [&](int64_t c, double sg, double sgx) {
    const double is = invstd[c];
    gb[c] = A(sg);
    gw[c] = A(sgx * is);
    k_mean[c] = A(sg / M);
    k_x[c] = A(sgx / M * is * is);
    w_invstd[c] = A(double(w[c]) * is);
  };
  // The grad below the ReLU at element (vector) i of a run starting at base.
  auto masked = [&](auto z, int64_t i) {
    using V = decltype(z);
    const V g = get<V>(gp + i);
    return yp ? below_relu(g, get<V>(yp + i)) : g;
  };
  // grad_x (and the masked grad for the residual) at element (vector) i of a channel (NCHW).
  auto grads = [&](auto z, int64_t i, const auto& mu, const auto& km, const auto& kx,
                   const auto& wi) {
    using V = decltype(z);
    const V gi = masked(z, i);
    put(gxp + i, V((gi - km - (get<V>(xp + i) - mu) * kx) * wi));
    if (grp) put(grp + i, gi);
  };

  if (s.layout == Layout::NCHW) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.count()));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const A mu = mean[c];
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          lane_sum2<A>(HW, [&](auto z, int64_t i, auto& a, auto& q) {
            const auto gi = masked(z, base + i);
            a += gi;
            q += gi * (get<decltype(z)>(xp + base + i) - mu);
          }, sg, sgx);
        }
        coefficients(c, sg, sgx);
        const A km = k_mean[c], kx = k_x[c], wi = w_invstd[c];
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          for_lanes<A>(HW, [&](auto z, int64_t i) { grads(z, base + i, mu, km, kx, wi); });
        }
      }
    });
  } else {
    // With a ReLU, sweep 1 also writes the masked grad: it is the residual's grad, or else it
    // goes into grad_x, which sweep 2 then overwrites in place. Sweep 2 reads it instead of the
    // grad and the output: one pass over memory fewer for residual chains.
    T* const masked_out = yp ? (grp ? grp : gxp) : nullptr;
    const T* const g2 = yp ? masked_out : gp;
    const Chunks chunks(s);
    std::vector<double> sg(C), sgx(C);
    chunked_sums2<A>(chunks, C, [&](auto z, int64_t i, int64_t c, auto& a, auto& q) {
      using V = decltype(z);
      const V gi = masked(z, i);
      if (masked_out) put(masked_out + i, gi);
      a += gi;
      q += gi * (get<V>(xp + i) - get<V>(mean + c));
    }, sg, sgx);
    for (int64_t c = 0; c < C; ++c) coefficients(c, sg[c], sgx[c]);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
    at::parallel_for(0, chunks.rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for_lanes<A>(C, [&](auto z, int64_t c) {
          using V = decltype(z);
          const int64_t i = r * C + c;
          const V gi = get<V>(g2 + i);
          put(gxp + i, V((gi - get<V>(k_mean.data() + c) -
                          (get<V>(xp + i) - get<V>(mean + c)) * get<V>(k_x.data() + c)) *
                         get<V>(w_invstd.data() + c)));
        });
    });
  }
  write_channels(grad_w, gw);
  write_channels(grad_b, gb);
}

void bn_backward(const Shape& s, const at::Tensor& grad_out, const at::Tensor& x,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& out,
                 const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
                 at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_b,
                 at::Tensor& grad_res) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "bn_act_train_backward_cpu", [&] {
                                    bn_backward_typed<scalar_t>(s, grad_out, x, weight, out,
                                                                save_mean, save_invstd, relu,
                                                                grad_x, grad_w, grad_b, grad_res);
                                  });
}

// ---- scale_shift_act ----------------------------------------------------------------------
void scale_shift_act(const Shape& s, const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                     bool relu, const std::optional<at::Tensor>& center, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_cpu",
                                  [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* rp = given(residual) ? residual->const_data_ptr<T>() : nullptr;
    const A* sc = scale.const_data_ptr<A>();
    const A* sh = shift.const_data_ptr<A>();
    T* op = out.mutable_data_ptr<T>();
    // the same loops as bn_act_train's output sweep, so its output is recomputed bit for bit
    const std::vector<A> zeros(given(center) ? 0 : s.C, A(0));
    const A* ce = given(center) ? center->const_data_ptr<A>() : zeros.data();
    if (s.layout == Layout::NCHW) {
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.HW));
      at::parallel_for(0, s.N * s.C, grain, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % s.C, base = p * s.HW;
          apply_run<T, A>(xp + base, rp ? rp + base : nullptr, op + base, s.HW, ce[c], sc[c],
                          sh[c], relu);
        }
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.C));
      at::parallel_for(0, s.count(), grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          apply_row<T, A>(xp + r * s.C, rp ? rp + r * s.C : nullptr, op + r * s.C, s.C,
                          ce, sc, sh, relu);
      });
    }
  });
}

// ---- scale_shift_act_backward ------------------------------------------------------------
// One sweep: with g the grad below the ReLU, grad_x = g * scale[c] (and the residual's grad g)
// are written while grad_shift = sum g and grad_scale = sum g * (x - center[c]) accumulate per
// channel (per channel task in NCHW; per chunk, merged in chunk order, in NHWC). The center
// (eval BN's running mean) keeps grad_scale a sum of centred products, as stock's BN backward
// computes it, not the difference of two large sums. Nothing reduced feeds back
// into the elements, unlike the training backward, so x, g and out are read once.
template <typename T>
void scale_shift_act_backward_typed(const Shape& s, const at::Tensor& grad_out,
                                    const at::Tensor& x, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& out, bool relu,
                                    const std::optional<at::Tensor>& center,
                                    at::Tensor& grad_x, at::Tensor& grad_scale,
                                    at::Tensor& grad_shift, at::Tensor& grad_res) {
  using A = acc_type<T>;
  const int64_t C = s.C, HW = s.HW, N = s.N;
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* yp = relu ? out->const_data_ptr<T>() : nullptr;
  const A* sc = scale.const_data_ptr<A>();
  const std::vector<A> zeros(given(center) ? 0 : C, A(0));
  const A* ce = given(center) ? center->const_data_ptr<A>() : zeros.data();
  T* gxp = grad_x.mutable_data_ptr<T>();
  T* grp = grad_res.numel() ? grad_res.mutable_data_ptr<T>() : nullptr;
  std::vector<double> sum_g(C), sum_gx(C);
  // Element (vector) i with its channel's scale k and center m: writes the grads, adds to the
  // sums a, q.
  auto element = [&](auto z, int64_t i, const auto& k, const auto& m, auto& a, auto& q) {
    using V = decltype(z);
    V gi = get<V>(gp + i);
    if (yp) gi = below_relu(gi, get<V>(yp + i));
    put(gxp + i, V(gi * k));
    if (grp) put(grp + i, gi);
    a += gi;
    q += gi * (get<V>(xp + i) - m);
  };

  if (s.layout == Layout::NCHW) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.count()));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const A k = sc[c], m = ce[c];
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          lane_sum2<A>(HW, [&](auto z, int64_t i, auto& a, auto& q) {
            element(z, base + i, k, m, a, q);
          }, sum_g[c], sum_gx[c]);
        }
      }
    });
  } else {
    chunked_sums2<A>(Chunks(s), C, [&](auto z, int64_t i, int64_t c, auto& a, auto& q) {
      using V = decltype(z);
      element(z, i, get<V>(sc + c), get<V>(ce + c), a, q);
    }, sum_g, sum_gx);
  }
  write_channels(grad_scale, sum_gx);
  write_channels(grad_shift, sum_g);
}

void scale_shift_act_backward(const Shape& s, const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& scale, const std::optional<at::Tensor>& out,
                              bool relu, const std::optional<at::Tensor>& center,
                              at::Tensor& grad_x, at::Tensor& grad_scale,
                              at::Tensor& grad_shift, at::Tensor& grad_res) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_shift_act_backward_cpu", [&] {
                                    scale_shift_act_backward_typed<scalar_t>(
                                        s, grad_out, x, scale, out, relu, center, grad_x,
                                        grad_scale, grad_shift, grad_res);
                                  });
}

}  // namespace RESNET_FUSED_ISA
}  // namespace cpu
}  // namespace resnet_fused
