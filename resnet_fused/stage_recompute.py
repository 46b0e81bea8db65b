"""Memory-lean training of a ResNet stage (torchvision's layer1..layer4): one autograd node per
stage that keeps only the stage's input, each conv's output (its BatchNorm's input) and the
stage's output (the next stage's input, kept there anyway), and in the backward pass recomputes
BatchNorm, the residual adds and the ReLUs from them. No conv is recomputed: their outputs are
what is kept.

torchvision keeps, per bottleneck of width w, every BN input and every ReLU output (the next
conv's input and the ReLU's mask): 12 w-channel maps. This keeps the three BN inputs (6, plus
the downsample's), and resnet50's saved activations fall to about 0.65x of torchvision's
(benchmarks/RESULTS.md, "Training").

Recomputing is one pass per chain: scale_shift_act applies the factors the forward's fused
bn_act_train computed its output with (save_mean, scale, shift) in the same element loops, so
each recomputed tensor is bitwise the forward's. Chains whose BatchNorm runs stock (the training
policy's choice, training.bn_act_supported, as on the per-chain path) keep their outputs:
recomputing those would rerun the statistics. The backward calls the ops autograd calls on the
per-chain path (convolution_backward, bn_act_train_backward or native_batch_norm_backward after
threshold_backward), so gradients, outputs and running statistics are the per-chain path's
bit for bit (tests/test_stage_recompute.py).

Used only where nothing can tell the difference (`supported`): eager autograd, no autocast,
torchvision's own block types, plain nn.Conv2d / nn.BatchNorm2d (training mode) / nn.ReLU, and
no hooks anywhere in the stage; otherwise the stage runs as modules (the per-chain path).
Opt-in, $RESNET_FUSED_TRAIN_MEMORY=recompute: the recompute passes cost 1-9% of a resnet50
training step on this project's CPU runs (benchmarks/RESULTS.md, "Activation memory"), so by
default a step saves what torchvision saves (never slower than stock); not run on a GPU yet.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import extension_ops, training
from .layers import observed
from .settings import env_choice

MEMORY_ENV = "RESNET_FUSED_TRAIN_MEMORY"  # save (default, as torchvision) | recompute
MEMORY_CHOICES = ("save", "recompute")


def memory_setting() -> str:
    """$RESNET_FUSED_TRAIN_MEMORY: "save" (default) or "recompute"."""
    return env_choice(MEMORY_ENV, MEMORY_CHOICES, "save")


def memory_report() -> str:
    """One line for `info`: what a training step keeps for the backward pass."""
    if memory_setting() == "recompute":
        return (f"${MEMORY_ENV}=recompute: stages keep their conv outputs and recompute BN, adds "
                "and ReLUs in the backward pass (about 0.65x torchvision's activations; 1-9% "
                "slower on this project's CPU runs)")
    return (f"saved as torchvision saves (${MEMORY_ENV}=recompute: about 0.65x the "
            "activations, 1-9% slower on this project's CPU runs)")


class Chain(NamedTuple):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


class Block(NamedTuple):
    """A residual block as chains: `main` in order, a ReLU after each, the shortcut added before
    the last one's ReLU; `shortcut` the downsample chain (no ReLU), or None for the identity."""
    main: Tuple[Chain, ...]
    shortcut: Optional[Chain]

    def chains(self) -> Tuple[Chain, ...]:
        """Forward order: the shortcut first (it reads the block's input), then `main`."""
        return ((self.shortcut,) if self.shortcut is not None else ()) + self.main


def _plain(chain: Chain) -> bool:
    conv, bn = chain
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and conv.bias is None
            and not isinstance(conv.padding, str) and type(bn) is nn.BatchNorm2d and bn.training)


def supported(stage: nn.Module, blocks: Optional[Sequence[Block]], x) -> bool:
    """True when `stage`, described by `blocks` (None: not torchvision's block types), may run
    as one recomputing node on input x (the caller has checked memory_setting())."""
    if not blocks or not torch.is_grad_enabled():
        return False
    if type(x) is not torch.Tensor or x.dim() != 4 or not x.dtype.is_floating_point:
        return False
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.is_autocast_enabled(x.device.type)):
        return False  # (compile partitions and recomputes by itself; autocast: per chain)
    if torch._C._is_torch_function_mode_enabled():
        return False
    chains = [c for b in blocks for c in b.chains()]
    if not all(_plain(c) for c in chains) or observed(*stage.modules()):
        return False
    return x.requires_grad or any(t.requires_grad for c in chains for t in _params(c))


def _params(chain: Chain) -> Tuple[Optional[torch.Tensor], ...]:
    return chain.conv.weight, chain.bn.weight, chain.bn.bias


def run(blocks: Sequence[Block], x: torch.Tensor) -> torch.Tensor:
    """The stage's output for input x, keeping only conv outputs for the backward pass. Call
    only where supported(stage, blocks, x)."""
    params = [t for c in (c for b in blocks for c in b.chains()) for t in _params(c)
              if t is not None]
    return _Stage.apply(tuple(blocks), x, *params)


# ---- BatchNorm (+ residual) (+ ReLU): forward, recompute and backward, fused or stock --------
class _BN(NamedTuple):
    """One chain's BatchNorm as the forward ran it: its parameters (as saved), eps, the batch
    statistics (save_mean, save_invstd), and either the factors the fused kernel computed its
    output with (scale, shift; training.batch_norm_act_factors) or, for stock's, the output
    itself (kept: recomputing it would rerun the statistics)."""
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    stats: Tuple[torch.Tensor, torch.Tensor]
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]]
    kept: Optional[torch.Tensor]


def _bn_step(bn: nn.BatchNorm2d, c: torch.Tensor, residual: Optional[torch.Tensor],
             relu: bool) -> Tuple[torch.Tensor, tuple]:
    """The training step's BN (+ residual) (+ ReLU), with running statistics and
    num_batches_tracked updated as torch's _BatchNorm.forward does, and what the backward needs:
    (out, (save_mean, save_invstd, scale, shift)), scale and shift None for stock BatchNorm."""
    if training.bn_act_supported(bn, c, residual):
        return training.batch_norm_act_factors(bn, c, residual, relu)
    if c.shape[0] * c.shape[2] * c.shape[3] <= 1:  # (as F.batch_norm, word for word)
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{c.size()}")
    factor = training.momentum_factor(bn)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    out, mean, invstd = torch.ops.aten.native_batch_norm(c, bn.weight, bn.bias, *running, True,
                                                         factor, bn.eps)
    return _tail(out, residual, relu), (mean, invstd, None, None)


def _tail(out: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def _output(bn: _BN, c: torch.Tensor, residual: Optional[torch.Tensor],
            relu: bool) -> torch.Tensor:
    """The step's output: kept (stock BatchNorm), or recomputed bitwise in one pass applying
    the forward's factors (fused; no statistics pass, no update)."""
    if bn.kept is not None:
        return bn.kept
    c, residual = training.kernel_layout(c, residual)
    return extension_ops.scale_shift_act(c, *bn.factors, residual, relu, center=bn.stats[0])


def _bn_backward(bn: _BN, grad: torch.Tensor, c: torch.Tensor, out: Optional[torch.Tensor],
                 relu: bool, residual: bool):
    """(grad_c, grad_weight, grad_bias, grad of the residual or None) of BN (+ residual)
    (+ ReLU); `out` the step's output (the ReLU mask), `residual` whether one was added."""
    mean, invstd = bn.stats
    if bn.factors is not None:
        c = training.kernel_layout(c, None)[0]
        gc, gw, gb, g_res = extension_ops.bn_act_train_backward(
            grad, c, bn.weight, out if relu else None, mean, invstd, relu, relu and residual)
        if not relu:
            g_res = grad
    else:
        if relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        g_res = grad
        gc, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, c, bn.weight, None, None, mean, invstd, True, bn.eps,
            [True, bn.weight is not None, bn.bias is not None])
    if bn.weight is not None:  # (the fused op's grads are in the accumulation dtype)
        gw = gw.to(bn.weight.dtype)
    if bn.bias is not None:
        gb = gb.to(bn.bias.dtype)
    return gc, gw, gb, g_res if residual else None


def _conv(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_backward(conv: nn.Conv2d, weight: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
                   need_x: bool, need_w: bool):
    """(grad_x or None, grad_weight or None), as autograd computes them for F.conv2d."""
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation),
        False, [0, 0], conv.groups, [need_x, need_w, False])
    return gx, gw


# ---- the stage node -------------------------------------------------------------------------
class _Stage(torch.autograd.Function):
    """forward: each block's chains (conv, then BN (+ shortcut) (+ ReLU)), keeping x, every
    conv output, the outputs of stock BatchNorm chains and the stage's output (which the next
    stage keeps as its input anyway). backward: the block outputs recomputed in order, then
    block by block (last first) the inner ReLU outputs recomputed and each chain's backward
    applied."""

    @staticmethod
    def forward(ctx, blocks: Tuple[Block, ...], x: torch.Tensor, *params: torch.Tensor):
        # per chain, forward order: [conv output, save_mean, save_invstd, scale, shift, output
        # kept] (scale/shift: fused BatchNorm's; the output: stock BatchNorm's, where needed)
        chains = []
        h = x
        for block in blocks:
            shortcut = h
            if block.shortcut is not None:
                c = _conv(block.shortcut.conv, block.shortcut.conv.weight, h)
                shortcut, bn_saved = _bn_step(block.shortcut.bn, c, None, False)
                chains.append([c, *bn_saved, shortcut if bn_saved[2] is None else None])
            out = h
            for i, chain in enumerate(block.main):
                c = _conv(chain.conv, chain.conv.weight, out)
                last = i == len(block.main) - 1
                out, bn_saved = _bn_step(chain.bn, c, shortcut if last else None, True)
                chains.append([c, *bn_saved, out if bn_saved[2] is None else None])
            if block.shortcut is not None and chains[-1][-1] is not None:
                # the block's output is kept: the shortcut's is never recomputed from
                chains[-1 - len(block.main)][-1] = None
            h = out
        ctx.blocks = blocks
        ctx.eps = [c.bn.eps for b in blocks for c in b.chains()]
        ctx.has_param = [tuple(t is not None for t in _params(c))
                         for b in blocks for c in b.chains()]
        # params are saved too: the version counter then catches an in-place update between
        # forward and backward, as autograd does for a stock conv's weight
        ctx.save_for_backward(x, h, *params, *(t for chain in chains for t in chain))
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        blocks = ctx.blocks
        n_params = sum(sum(has) for has in ctx.has_param)
        x, output, params = saved[0], saved[1], saved[2:2 + n_params]
        # Per chain, forward order: its (conv weight, BN weight, BN bias) as saved, its conv
        # output and its BN.
        it = iter(params)
        slots = [[next(it) if has else None for has in chain] for chain in ctx.has_param]
        per_chain = saved[2 + n_params:]
        convs, norms = [], []
        for k, ((_, bw, bb), eps) in enumerate(zip(slots, ctx.eps)):
            c, mean, invstd, scale, shift, kept = per_chain[6 * k:6 * k + 6]
            convs.append(c)
            norms.append(_BN(bw, bb, eps, (mean, invstd),
                             None if scale is None else (scale, shift), kept))
        del per_chain
        grads: Dict[int, torch.Tensor] = {}
        # Per block: its conv outputs, BNs and parameter slots (shortcut first).
        per_block, i = [], 0
        for block in blocks:
            n = len(block.chains())
            per_block.append((convs[i:i + n], norms[i:i + n], slots[i:i + n]))
            i += n
        del convs
        # The residual stream (each block's input) recomputed in order; the last block's output
        # is the saved stage output.
        inputs = [x]
        for block, (cs, bns, _) in zip(blocks[:-1], per_block):
            inputs.append(_block_output(block, cs, bns, inputs[-1]))
        inputs.append(output)
        del output
        need_x = ctx.needs_input_grad[1]
        for k in range(len(blocks) - 1, -1, -1):
            block, (cs, bns, ps) = blocks[k], per_block[k]
            ofs = int(block.shortcut is not None)
            out = inputs.pop()  # this block's output: the last ReLU's mask
            block_in = inputs[k]
            need_in = k > 0 or need_x
            g, g_shortcut = grad, None
            n = len(block.main)
            for j in range(n - 1, -1, -1):
                chain, bn, c, (w, _, _) = block.main[j], bns[ofs + j], cs[ofs + j], ps[ofs + j]
                gc, gw, gb, g_res = _bn_backward(bn, g, c, out, True, j == n - 1)
                if j == n - 1:
                    g_shortcut = g_res
                _put(grads, bn.weight, gw)
                _put(grads, bn.bias, gb)
                if j > 0:  # the previous chain's output: this conv's input, that ReLU's mask
                    conv_in = _output(bns[ofs + j - 1], cs[ofs + j - 1], None, True)
                else:
                    conv_in = block_in
                g, gw = _conv_backward(chain.conv, w, gc, conv_in, j > 0 or need_in,
                                       w.requires_grad)
                _put(grads, w, gw)
                out = conv_in
            if block.shortcut is not None:
                w = ps[0][0]
                gc, gw, gb, _ = _bn_backward(bns[0], g_shortcut, cs[0], None, False, False)
                _put(grads, bns[0].weight, gw)
                _put(grads, bns[0].bias, gb)
                g_shortcut, gw = _conv_backward(block.shortcut.conv, w, gc, block_in, need_in,
                                                w.requires_grad)
                _put(grads, w, gw)
            # (g is convolution_backward's fresh tensor: the sum goes into it)
            grad = g.add_(g_shortcut) if need_in else None
            del out, block_in, g, g_shortcut
        return (None, grad if need_x else None,
                *(grads.get(id(p)) if need else None
                  for p, need in zip(params, ctx.needs_input_grad[2:])))


def _block_output(block: Block, cs: Sequence[torch.Tensor], bns: Sequence[_BN],
                  block_in: torch.Tensor) -> torch.Tensor:
    """A block's output: kept, or again from its input and its last (and shortcut) conv
    outputs."""
    if bns[-1].kept is not None:
        return bns[-1].kept
    shortcut = block_in if block.shortcut is None else _output(bns[0], cs[0], None, False)
    return _output(bns[-1], cs[-1], shortcut, True)


def _put(grads: Dict[int, torch.Tensor], param: Optional[torch.Tensor],
         grad: Optional[torch.Tensor]) -> None:
    if param is not None and grad is not None:
        grads[id(param)] = grad
