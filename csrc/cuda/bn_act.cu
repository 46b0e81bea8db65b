// CUDA kernels: bn_act_train (+ backward) and scale_shift_act.
//
// What is fused:
//   forward   one read of x for the batch statistics (Welford per thread, Chan merges across
//             threads and blocks), then one read of x (+ residual) and one write of out:
//             out = relu?((x - mean[c]) * invstd[c] * w[c] + b[c] + residual). The running-stat
//             update happens in the tiny per-channel finalize kernel.
//   backward  one read of grad_out, out (ReLU mask) and x for the per-channel sums, then one
//             more read of them and one write of grad_x (and of the masked grad for the
//             residual branch). x_hat and the mask are recomputed, never stored.
//   epilogue  scale_shift_act: out = relu?((x - center[c]) * scale[c] + shift[c] + residual)
//             (center: none for the conv epilogue; bn_act_train's mean to recompute its output
//             with its scale/shift, the same kernel, bit for bit), one pass, launched 2-D so that each thread reads its channels' factors once (vectors where aligned)
//             and computes no channel index per element.
// Trade-offs: partial results per (row chunk, channel) go through a small global workspace and
// are merged in a fixed order by one thread per channel -- deterministic, no atomics, at the
// cost of two extra tiny launches. Element-wise passes use 16-byte vector loads/stores when
// pointers are 16-byte aligned and the vector stays within one run of the layout (NHWC: C a
// multiple of the vector width; NCHW: H*W a multiple); otherwise a scalar path. Indices are
// 64-bit. Arithmetic in fp32 (fp64 for fp64).
// Launchers follow the kernels; registration for the CUDA dispatch key is at the bottom.
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;      // 1-D kernels
constexpr int kTileC = 32;         // NHWC reductions: channels per block (one warp wide)
constexpr int kTileRows = 8;       //                  row lanes per block

// ---- per-channel reduction states ----------------------------------------------------------
// Three accumulators per thread; both reductions below fit that shape.
template <typename acc_t>
struct State {
  acc_t v[3];
};

// Batch statistics: (mean, M2, count), merged with Chan et al.'s formula.
template <typename scalar_t>
struct WelfordOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;

  static __device__ __forceinline__ State<acc_t> identity() { return {{0, 0, 0}}; }
  static __device__ __forceinline__ State<acc_t> merge(const State<acc_t>& a,
                                                       const State<acc_t>& b) {
    const acc_t n = a.v[2] + b.v[2];
    if (n == acc_t(0)) return a;
    const acc_t delta = b.v[0] - a.v[0];
    const acc_t fb = b.v[2] / n;
    return {{a.v[0] + delta * fb, a.v[1] + b.v[1] + delta * delta * a.v[2] * fb, n}};
  }
  __device__ __forceinline__ void accumulate(State<acc_t>& s, int64_t i, int64_t /*c*/) const {
    const acc_t v = static_cast<acc_t>(x[i]);
    s.v[2] += acc_t(1);
    const acc_t delta = v - s.v[0];
    s.v[0] += delta / s.v[2];
    s.v[1] += delta * (v - s.v[0]);
  }
};

// Backward sums: (sum g, sum g * (x - mean)) with g the ReLU-masked grad_out.
template <typename scalar_t>
struct GradSumOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ grad;
  const scalar_t* __restrict__ out;  // nullptr: no ReLU
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;

  static __device__ __forceinline__ State<acc_t> identity() { return {{0, 0, 0}}; }
  static __device__ __forceinline__ State<acc_t> merge(const State<acc_t>& a,
                                                       const State<acc_t>& b) {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1], acc_t(0)}};
  }
  __device__ __forceinline__ void accumulate(State<acc_t>& s, int64_t i, int64_t c) const {
    acc_t g = static_cast<acc_t>(grad[i]);
    if (out != nullptr && static_cast<acc_t>(out[i]) <= acc_t(0)) g = acc_t(0);
    s.v[0] += g;
    s.v[1] += g * (static_cast<acc_t>(x[i]) - mean[c]);
  }
};

template <typename Op, typename acc_t>
__device__ __forceinline__ State<acc_t> shfl_down(const State<acc_t>& s, int offset) {
  State<acc_t> o;
#pragma unroll
  for (int k = 0; k < 3; ++k) o.v[k] = __shfl_down_sync(0xffffffffu, s.v[k], offset);
  return o;
}

// Partial reductions, NCHW: grid (C, chunks); a block reduces elements [e0, e1) of the
// channel's N*H*W values. part[(chunk * 3 + k) * C + c].
template <typename Op>
__global__ void __launch_bounds__(kThreads)
partial_nchw_kernel(Op op, int64_t N, int64_t C, int64_t HW, int64_t per_block,
                    typename Op::acc_t* __restrict__ part) {
  using acc_t = typename Op::acc_t;
  const int64_t c = blockIdx.x;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t e1 = min(N * HW, e0 + per_block);
  State<acc_t> s = Op::identity();
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const int64_t n = e / HW;
    op.accumulate(s, (n * C + c) * HW + (e - n * HW), c);
  }
  for (int offset = 16; offset > 0; offset >>= 1) s = Op::merge(s, shfl_down<Op>(s, offset));
  __shared__ State<acc_t> warps[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? warps[lane] : Op::identity();
    for (int offset = 16; offset > 0; offset >>= 1) s = Op::merge(s, shfl_down<Op>(s, offset));
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < 3; ++k) part[(static_cast<int64_t>(blockIdx.y) * 3 + k) * C + c] = s.v[k];
    }
  }
}

// Partial reductions, NHWC: grid (ceil(C / 32), chunks), block (32, 8): a warp reads 32
// consecutive channels of one row (coalesced); a block reduces rows [r0, r1).
template <typename Op>
__global__ void __launch_bounds__(kTileC * kTileRows)
partial_nhwc_kernel(Op op, int64_t rows, int64_t C, int64_t rows_per_block,
                    typename Op::acc_t* __restrict__ part) {
  using acc_t = typename Op::acc_t;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  State<acc_t> s = Op::identity();
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) op.accumulate(s, r * C + c, c);
  }
  __shared__ State<acc_t> tile[kTileRows][kTileC];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int y = 1; y < kTileRows; ++y) s = Op::merge(s, tile[y][threadIdx.x]);
#pragma unroll
    for (int k = 0; k < 3; ++k) part[(static_cast<int64_t>(blockIdx.y) * 3 + k) * C + c] = s.v[k];
  }
}

// One thread per channel: batch mean/invstd, the per-channel coefficients of the apply pass,
// and the running-stat update (unbiased variance), as torch's batch_norm does.
template <typename scalar_t, typename param_t>
__global__ void finalize_stats_kernel(
    const at::opmath_type<scalar_t>* __restrict__ part, int64_t chunks, int64_t C,
    const param_t* __restrict__ weight, const param_t* __restrict__ bias,
    const param_t* __restrict__ running_mean, const param_t* __restrict__ running_var,
    double momentum, double eps,
    at::opmath_type<scalar_t>* __restrict__ save_mean,
    at::opmath_type<scalar_t>* __restrict__ save_invstd,
    at::opmath_type<scalar_t>* __restrict__ scale, at::opmath_type<scalar_t>* __restrict__ shift,
    param_t* __restrict__ new_mean, param_t* __restrict__ new_var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // Per-channel scalars in double (one thread per channel: free), each rounded once; the
  // chunks' partial (mean, M2, count) are merged in double too.
  double mean = 0, m2 = 0, count = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const double pm = part[(k * 3 + 0) * C + c], pm2 = part[(k * 3 + 1) * C + c],
                 pn = part[(k * 3 + 2) * C + c];
    const double n = count + pn;
    if (n == 0) continue;
    const double delta = pm - mean, fb = pn / n;
    mean += delta * fb;
    m2 += pm2 + delta * delta * count * fb;
    count = n;
  }
  const double invstd = 1.0 / sqrt(m2 / count + eps);
  const double sc = (weight != nullptr ? static_cast<double>(weight[c]) : 1.0) * invstd;
  const acc_t mean_r = static_cast<acc_t>(mean);
  save_mean[c] = mean_r;
  save_invstd[c] = static_cast<acc_t>(invstd);
  scale[c] = static_cast<acc_t>(sc);
  // out = (x - mean_r) * scale + shift: shift carries the rounding of the mean, which a large
  // invstd would otherwise amplify.
  shift[c] = static_cast<acc_t>((bias != nullptr ? static_cast<double>(bias[c]) : 0.0) -
                                (mean - static_cast<double>(mean_r)) * sc);
  if (new_mean != nullptr) {
    const double unbiased = m2 / (count - 1.0);
    new_mean[c] = static_cast<param_t>(momentum * mean +
                                       (1.0 - momentum) * static_cast<double>(running_mean[c]));
    new_var[c] = static_cast<param_t>(momentum * unbiased +
                                      (1.0 - momentum) * static_cast<double>(running_var[c]));
  }
}

// One thread per channel: grad_weight/grad_bias and the coefficients of the grad_x pass.
template <typename scalar_t, typename param_t>
__global__ void finalize_grad_kernel(
    const at::opmath_type<scalar_t>* __restrict__ part, int64_t chunks, int64_t C, double count,
    const param_t* __restrict__ weight, const at::opmath_type<scalar_t>* __restrict__ invstd,
    at::opmath_type<scalar_t>* __restrict__ grad_w, at::opmath_type<scalar_t>* __restrict__ grad_b,
    at::opmath_type<scalar_t>* __restrict__ k_mean, at::opmath_type<scalar_t>* __restrict__ k_x,
    at::opmath_type<scalar_t>* __restrict__ w_invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0, sgx = 0;  // the chunks' partial sums, added in double
  for (int64_t k = 0; k < chunks; ++k) {
    sg += part[(k * 3 + 0) * C + c];
    sgx += part[(k * 3 + 1) * C + c];
  }
  const double is = invstd[c];
  grad_b[c] = static_cast<acc_t>(sg);
  grad_w[c] = static_cast<acc_t>(sgx * is);
  k_mean[c] = static_cast<acc_t>(sg / count);
  k_x[c] = static_cast<acc_t>(sgx / count * is * is);
  w_invstd[c] = static_cast<acc_t>(
      (weight != nullptr ? static_cast<double>(weight[c]) : 1.0) * is);
}

// ---- element-wise passes ---------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// The channel of elements [base, base + VEC): the vector never crosses a channel run.
__device__ __forceinline__ int64_t channel_of(int64_t base, int64_t C, int64_t HW, bool nhwc) {
  return nhwc ? base % C : (base / HW) % C;
}

// out = relu?((x - sub[c]) * mul[c] + add[c] + residual); sub may be null (scale_shift_act
// without a center).
// Two-dimensional launches: a thread keeps the factors of the channels it owns in registers
// (read once, as vectors where aligned) and never computes a channel index per element.
template <typename acc_t, int VEC>
struct Factors {
  acc_t sub[VEC], mul[VEC], add[VEC];

  // One vector per factor where the launcher found them aligned to VEC elements (c0 is a
  // multiple of VEC), else VEC scalar loads: once per thread either way.
  __device__ __forceinline__ void load(const acc_t* __restrict__ s, const acc_t* __restrict__ m,
                                       const acc_t* __restrict__ a, int64_t c0, bool vec_ok) {
    load_one(m, c0, vec_ok, mul);
    load_one(a, c0, vec_ok, add);
    if (s != nullptr) {
      load_one(s, c0, vec_ok, sub);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sub[j] = acc_t(0);
    }
  }

  static __device__ __forceinline__ void load_one(const acc_t* __restrict__ p, int64_t c0,
                                                  bool vec_ok, acc_t (&dst)[VEC]) {
    if (vec_ok) {
      const Pack<acc_t, VEC> v = load_pack<VEC>(p + c0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[j] = v.v[j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[j] = p[c0 + j];
    }
  }
};

template <typename scalar_t, int VEC, int NF>
__device__ __forceinline__ void apply_pack(const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ residual,
                                           scalar_t* __restrict__ out, int64_t base,
                                           const Factors<at::opmath_type<scalar_t>, NF>& f,
                                           bool sub, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pack<scalar_t, VEC> xv = load_pack<VEC>(x + base);
  Pack<scalar_t, VEC> rv;
  if (residual != nullptr) rv = load_pack<VEC>(residual + base);
  Pack<scalar_t, VEC> ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int k = NF == 1 ? 0 : j;   // NCHW: one channel for the whole vector
    acc_t v = static_cast<acc_t>(xv.v[j]);
    if (sub) v -= f.sub[k];
    v = v * f.mul[k] + f.add[k];
    if (residual != nullptr) v += static_cast<acc_t>(rv.v[j]);
    if (relu && v <= acc_t(0)) v = acc_t(0);  // NaN stays NaN, as torch.relu
    ov.v[j] = static_cast<scalar_t>(v);
  }
  *reinterpret_cast<Pack<scalar_t, VEC>*>(out + base) = ov;
}

// NHWC: grid (channel-vector blocks, row blocks), block (channel vectors, rows). Thread x owns
// channels [c0, c0 + VEC) of every row (pixel) it visits; a warp reads whole rows contiguously.
// SUB is a template argument so that scale_shift_act without a center keeps two factor vectors, not
// three, in registers across the loop.
template <typename scalar_t, int VEC, bool SUB>
__global__ void __launch_bounds__(kThreads)
apply_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                  scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ sub,
                  const at::opmath_type<scalar_t>* __restrict__ mul,
                  const at::opmath_type<scalar_t>* __restrict__ add, int64_t rows, int64_t C,
                  bool relu, bool factors_vec_ok) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  Factors<at::opmath_type<scalar_t>, VEC> f;
  f.load(SUB ? sub : nullptr, mul, add, c0, factors_vec_ok);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += step)
    apply_pack<scalar_t, VEC>(x, residual, out, r * C + c0, f, SUB, relu);
}

// NCHW: grid (vector blocks along H*W, planes), 1-D blocks. Plane p = (n, c): its factors are
// read once per plane, one channel index per plane.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
apply_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                  scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ sub,
                  const at::opmath_type<scalar_t>* __restrict__ mul,
                  const at::opmath_type<scalar_t>* __restrict__ add, int64_t planes, int64_t C,
                  int64_t HW, bool relu) {
  const int64_t nvec = HW / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    Factors<at::opmath_type<scalar_t>, 1> f;
    f.load(sub, mul, add, p % C, false);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
         i += step)
      apply_pack<scalar_t, VEC>(x, residual, out, p * HW + i * VEC, f, sub != nullptr, relu);
  }
}

// grad_x = (g - k_mean[c] - (x - mean[c]) * k_x[c]) * w_invstd[c], g = grad masked by out > 0;
// grad_res = g (when requested).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
grad_input_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                  const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ mean,
                  const at::opmath_type<scalar_t>* __restrict__ k_mean,
                  const at::opmath_type<scalar_t>* __restrict__ k_x,
                  const at::opmath_type<scalar_t>* __restrict__ w_invstd,
                  scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_res, int64_t total,
                  int64_t C, int64_t HW, bool nhwc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nvec = total / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += stride) {
    const int64_t base = i * VEC;
    const int64_t c0 = channel_of(base, C, HW, nhwc);
    const Pack<scalar_t, VEC> gv = load_pack<VEC>(grad + base);
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x + base);
    Pack<scalar_t, VEC> yv;
    if (out != nullptr) yv = load_pack<VEC>(out + base);
    Pack<scalar_t, VEC> dx, dr;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = nhwc ? c0 + j : c0;
      acc_t g = static_cast<acc_t>(gv.v[j]);
      if (out != nullptr && static_cast<acc_t>(yv.v[j]) <= acc_t(0)) g = acc_t(0);
      const acc_t xc = static_cast<acc_t>(xv.v[j]) - mean[c];
      dx.v[j] = static_cast<scalar_t>((g - k_mean[c] - xc * k_x[c]) * w_invstd[c]);
      dr.v[j] = static_cast<scalar_t>(g);
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_x + base) = dx;
    if (grad_res != nullptr) *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_res + base) = dr;
  }
}

// ---- launchers -------------------------------------------------------------------------------
int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  return std::max(sms, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for a grid-stride element-wise kernel over n items.
unsigned grid_1d(int64_t n, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads),
                                                                      int64_t(sms) * 16)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vectors are usable when every pointer is aligned and a vector never crosses a run.
template <typename scalar_t>
bool can_vectorize(const Shape& s, std::initializer_list<const void*> ptrs) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  if ((s.layout == Layout::NHWC ? s.C : s.HW) % vec != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

// Runs a partial reduction over every channel; returns the workspace and its chunk count.
template <typename Op>
std::pair<at::Tensor, int64_t> partial_reduce(const Op& op, const Shape& s, const at::Tensor& x,
                                              cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  const int sms = sm_count(x);
  const int64_t target_blocks = int64_t(sms) * 4;
  const int64_t M = s.count();
  at::Tensor part;
  int64_t chunks;
  if (s.layout == Layout::NCHW) {
    chunks = std::clamp<int64_t>(ceil_div(target_blocks, s.C), 1,
                                 std::min<int64_t>(65535, ceil_div(M, 4 * kThreads)));
    const int64_t per_block = ceil_div(M, chunks);
    chunks = ceil_div(M, per_block);
    part = at::empty({chunks * 3 * s.C}, x.options().dtype(opmath_type(x.scalar_type())));
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(chunks));
    partial_nchw_kernel<Op><<<grid, kThreads, 0, stream>>>(op, s.N, s.C, s.HW, per_block,
                                                           part.mutable_data_ptr<acc_t>());
  } else {
    const int64_t ctiles = ceil_div(s.C, kTileC);
    chunks = std::clamp<int64_t>(ceil_div(target_blocks, ctiles), 1,
                                 std::min<int64_t>(65535, ceil_div(M, 8 * kTileRows)));
    const int64_t per_block = ceil_div(M, chunks);
    chunks = ceil_div(M, per_block);
    part = at::empty({chunks * 3 * s.C}, x.options().dtype(opmath_type(x.scalar_type())));
    const dim3 grid(static_cast<unsigned>(ctiles), static_cast<unsigned>(chunks));
    const dim3 block(kTileC, kTileRows);
    partial_nhwc_kernel<Op><<<grid, block, 0, stream>>>(op, M, s.C, per_block,
                                                        part.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {part, chunks};
}

template <typename scalar_t>
void launch_apply(const Shape& s, const scalar_t* x, const scalar_t* residual, scalar_t* out,
                  const at::opmath_type<scalar_t>* sub, const at::opmath_type<scalar_t>* mul,
                  const at::opmath_type<scalar_t>* add, bool relu, int sms, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = can_vectorize<scalar_t>(s, {x, residual, out});
  const bool factors_vec_ok = [&] {  // each factor vector aligned to its own size
    const uintptr_t bytes = sizeof(at::opmath_type<scalar_t>) * kVec;
    for (const void* p : {static_cast<const void*>(sub), static_cast<const void*>(mul),
                          static_cast<const void*>(add)})
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
    return true;
  }();
  const int64_t blocks_wanted = int64_t(sms) * 16;   // as grid_1d: enough to fill the GPU
  if (s.layout == Layout::NHWC) {
    const int64_t cvec = vec ? s.C / kVec : s.C;     // channel vectors per row
    int64_t bx = 1;
    while (bx < cvec && bx < 64) bx *= 2;            // up to 64 vectors of a row per block
    const int64_t by = kThreads / bx;
    const int64_t gx = ceil_div(cvec, bx);
    const int64_t rows = s.N * s.HW;
    const int64_t gy = std::clamp<int64_t>(ceil_div(blocks_wanted, gx), 1,
                                           std::min<int64_t>(65535, ceil_div(rows, by)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    auto launch = [&](auto vec_width, auto has_sub) {
      apply_nhwc_kernel<scalar_t, decltype(vec_width)::value, decltype(has_sub)::value>
          <<<grid, block, 0, stream>>>(x, residual, out, sub, mul, add, rows, s.C, relu,
                                       factors_vec_ok);
    };
    using One = std::integral_constant<int, 1>;
    using Wide = std::integral_constant<int, kVec>;
    if (sub != nullptr) {
      if (vec) launch(Wide{}, std::true_type{}); else launch(One{}, std::true_type{});
    } else {
      if (vec) launch(Wide{}, std::false_type{}); else launch(One{}, std::false_type{});
    }
  } else {
    const int64_t planes = s.N * s.C;
    const int64_t nvec = vec ? s.HW / kVec : s.HW;
    const int64_t gy = std::min<int64_t>(planes, 65535);
    const int64_t gx = std::clamp<int64_t>(ceil_div(blocks_wanted, gy), 1,
                                           ceil_div(nvec, kThreads));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    if (vec)
      apply_nchw_kernel<scalar_t, kVec><<<grid, kThreads, 0, stream>>>(x, residual, out, sub, mul,
                                                                        add, planes, s.C, s.HW,
                                                                        relu);
    else
      apply_nchw_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(x, residual, out, sub, mul,
                                                                     add, planes, s.C, s.HW, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return given(t) ? t->const_data_ptr<T>() : nullptr;
}

// ---- bn_act_train ----------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_train_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  const auto checked = check_bn_act_train(x, weight, bias, residual, running_mean, running_var);
  const Shape s = checked.first;                // (no structured bindings: lambdas below
  const at::ScalarType pdtype = checked.second;  //  capture these, C++17)
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor out = empty_like_layout(x, s.layout);
  at::Tensor save_mean = empty_channels(x, s.C, acc), save_invstd = empty_channels(x, s.C, acc);
  const int64_t rc = given(running_mean) ? s.C : 0;
  at::Tensor new_rm = empty_channels(x, rc, pdtype), new_rv = empty_channels(x, rc, pdtype);
  at::Tensor scale_t = empty_channels(x, s.C, acc), shift_t = empty_channels(x, s.C, acc);
  if (s.C == 0) return {out, save_mean, save_invstd, new_rm, new_rv, scale_t, shift_t};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_train_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto reduced = partial_reduce(WelfordOp<scalar_t>{xp}, s, x, stream);
    const at::Tensor& part = reduced.first;
    const int64_t chunks = reduced.second;
    acc_t* scale = scale_t.mutable_data_ptr<acc_t>();
    acc_t* shift = shift_t.mutable_data_ptr<acc_t>();
    const unsigned grid = static_cast<unsigned>(ceil_div(s.C, kThreads));
    auto finalize = [&](auto tag) {
      using param_t = decltype(tag);
      finalize_stats_kernel<scalar_t, param_t><<<grid, kThreads, 0, stream>>>(
          part.const_data_ptr<acc_t>(), chunks, s.C, ptr_or_null<param_t>(weight),
          ptr_or_null<param_t>(bias), ptr_or_null<param_t>(running_mean),
          ptr_or_null<param_t>(running_var), momentum, eps, save_mean.mutable_data_ptr<acc_t>(),
          save_invstd.mutable_data_ptr<acc_t>(), scale, shift,
          rc ? new_rm.mutable_data_ptr<param_t>() : nullptr,
          rc ? new_rv.mutable_data_ptr<param_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      finalize(scalar_t{});  // parameters share x's dtype
    } else {
      if (pdtype == x.scalar_type()) finalize(scalar_t{}); else finalize(float{});
    }
    launch_apply<scalar_t>(s, xp, ptr_or_null<scalar_t>(residual), out.mutable_data_ptr<scalar_t>(),
                           save_mean.const_data_ptr<acc_t>(), scale, shift, relu, sms, stream);
  });
  return {out, save_mean, save_invstd, new_rm, new_rv, scale_t, shift_t};
}

// ---- bn_act_train_backward -------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool relu, bool grad_residual) {
  const Shape s =
      check_bn_act_train_backward(grad_out, x, weight, out, save_mean, save_invstd, relu);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor grad_x = empty_like_layout(x, s.layout);
  at::Tensor grad_w = empty_channels(x, s.C, acc), grad_b = empty_channels(x, s.C, acc);
  at::Tensor grad_res = (relu && grad_residual) ? empty_like_layout(x, s.layout)
                                                : empty_channels(x, 0, x.scalar_type());
  if (s.C == 0) return {grad_x, grad_w, grad_b, grad_res};
  if (s.numel() == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b, grad_res};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  const at::ScalarType pdtype =
      given(weight) ? weight->scalar_type() : x.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "bn_act_train_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* yp = relu ? out->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* mean = save_mean.const_data_ptr<acc_t>();
    const auto reduced = partial_reduce(GradSumOp<scalar_t>{gp, yp, xp, mean}, s, x, stream);
    const at::Tensor& part = reduced.first;
    const int64_t chunks = reduced.second;
    at::Tensor coef = at::empty({3 * s.C}, x.options().dtype(acc));  // k_mean | k_x | w_invstd
    acc_t* k_mean = coef.mutable_data_ptr<acc_t>();
    acc_t* k_x = k_mean + s.C;
    acc_t* w_invstd = k_x + s.C;
    const unsigned grid = static_cast<unsigned>(ceil_div(s.C, kThreads));
    auto finalize = [&](auto tag) {
      using param_t = decltype(tag);
      finalize_grad_kernel<scalar_t, param_t><<<grid, kThreads, 0, stream>>>(
          part.const_data_ptr<acc_t>(), chunks, s.C, static_cast<double>(s.count()),
          ptr_or_null<param_t>(weight), save_invstd.const_data_ptr<acc_t>(),
          grad_w.mutable_data_ptr<acc_t>(), grad_b.mutable_data_ptr<acc_t>(), k_mean, k_x,
          w_invstd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      finalize(scalar_t{});  // parameters share x's dtype
    } else {
      if (pdtype == x.scalar_type()) finalize(scalar_t{}); else finalize(float{});
    }
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* grp = grad_res.numel() ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool nhwc = s.layout == Layout::NHWC;
    if (can_vectorize<scalar_t>(s, {gp, yp, xp, gxp, grp})) {
      grad_input_kernel<scalar_t, kVec><<<grid_1d(s.numel() / kVec, sms), kThreads, 0, stream>>>(
          gp, yp, xp, mean, k_mean, k_x, w_invstd, gxp, grp, s.numel(), s.C, s.HW, nhwc);
    } else {
      grad_input_kernel<scalar_t, 1><<<grid_1d(s.numel(), sms), kThreads, 0, stream>>>(
          gp, yp, xp, mean, k_mean, k_x, w_invstd, gxp, grp, s.numel(), s.C, s.HW, nhwc);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b, grad_res};
}

// ---- scale_shift_act -------------------------------------------------------------------------
at::Tensor scale_shift_act_cuda(const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu,
                                const std::optional<at::Tensor>& center) {
  const Shape s = check_scale_shift_act(x, scale, shift, residual, center);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_like_layout(x, s.layout);
  if (s.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_shift_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_apply<scalar_t>(s, x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual),
                           out.mutable_data_ptr<scalar_t>(), ptr_or_null<acc_t>(center),
                           scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), relu, sms,
                           stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_act_train", &bn_act_train_cuda);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cuda);
  m.impl("scale_shift_act", &scale_shift_act_cuda);
}

}  // namespace resnet_fused
