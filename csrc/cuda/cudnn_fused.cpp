// conv_bn_act_cudnn: one conv -> BN -> (+ residual) -> (ReLU) chain as ONE cuDNN kernel, built with
// cuDNN's graph API (the header-only cuDNN frontend) and its runtime fusion:
//
//   y   = conv_fprop(x, w)                       fp32 accumulator, never written to memory
//   out = relu?(y * scale[c] + shift[c] (+ residual))   pointwise ops in fp32 on the accumulator
//
// x, w, residual and out are NHWC (channels_last) fp16 or bf16; scale and shift fp32 (1, C, 1, 1).
// Groups 1 only (the frontend's conv node has no groups). Compiled only where setup.py found the
// frontend headers (RESNET_FUSED_WITH_CUDNN_FRONTEND); the frontend loads the libcudnn that torch
// has already loaded (dynamic loading: no link-time dependency, the extension imports without it).
//
// Plans: a graph is built, checked and planned (cuDNN's heuristics, mode A) once per problem key
// and device and kept (a small map under a mutex). A problem cuDNN refuses is remembered with its
// reason, which cudnn_fused_support returns so that Python falls back before calling. Execution
// uses torch's cuDNN handle for the current device and stream and a workspace from torch's
// caching allocator on that stream, so CUDA graph capture works.
// Host code that runs once per problem (graph building) or is a thin call (execute): -O1 halves
// the compile time of the frontend's templates (3 -> 1.5 min on 2 cores), which the GPU suite's
// build budget needs.
#pragma GCC optimize("O1")

#include <ATen/ATen.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cudnn_frontend.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

// The frontend's dynamic-loading shim resolves every cuDNN call through this handle.
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace resnet_fused {
namespace {

namespace fe = cudnn_frontend;
using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

// The libcudnn torch uses (already loaded with torch's CUDA libraries), else a fresh dlopen.
std::string load_cudnn() {
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    for (const char* name : {"libcudnn.so.9", "libcudnn.so"}) {
      void*& handle = cudnn_frontend::cudnn_dlhandle;
      handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
      if (handle == nullptr) handle = dlopen(name, RTLD_NOW);
      if (handle != nullptr) return;
    }
    const char* why = dlerror();
    error = std::string("could not load libcudnn.so.9: ") + (why ? why : "unknown error");
  });
  return error;
}

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  TensorPtr x, w, scale, shift, residual, out;
  int64_t workspace = 0;
  std::string error;  // non-empty: cuDNN refused this problem
};

std::vector<int64_t> nhwc_strides(const at::IntArrayRef sizes) {
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  return {h * w * c, 1, w * c, c};
}

std::string problem_key(const at::Tensor& x, const at::Tensor& weight, bool residual,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool relu) {
  std::ostringstream key;
  key << x.get_device() << '|' << x.scalar_type() << '|' << x.sizes() << '|' << weight.sizes()
      << '|' << stride << '|' << padding << '|' << dilation << '|' << residual << relu;
  return key.str();
}

fe::DataType_t io_type(at::ScalarType t) {
  return t == at::kHalf ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16;
}

// What the graph cannot take, before asking cuDNN; "" when the arguments fit.
std::string argument_problem(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& residual) {
  if (!x.is_cuda()) return "conv_bn_act_cudnn runs on CUDA tensors only";
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return std::string("conv_bn_act_cudnn runs fp16/bf16 activations, got ") +
           c10::toString(x.scalar_type());
  if (x.dim() != 4 || weight.dim() != 4) return "conv_bn_act_cudnn expects 4-D x and weight";
  if (weight.size(1) != x.size(1))
    return "conv_bn_act_cudnn runs groups == 1 only (cuDNN's graph conv node has no groups)";
  if (weight.scalar_type() != x.scalar_type() ||
      (residual && residual->scalar_type() != x.scalar_type()))
    return "conv_bn_act_cudnn expects weight and residual in x's dtype";
  return "";
}

Plan build_plan(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                cudnnHandle_t handle) {
  Plan p;
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io_type(x.scalar_type()))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const auto xs = x.sizes().vec(), ws = weight.sizes().vec();
  p.x = graph->tensor(fe::graph::Tensor_attributes().set_name("x").set_dim(xs).set_stride(
      nhwc_strides(x.sizes())));
  p.w = graph->tensor(fe::graph::Tensor_attributes().set_name("w").set_dim(ws).set_stride(
      nhwc_strides(weight.sizes())));
  auto y = graph->conv_fprop(p.x, p.w, fe::graph::Conv_fprop_attributes()
                                           .set_name("conv")
                                           .set_padding(padding.vec())
                                           .set_stride(stride.vec())
                                           .set_dilation(dilation.vec()));
  const int64_t c = ws[0];
  auto channel_vector = [&](const char* name) {
    return graph->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_dim({1, c, 1, 1})
                             .set_stride({c, 1, c, c})
                             .set_data_type(fe::DataType_t::FLOAT));
  };
  p.scale = channel_vector("scale");
  p.shift = channel_vector("shift");
  auto pointwise = [&](TensorPtr a, TensorPtr b, fe::PointwiseMode_t mode) {
    return graph->pointwise(a, b, fe::graph::Pointwise_attributes().set_mode(mode));
  };
  TensorPtr out = pointwise(pointwise(y, p.scale, fe::PointwiseMode_t::MUL), p.shift,
                            fe::PointwiseMode_t::ADD);
  if (residual) {
    p.residual = graph->tensor(fe::graph::Tensor_attributes()
                                   .set_name("residual")
                                   .set_dim(residual->sizes().vec())
                                   .set_stride(nhwc_strides(residual->sizes())));
    out = pointwise(out, p.residual, fe::PointwiseMode_t::ADD);
  }
  if (relu)
    out = graph->pointwise(out, fe::graph::Pointwise_attributes().set_mode(
                                    fe::PointwiseMode_t::RELU_FWD));
  out->set_output(true).set_data_type(io_type(x.scalar_type()));
  p.out = out;
  auto status = graph->validate();
  if (status.is_good()) status = graph->build_operation_graph(handle);
  if (status.is_good()) status = graph->create_execution_plans({fe::HeurMode_t::A});
  if (status.is_good()) status = graph->check_support(handle);
  if (status.is_good()) status = graph->build_plans(handle);
  if (status.is_good()) status = graph->get_workspace_size(p.workspace);
  if (!status.is_good()) {
    p.error = "cuDNN refused the fused graph: " + status.get_message();
    return p;
  }
  p.graph = std::move(graph);
  return p;
}

std::mutex plans_mutex;
std::unordered_map<std::string, std::shared_ptr<Plan>> plans;

std::shared_ptr<Plan> plan_for(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const std::string key =
      problem_key(x, weight, residual.has_value(), stride, padding, dilation, relu);
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto plan = std::make_shared<Plan>();
  const std::string dl = load_cudnn();
  if (!dl.empty()) {
    plan->error = dl;
  } else {
    try {
      *plan = build_plan(x, weight, residual, stride, padding, dilation, relu,
                         at::native::getCudnnHandle());
    } catch (const std::exception& e) {  // the frontend throws on a missing symbol
      plan->error = std::string("building the cuDNN fused graph failed: ") + e.what();
    }
  }
  plans.emplace(key, plan);
  return plan;
}

std::string cudnn_fused_support(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool relu) {
  std::string problem = argument_problem(x, weight, residual);
  if (!problem.empty()) return problem;
  const c10::cuda::CUDAGuard guard(x.device());
  return plan_for(x, weight, residual, stride, padding, dilation, relu)->error;
}

at::Tensor conv_bn_act_cudnn(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual_in,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, bool relu) {
  const std::string problem = argument_problem(x_in, weight_in, residual_in);
  TORCH_CHECK(problem.empty(), problem);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv_bn_act_cudnn: stride, padding and dilation must have two values each");
  const int64_t c_out = weight_in.size(0);
  for (const at::Tensor* t : {&scale, &shift}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->numel() == c_out,
                "conv_bn_act_cudnn: expected fp32 CUDA scale/shift of ", c_out,
                " elements, got ", t->scalar_type(), " of ", t->numel());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl), weight = weight_in.contiguous(cl);
  std::optional<at::Tensor> residual;
  if (residual_in) residual = residual_in->contiguous(cl);
  const auto plan = plan_for(x, weight, residual, stride, padding, dilation, relu);
  TORCH_CHECK(plan->error.empty(), "conv_bn_act_cudnn: ", plan->error);
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) /
                         stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) /
                         stride[1] + 1;
  at::Tensor out = at::empty({x.size(0), c_out, oh, ow}, x.options(), cl);
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "conv_bn_act_cudnn: expected residual of ",
                "shape ", out.sizes(), ", got ", residual->sizes());
  }
  const at::Tensor scale_c = scale.contiguous(), shift_c = shift.contiguous();
  std::unordered_map<TensorPtr, void*> pack = {
      {plan->x, x.data_ptr()},          {plan->w, weight.data_ptr()},
      {plan->scale, scale_c.data_ptr()}, {plan->shift, shift_c.data_ptr()},
      {plan->out, out.data_ptr()}};
  if (residual) pack.emplace(plan->residual, residual->data_ptr());
  // on the current stream: torch's allocator keeps it alive for the kernels queued there
  at::Tensor workspace = at::empty({std::max<int64_t>(plan->workspace, 1)},
                                   x.options().dtype(at::kByte));
  cudnnHandle_t handle = at::native::getCudnnHandle();  // current device, current stream
  auto status = plan->graph->execute(handle, pack, workspace.data_ptr());
  TORCH_CHECK(status.is_good(), "conv_bn_act_cudnn: cuDNN failed to run the fused graph: ",
              status.get_message());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act_cudnn", &conv_bn_act_cudnn);
  m.impl("cudnn_fused_support", &cudnn_fused_support);
}

}  // namespace resnet_fused
