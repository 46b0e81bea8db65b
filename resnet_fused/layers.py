"""One conv -> BN (-> + residual) (-> ReLU) chain, the unit every ResNet block is made of.

`conv_bn` is the one place that decides how a chain runs, for train and eval alike:
- hooks (on conv, bn, the activation, or global), an activation that is not nn.ReLU, ONNX export
  or meta tensors: torchvision's module sequence (`module_chain`);
- train mode, or a norm layer that cannot be folded: `training.train_chain`;
- eval, captured (torch.compile, torch.fx, torch.jit.trace): `graph_chain`, one recorded call
  that folds from the parameters when it runs (never a baked fold); but jit.trace where autograd
  records: `grad_chain` (it cannot record graph_chain's Python autograd function);
- eval, eager: the cached fold (fold.py) and the backend resolved once, straight to the kernel;
  with parameters that require grad (frozen-statistics fine-tuning): `grad_chain`.
Under `auto`, where the resolved backend does not beat stock's modules, stock's modules run.
Inside torch.func transforms (`transformed`) the models never get here: their blocks run
torchvision's module sequence.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, extension, extension_ops, fold as folding
from .ops import apply, check_inputs, empty_output, out_hw, run
from .training import bn_tail, eval_grad_fuses, train_chain


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convs run in: autocast's when it is on (as stock conv), else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point \
            and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fold_sources(conv: nn.Module, bn: nn.Module) -> Optional[folding.Sources]:
    """The tensors the fold reads (folding.sources) when conv -> bn can run as one folded
    conv_bn_act call right now, else None."""
    if (bn.training or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)):
        return None
    tensors = folding.sources(conv, bn)  # (one read of each; the fold's cache key is in it)
    return tensors if folding.foldable(bn, tensors) else None


def observed(*modules: Optional[nn.Module]) -> bool:
    """True when calling the modules would do more than their math: hooks on any of them or
    global module hooks, which a fused call would skip. (nn.Module keeps hooks in private dicts;
    a torch without them counts as hooked: unfused but correct.)"""
    try:
        registry = torch.nn.modules.module
        if (registry._global_forward_hooks or registry._global_forward_pre_hooks
                or registry._global_backward_hooks or registry._global_backward_pre_hooks):
            return True
        for m in modules:  # (every call of every chain asks: plain attribute reads)
            if m is not None and (m._forward_hooks or m._forward_pre_hooks
                                  or m._backward_hooks or m._backward_pre_hooks):
                return True
    except AttributeError:
        return True
    return False


@functools.lru_cache(maxsize=None)
def _transform_query() -> Optional[Callable[[], bool]]:
    """torch's (private) question "is a torch.func transform running?", if it answers True inside
    vmap here (a self-check, made once); else None."""
    query = getattr(torch._C, "_are_functorch_transforms_active", None)
    if query is None:
        return None
    seen: List[object] = []
    try:
        torch.func.vmap(lambda t: seen.append(query()) or t)(torch.zeros(1))
    except Exception:  # any failure of a private API means: do not use it
        return None
    return query if seen == [True] else None


def transformed() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, functional per-sample gradients):
    our ops have no batching rules and the extension's C++ autograd functions cannot be
    transformed, so the models run torchvision's module sequence there (stock's speed, stock's
    results). Where torch cannot say (a torch without the query), False: our path, which then
    fails as torch reports it. While torch.compile or jit.trace captures, False: asked there,
    the self-check's vmap would be captured too."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    query = _transform_query()
    return query is not None and query()


def module_chain(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                 residual: Optional[torch.Tensor], act: Optional[nn.Module]) -> torch.Tensor:
    """Exactly torchvision's sequence of module calls (hooks fire, any activation module)."""
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return act(out) if act is not None else out


def _conv_bn_eval(x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                  bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                  running_mean: torch.Tensor, running_var: torch.Tensor,
                  num_batches_tracked: Optional[torch.Tensor], eps: float,
                  residual: Optional[torch.Tensor], stride: List[int], padding: List[int],
                  dilation: List[int], groups: int, relu: bool,
                  backend: Optional[str]) -> torch.Tensor:
    """The eval chain from the module's own tensors, folded through the one cache when it runs
    (no autograd formula). `backend` None: resolve the selection when it runs."""
    tensors = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
               num_batches_tracked)
    if folding.needs_grad((x, residual, *tensors)):  # (only conv_bn_eval_nograd can get here)
        raise RuntimeError("resnet_fused::conv_bn_eval_nograd: an input requires grad, and the "
                           "op has no autograd formula (graphs call it only where none does)")
    if backend is None:
        backend = backends.resolve(x.device)
    prepared = folding.cached(backend, x.dtype, tensors, eps)
    return run(backend, prepared, x, residual, stride, padding, dilation, groups, relu)


def _conv_bn_eval_fake(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                       num_batches_tracked, eps, residual, stride, padding, dilation, groups,
                       relu, backend):
    return empty_output(x, weight, stride, padding, dilation)


# The eval chain op of traced and exported graphs (jit.trace, torch.export), which may run later
# in any grad mode: a custom_op, whose forward runs where inputs require grad and whose backward
# raises a clear error.
conv_bn_eval = torch.library.custom_op("resnet_fused::conv_bn_eval",
                                       mutates_args=())(_conv_bn_eval)
conv_bn_eval.register_fake(_conv_bn_eval_fake)

# The same kernel for torch.compile's graphs, which are guarded on grad mode and requires_grad:
# where they call it nothing needs grad, ever. A plain torch.library schema + kernel, without
# custom_op's Python autograd and dispatch wrappers: ~10 us a call, which made a compiled
# resnet50 at batch 1 1-3% slower than the eager fused model.
_LIB = torch.library.Library("resnet_fused", "FRAGMENT")
_LIB.define("conv_bn_eval_nograd" + torch.library.infer_schema(_conv_bn_eval, mutates_args=()))
_LIB.impl("conv_bn_eval_nograd", _conv_bn_eval, "CompositeExplicitAutograd")
torch.library.register_fake("resnet_fused::conv_bn_eval_nograd")(_conv_bn_eval_fake)
conv_bn_eval_nograd = torch.ops.resnet_fused.conv_bn_eval_nograd.default


@torch.fx.wrap  # one call_function node in an FX graph; runs (fused) when the graph runs
def graph_chain(x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: torch.Tensor, running_var: torch.Tensor,
                num_batches_tracked: Optional[torch.Tensor], eps: float,
                residual: Optional[torch.Tensor], stride: List[int], padding: List[int],
                dilation: List[int], groups: int, relu: bool) -> torch.Tensor:
    """The eval chain as a captured graph records it (torch.compile, fx, jit.trace, export).
    An exported program resolves the backend where it runs (export traces with oneDNN off)."""
    dtype = compute_dtype(x)
    exporting = torch.compiler.is_exporting()
    backend = None if exporting else backends.resolve(x.device, dtype=dtype)
    if backend == backends.MODULES:  # stock's functional ops, as its modules call them
        out = F.batch_norm(F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups),
                           running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    x = x.to(dtype)
    residual = None if residual is None else residual.to(dtype)
    tensors = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
               num_batches_tracked)
    if not folding.needs_grad((x, residual, *tensors)):
        # (torch 2.11's dynamo answers is_exporting() True under torch.compile too: there
        # compiled graphs call the custom_op, correct but ~10 us a chain slower)
        op = (conv_bn_eval_nograd if torch.compiler.is_compiling() and not exporting
              else conv_bn_eval)
        return op(x, *tensors, eps, residual, stride, padding, dilation, groups, relu, backend)
    # autograd records (the parameters' grads, or only the input's: saliency through a frozen
    # model): the fold and the differentiable op in the graph
    prepared = folding.build(dtype, tensors, eps)
    if not torch.jit.is_tracing():  # (jit.trace: shapes are the example's, checks are noise)
        # (attributes, not `*prepared`: torch 2.11's dynamo cannot unpack a user-defined
        # iterable)
        check_inputs(x, prepared.weight, prepared.scale, prepared.shift, residual, stride,
                     padding, dilation, groups)
    return apply(backend, prepared, x, residual, stride, padding, dilation, groups, relu)


def _stock_only(x, capturing: bool) -> bool:
    """ONNX export (standard ONNX ops, not our custom op) or meta tensors (shapes only).
    `capturing`: torch.compile or torch.jit.trace is running."""
    if isinstance(x, torch.Tensor) and x.is_meta:
        return True
    # both ONNX exporters trace (jit.trace or torch.export): ask the slower question only then
    return (capturing or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export()


def conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
            residual: Optional[torch.Tensor] = None,
            act: Optional[nn.Module] = None) -> torch.Tensor:
    """One chain of a torchvision ResNet: act?(bn(conv(x)) + residual), `act` the block's ReLU
    module (None: no activation); how it runs is in the module docstring. (Every chain of every
    call runs this: each question is asked once, cheapest first; benchmarks/bench_host.py.)"""
    if observed(conv, bn, act) or (act is not None and type(act) is not nn.ReLU):
        return module_chain(conv, bn, x, residual, act)
    tracing = torch.jit.is_tracing()
    capturing = tracing or torch.compiler.is_compiling()
    if _stock_only(x, capturing):
        return module_chain(conv, bn, x, residual, act)
    relu = act is not None
    symbolic = isinstance(x, torch.fx.Proxy)
    tensors = fold_sources(conv, bn)
    if tensors is None:
        if symbolic or tracing:
            return module_chain(conv, bn, x, residual, act)
        return train_chain(conv, bn, x, residual, relu)  # (compiled too: its ops are custom ops)
    if tracing and folding.needs_grad((x, residual, *tensors)):
        # jit.trace records ops, not Python autograd functions: the eval chain with autograd
        # (stock's conv, then the extension's op with its C++ autograd) traces and backprops
        return grad_chain(conv, x, tensors, bn.eps, residual, relu, compute_dtype(x))
    if capturing or symbolic:
        return graph_chain(x, *tensors, bn.eps, residual, list(conv.stride), list(conv.padding),
                           list(conv.dilation), conv.groups, relu)
    weight = tensors[0]
    dtype = compute_dtype(x)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"resnet_fused: expected input dtype {weight.dtype} (the model's "
                        f"parameters), got {x.dtype}")
    backend = backends.resolve(x.device, dtype=dtype)
    if backend == backends.MODULES:
        # stock's ops are faster here; run them on the cached channels_last weight (the model's
        # own NCHW weight would be reordered by every conv)
        weight = folding.prepared("torch", dtype, tensors, bn.eps).weight
        y = F.conv2d(x, weight, tensors[1], conv.stride, conv.padding, conv.dilation,
                     conv.groups)
        return bn_tail(bn, y, residual, relu)
    if folding.needs_grad(tensors):
        return grad_chain(conv, x, tensors, bn.eps, residual, relu, dtype)
    prepared = folding.cached(backend, dtype, tensors, bn.eps)
    if dtype != x.dtype:  # autocast casts, as stock conv does
        x = x.to(dtype)
        residual = None if residual is None else residual.to(dtype)
    if not _consistent(conv, weight, x, residual):  # odd inputs: full checks, clear errors
        check_inputs(x, *prepared, residual, conv.stride, conv.padding, conv.dilation,
                     conv.groups)
    return apply(backend, prepared, x, residual, conv.stride, conv.padding, conv.dilation,
                 conv.groups, relu, capturing=False)


def grad_chain(conv: nn.Conv2d, x: torch.Tensor, tensors: folding.Sources, eps: float,
               residual: Optional[torch.Tensor], relu: bool, dtype: torch.dtype) -> torch.Tensor:
    """An eval-mode chain whose parameters require grad (fine-tuning with frozen BatchNorm
    statistics, as detection backbones do; also any eval forward outside torch.no_grad()):
    stock's conv, whose backward gives both of its grads in one call, then BN (+ residual) (+
    ReLU) as one op, `bn_eval_act`, with one autograd node and a one-sweep backward (extension,
    where the policy has it measured no slower: training.eval_grad_fuses; stock's ops
    elsewhere). The fused conv op would recompute the conv in its backward for the BN weight's
    grad; a fold in Python would record its own small ops per call."""
    weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, _ = tensors
    if dtype != x.dtype:  # autocast casts, as stock conv does
        x = x.to(dtype)
        weight, conv_bias = weight.to(dtype), None if conv_bias is None else conv_bias.to(dtype)
        residual = None if residual is None else residual.to(dtype)
    y = F.conv2d(x, weight, conv_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if extension.unavailable_reason(y.device) is None and eval_grad_fuses(y):
        if residual is not None:
            residual = residual.contiguous(memory_format=extension_ops.memory_format(y))
        return extension_ops.bn_eval_act(y, bn_weight, bn_bias, running_mean, running_var, eps,
                                         residual, relu)
    out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _consistent(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor,
                residual: Optional[torch.Tensor]) -> bool:
    """The few facts the fold does not already guarantee (the weight, scale and shift are built
    from conv/bn on conv's device): a 4-D x with conv's channels on its device, and a residual
    of the output's shape, dtype and device."""
    if x.dim() != 4 or x.shape[1] != conv.in_channels or x.device != weight.device:
        return False
    if residual is None:
        return True
    if residual.dtype != x.dtype or residual.device != x.device:
        return False
    return tuple(residual.shape) == (x.shape[0], conv.out_channels, *out_hw(
        x.shape[2], x.shape[3], conv.kernel_size, conv.stride, conv.padding, conv.dilation))
