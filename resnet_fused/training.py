"""Training-mode chains: torchvision's semantics, with BN(+residual)(+ReLU) as one fused op of
the extension where that is exact (`bn_act_supported`), available, and measured faster than
stock on the device type (`train_bn_choice`, the policy).

Whether a chain may be fused at all (hooks, activation type) is decided once for train and eval
by layers.conv_bn; this module decides only what the BatchNorm itself allows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import extension, extension_ops
from .settings import env_choice


_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The policy. Device types where bn_act_train (forward + backward) is measured faster than stock
# batch_norm + add + relu, and a whole train step no slower (benchmarks/RESULTS.md, "Training"):
# the activation dtypes where it wins, and the smallest tensor (elements; NCHW, channels_last)
# where it still does: below that the op's fixed cost outweighs the memory passes it saves
# (channels_last won at every size measured, 2^11 the smallest; NCHW lost on tiny planes).
# Stock BatchNorm runs everywhere else (CPU bf16 0.97-1.71x, fp16 0.33-0.42x: not fused).
TRAIN_BN_ENV = "RESNET_FUSED_TRAIN_BN"  # auto (the policy) | fused | stock
TRAIN_BN_CHOICES = ("auto", "fused", "stock")
MEASURED_FASTER = {"cpu": ((torch.float32, torch.float64), (1 << 16, 1 << 11))}
# Eval mode with autograd (frozen statistics: layers.grad_chain): the activation dtypes per
# device type where the extension's bn_eval_act is measured no slower than stock batch_norm +
# add + relu at every size tried (CPU fp32 0.99-2.9x, fp64 1.2-2.1x, forward and forward +
# backward; bf16 dipped to 0.87x, fp16 0.3-0.6x: benchmarks/RESULTS.md, "Eval mode with
# autograd"); stock's ops elsewhere. $RESNET_FUSED_TRAIN_BN forces either way here too: the
# same question, BatchNorm kernels under autograd.
EVAL_GRAD_MEASURED = {"cpu": (torch.float32, torch.float64)}
# The layout of an NCHW model's activations in training and wherever autograd records (the
# chains run stock's conv on the module's own weights): channels_last activations with NCHW
# weights make every conv reorder its weight (and, in the backward, its weight's grad), a cost
# per call that the faster channels_last convs repay only on large activations, the sooner the
# more of the work is 1x1 convs (GEMMs in channels_last). So they stay as given below this many
# input pixels (N*H*W) and go channels_last from it, per (device type, dtype) and model design
# (block class, groups, width per group). Measured on CPU fp32, 224x224 unless said, converting
# / keeping vs torchvision NCHW as eval forward, forward + backward (benchmarks/RESULTS.md):
#   resnet50: batch 2 0.96, 0.97x / 1.04, 0.98x; 3 1.05, 1.03x / 1.00, 0.97x; 8 1.12, 1.10x /
#     0.99, 1.01x; 448x448 batch 1 1.06, 1.05x / 0.96, 1.00x; train step batch 2 1.09x / 1.10x,
#     4 1.07x / 1.03x, 8 1.18x / 1.07x. resnet101: batch 2 0.97, 0.97x / 0.99, 1.03x; 4 1.09,
#     1.05x / 0.98, 1.02x. resnet50 with replace_stride_with_dilation=[False, True, True] (the
#     same key; forward + backward, train step): batch 1 0.98x / 1.02x; 2 0.99x, 1.04x / 0.99x,
#     1.03x; 3 1.01x, 1.05x / 0.99x, 1.03x.
#   resnext50_32x4d: batch 2 0.96, 1.02x / 0.99, 0.99x; 4 1.05, 1.09x / 0.98, 1.00x.
#   resnet18: batch 4 0.94, 1.03x / 0.96, 1.06x; 5 1.01, 1.02x / 1.00, 0.94x; 8 1.16, 1.12x /
#     0.98, 1.02x; train step batch 4 0.95x / 1.04x, 8 1.10x / 0.98x. resnet34: batch 4 1.01,
#     0.98x / 1.01, 1.01x; 8 1.04, 1.04x / 0.98, 0.99x.
#   wide_resnet50_2: batch 4 0.94, 1.02x / 1.01, 1.00x; 6 0.97, 1.00x / 1.03, 1.00x; 8 0.99,
#     1.05x / 0.99, 0.99x.
# Other dtypes (and autocast), devices and designs (resnext101_32x8d, resnext101_64x4d): not
# measured, kept as given.
GRAD_CHANNELS_LAST_FROM = {("cpu", torch.float32): {
    ("Bottleneck", 1, 64): 125_000,  # resnet50/101/152
    ("Bottleneck", 32, 4): 125_000,  # resnext50_32x4d
    ("BasicBlock", 1, 64): 240_000,  # resnet18/34
    ("Bottleneck", 1, 128): 350_000,  # wide_resnet50_2/101_2
}}


def _setting() -> str:
    return env_choice(TRAIN_BN_ENV, TRAIN_BN_CHOICES, "auto")


def train_bn_choice(device: torch.device) -> str:
    """"fused" or "stock": what training-mode BatchNorm runs on `device` when the chain allows
    fusion and the tensor is large enough ($RESNET_FUSED_TRAIN_BN, default auto: fused where
    MEASURED_FASTER)."""
    setting = _setting()
    if setting == "auto":
        return "fused" if device.type in MEASURED_FASTER else "stock"
    return setting


def _policy_fuses(x: torch.Tensor) -> bool:
    """The policy for this tensor: the device's choice, and under auto its size threshold."""
    setting = _setting()
    if setting != "auto":
        return setting == "fused"
    measured = MEASURED_FASTER.get(x.device.type)
    if measured is None or x.dtype not in measured[0]:
        return False
    return x.numel() >= measured[1][0 if x.is_contiguous() else 1]


def eval_grad_fuses(y: torch.Tensor) -> bool:
    """Whether an eval-mode chain that autograd records runs BN (+ residual) (+ ReLU) on the conv
    output `y` as the extension's bn_eval_act (else stock's ops)."""
    setting = _setting()
    if setting != "auto":
        return setting == "fused"
    return y.dtype in EVAL_GRAD_MEASURED.get(y.device.type, ())


def grad_channels_last(x: torch.Tensor, design: Optional[tuple]) -> bool:
    """Whether a training forward, or one that autograd records, of an NCHW model of `design`
    (block class name, groups, width per group) turns the activations of its input `x` (N, C, H,
    W) channels_last (GRAD_CHANNELS_LAST_FROM: by device type and dtype, never under
    autocast)."""
    least = GRAD_CHANNELS_LAST_FROM.get((x.device.type, x.dtype), {}).get(design)
    return (least is not None and not torch.is_autocast_enabled(x.device.type)
            and x.shape[0] * x.shape[2] * x.shape[3] >= least)


def eval_grad_report(device: torch.device) -> str:
    """One line for `info`: what eval-mode BatchNorm runs on `device` when autograd records."""
    reason = extension.unavailable_reason(device)
    setting = _setting()
    dtypes = "/".join(str(d)[6:] for d in EVAL_GRAD_MEASURED.get(device.type, ()))
    if setting == "stock" or (setting == "auto" and not dtypes):
        why = (f"${TRAIN_BN_ENV}=stock" if setting == "stock" else
               "bn_eval_act is not measured no slower here yet")
        return f"stock conv + BatchNorm + add + ReLU ({why})"
    if reason is not None:
        return f"stock conv + BatchNorm + add + ReLU (extension unavailable: {reason})"
    if setting == "fused":
        return f"stock conv + fused bn_eval_act (${TRAIN_BN_ENV}=fused)"
    return (f"stock conv + fused bn_eval_act for {dtypes} (measured no slower than stock); "
            f"stock BatchNorm + add + ReLU for other dtypes")


def train_bn_report(device: torch.device) -> str:
    """One line for `info`: what training-mode BatchNorm runs on `device`, and why."""
    choice = train_bn_choice(device)
    reason = extension.unavailable_reason(device)
    if choice == "stock":
        why = (f"${TRAIN_BN_ENV}=stock" if _setting() == "stock" else
               "the fused kernels are not measured faster here yet")
        return f"stock BatchNorm + add + ReLU ({why})"
    if reason is not None:
        return f"stock BatchNorm + add + ReLU (extension unavailable: {reason})"
    if _setting() == "fused":
        return f"fused bn_act_train (${TRAIN_BN_ENV}=fused)"
    dtypes, (nchw, nhwc) = MEASURED_FASTER[device.type]
    names = "/".join(str(d)[6:] for d in dtypes)
    return (f"fused bn_act_train (measured faster than stock) for {names} tensors of >= {nchw} "
            f"elements (NCHW) / {nhwc} (channels_last); stock below and for other dtypes")


def bn_act_supported(bn: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """True when relu?(bn(x) + residual) can run as one bn_act_train with torch's exact
    semantics: a plain nn.BatchNorm2d in training mode (subclasses such as SyncBatchNorm, and
    anything else, keep the stock path), a 4-D float x with more than one value per channel, a
    residual like x, the policy choosing the fused kernels on x's device (train_bn_choice) and
    the extension built for it. (Hooks: layers.conv_bn's rule.)"""
    if type(bn) is not nn.BatchNorm2d or not bn.training:
        return False
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _ACTIVATION_DTYPES:
        return False
    n, c, h, w = x.shape
    if c != bn.num_features or n * h * w <= 1:
        return False
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False
    if not _policy_fuses(x):
        return False
    # (every training chain asks: the module dicts read directly, no set building)
    params, buffers = bn._parameters, bn._buffers
    stats = ((buffers.get("running_mean"), buffers.get("running_var"))
             if bn.track_running_stats else (None, None))
    if (stats[0] is None) != (stats[1] is None):
        return False
    dtype = None  # the one dtype of the parameters and running stats
    for t in (params.get("weight"), params.get("bias"), *stats):
        if t is not None:
            if dtype is not None and t.dtype != dtype:
                return False
            dtype = t.dtype
    if dtype is not None and dtype != x.dtype and not (
            dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    return extension.unavailable_reason(x.device) is None


def momentum_factor(bn: nn.BatchNorm2d) -> float:
    """The running-stat update's factor for this training step, as torch's _BatchNorm.forward:
    counts the step in num_batches_tracked; momentum=None is the cumulative average."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                   relu: bool = True) -> torch.Tensor:
    """relu?(bn(x) + residual) for a training-mode nn.BatchNorm2d, as torch's _BatchNorm.forward
    does it (num_batches_tracked, momentum=None as a cumulative average), in one fused op.
    Call only where bn_act_supported(bn, x, residual)."""
    return batch_norm_act_factors(bn, x, residual, relu)[0]


def batch_norm_act_factors(bn: nn.BatchNorm2d, x: torch.Tensor,
                           residual: Optional[torch.Tensor], relu: bool):
    """batch_norm_act's output and what it was computed from: (out, (save_mean, save_invstd,
    scale, shift)); extension_ops.scale_shift_act(x, scale, shift, residual, relu, save_mean)
    gives `out` again, bit for bit."""
    factor = momentum_factor(bn)
    # (a plain nn.BatchNorm2d, bn_act_supported says: its tensors straight from the module dicts)
    params, buffers = bn._parameters, bn._buffers
    running_mean = buffers.get("running_mean") if bn.track_running_stats else None
    running_var = buffers.get("running_var") if bn.track_running_stats else None
    x, residual = kernel_layout(x, residual)
    out, mean, invstd, new_mean, new_var, scale, shift = extension_ops.bn_act_train(
        x, params["weight"], params["bias"], residual, running_mean, running_var, factor, bn.eps,
        relu)
    if running_mean is not None:  # (buffers and non-differentiable outputs: nothing to record)
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return out, (mean, invstd, scale, shift)


def kernel_layout(x: torch.Tensor, residual: Optional[torch.Tensor]):
    """x contiguous in NCHW or channels_last (as it is, where it is either), the residual in x's
    layout: what bn_act_train takes."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=extension_ops.memory_format(x))
    return x, residual


def train_chain(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """torchvision's semantics: conv, bn, += residual, relu. With a plain nn.BatchNorm2d in
    training mode and the extension built, BN(+residual)(+ReLU) is one fused bn_act_train
    (same statistics, running-stat updates and gradients); otherwise the stock op sequence."""
    y = conv(x)
    if bn_act_supported(bn, y, residual):
        return batch_norm_act(bn, y, residual, relu)
    return bn_tail(bn, y, residual, relu)


def bn_tail(bn: nn.Module, y: torch.Tensor, residual: Optional[torch.Tensor],
            relu: bool) -> torch.Tensor:
    """bn(y) (+ residual) (-> ReLU) with stock ops, in place as torchvision does (`out` is bn's
    fresh output)."""
    out = bn(y)
    if residual is not None:
        out += residual
    return torch.relu_(out) if relu else out
