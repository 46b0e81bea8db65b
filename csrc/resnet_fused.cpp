// The resnet_fused operator library: every schema is declared once, here.
// Implementations: cpu/bn_act.cpp (CPU) and cuda/bn_act.cu (CUDA, when built with nvcc);
// bn_eval.cpp: bn_eval_act and bn_eval_fold for every device, from the other ops.
// Autograd: autograd.cpp. Fake (meta) kernels: in Python, resnet_fused/extension_ops.py.
//
// This file is also the Python module `resnet_fused._C`: importing it loads the library (which
// registers the ops) and exposes what was built, for `python -m resnet_fused info`.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

#if __has_include("resnet_fused_build_info.h")  // written by setup.py
#include "resnet_fused_build_info.h"
#endif
#ifndef RESNET_FUSED_CUDA_ARCHS
#define RESNET_FUSED_CUDA_ARCHS ""
#endif
#ifndef RESNET_FUSED_TORCH_VERSION
#define RESNET_FUSED_TORCH_VERSION ""
#endif
#ifndef RESNET_FUSED_CUDA_VERSION
#define RESNET_FUSED_CUDA_VERSION ""
#endif
#ifndef RESNET_FUSED_CUDNN_FRONTEND
#define RESNET_FUSED_CUDNN_FRONTEND ""  // the frontend version conv_bn_act_cudnn was built with
#endif

TORCH_LIBRARY(resnet_fused, m) {
  // Training-mode BatchNorm2d (+ residual) (+ ReLU), functional:
  //   out = relu?((x - mean) * invstd * weight + bias + residual), batch statistics per channel
  //   (biased variance for normalising), fp32 (fp64 for fp64 x).
  //   new_running_* = (1 - momentum) * running_* + momentum * batch stat (unbiased variance);
  //   empty when running stats are None. The caller copies them into its buffers.
  //   scale/shift: the factors `out` was computed with, out = relu?((x - save_mean) * scale +
  //   shift + residual), so that scale_shift_act(x, scale, shift, residual, relu, save_mean)
  //   recomputes `out` bit for bit (stage_recompute.py) without a second statistics pass.
  m.def(
      "bn_act_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? running_mean, Tensor? running_var, float momentum, float eps, bool relu) -> "
      "(Tensor out, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, "
      "Tensor new_running_var, Tensor scale, Tensor shift)");
  // Its backward. `out` (the forward output) gives the ReLU mask; grad_residual (the masked
  // grad) is written only when relu and grad_residual, else it is empty. grad_weight/grad_bias
  // are in x's arithmetic dtype (fp32, fp64 for fp64).
  m.def(
      "bn_act_train_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? out, "
      "Tensor save_mean, Tensor save_invstd, bool relu, bool grad_residual) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // out = relu?((x - center[c]) * scale[c] + shift[c] + residual): the conv_bn_act epilogue
  // (center None: 0), and bn_act_train's output again from its save_mean, scale and shift.
  m.def("scale_shift_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
        "Tensor? center=None) -> Tensor");
  // Its backward (CPU): with g the grad below the ReLU (zero where out <= 0), grad_x = g * scale,
  // grad_scale = sum g * (x - center), grad_shift = sum g per channel (fp32, fp64 for fp64 x)
  // and the residual's grad g (written only when relu and grad_residual, else empty).
  m.def("scale_shift_act_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor? out, bool relu, "
        "bool grad_residual, Tensor? center=None) -> (Tensor grad_x, Tensor grad_scale, "
        "Tensor grad_shift, Tensor grad_residual)");
  // Eval-mode BatchNorm (frozen statistics) (+ residual) (+ ReLU) from BN's own tensors, as
  // stock's batch_norm(training=False) takes them: relu?((x - running_mean) * weight /
  // sqrt(running_var + eps) + bias + residual). scale_shift_act with the fold done inside, so
  // autograd records one node (every input differentiable, as in stock's batch_norm).
  m.def("bn_eval_act(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps, Tensor? residual, bool relu) -> Tensor");
  // Its fold, per channel in x's arithmetic dtype: inv_std = 1 / sqrt(running_var + eps),
  // scale = weight * inv_std, shift = bias (0 when None), center = running_mean. Not
  // differentiable (bn_eval_act's autograd differentiates the fold itself). A CPU kernel (one
  // loop: four torch ops cost ~10 us of host time per chain) and torch ops elsewhere.
  m.def("bn_eval_fold(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps) -> (Tensor inv_std, Tensor scale, Tensor shift, "
        "Tensor center)");
  // One conv -> scale -> shift (-> + residual) (-> ReLU) chain as ONE cuDNN kernel (the graph
  // API's runtime fusion; fp32 pointwise math on the accumulator): NHWC fp16/bf16 x, weight and
  // residual, fp32 scale/shift, channels_last output in x's dtype; groups 1. CUDA only, in builds
  // with the cuDNN frontend headers (cuda/cudnn_fused.cpp). Raises where cuDNN refuses the graph.
  m.def("conv_bn_act_cudnn(Tensor x, Tensor weight, Tensor scale, Tensor shift, "
        "Tensor? residual, int[] stride, int[] padding, int[] dilation, bool relu) -> Tensor");
  // "" when conv_bn_act_cudnn runs this problem (its plan is then built and cached), else why
  // not: the arguments, or cuDNN's refusal of the graph.
  m.def("cudnn_fused_support(Tensor x, Tensor weight, Tensor? residual, int[] stride, "
        "int[] padding, int[] dilation, bool relu) -> str");
}

// What the Python package checks before it uses the library (resnet_fused/extension.py,
// OPS_VERSION): bump it when the ops or their split between C++ and Python change. 2: autograd
// in C++. 3: bn_eval_act and bn_eval_fold, scale_shift_act_backward's center.
constexpr long kOpsVersion = 3;

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "resnet_fused operator library (loads the ops)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef RESNET_FUSED_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "ops_version", kOpsVersion) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", RESNET_FUSED_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(module, "cuda_version", RESNET_FUSED_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", RESNET_FUSED_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cudnn_frontend", RESNET_FUSED_CUDNN_FRONTEND) < 0 ||
      // which CPU kernel table runs here (reads cpuid and $ATEN_CPU_CAPABILITY; no GPU)
      PyModule_AddStringConstant(module, "cpu_kernels", resnet_fused::cpu::kernels().isa) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
