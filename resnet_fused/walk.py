"""The layer walker: the units a fused ResNet's eval forward runs, with shapes and multiply-adds,
found from the model's structure alone (no forward runs, so the model may live on the meta device).

Layers are every conv -> BN (-> + residual) (-> ReLU) chain (one `conv_bn_act` call), plus
maxpool, avgpool and fc. Used by `warmup()` (the conv problems to compile and tune) and by the
command-line tools (resnet_fused/tools/).

Multiply-adds count convolutions and the fc layer only, like torchvision's published figures
(resnet50: 4.089 G per 224x224 image); BN, ReLU, residual adds and pooling are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple, Union

import torch
from torch import nn

from .ops import out_hw

STAGES = ("layer1", "layer2", "layer3", "layer4")  # a torchvision ResNet's stages, in order


@dataclass
class Layer:
    """One unit of the fused model's eval forward. Shapes are per batch (N first)."""
    name: str
    kind: str                                  # conv_bn_act | maxpool | avgpool | linear
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    macs: int                                  # multiply-adds for the whole batch
    weight_shape: Tuple[int, ...] = ()
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    relu: bool = False
    residual: bool = False
    modules: Tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)

    @property
    def problem(self) -> Tuple:
        """What a conv_bn_act kernel sees of this layer: layers with equal problems run the same
        launch."""
        return (self.in_shape, self.weight_shape, self.stride, self.padding, self.dilation,
                self.groups, self.relu, self.residual)

    def min_bytes(self, element_size: int) -> int:
        """Fewest bytes a kernel must move: each input read once, the output written once."""
        n = math.prod(self.in_shape) + math.prod(self.out_shape) + math.prod(self.weight_shape)
        if self.residual:
            n += math.prod(self.out_shape)
        extra = 0
        if self.kind == "conv_bn_act":
            extra = 2 * self.out_shape[1] * 4  # fp32 scale and shift
        return n * element_size + extra


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """An image size or a module's int-or-pair attribute as a pair (ops._pair validates op
    arguments; these come from nn modules and are already ints)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_layer(name, conv: nn.Conv2d, bn: nn.Module, shape, relu: bool,
                residual: bool) -> Layer:
    n, _, h, w = shape
    k, stride, padding, dilation = (_pair(v) for v in (conv.kernel_size, conv.stride,
                                                       conv.padding, conv.dilation))
    out = (n, conv.out_channels, *out_hw(h, w, k, stride, padding, dilation))
    macs = math.prod(out) * (conv.in_channels // conv.groups) * k[0] * k[1]
    return Layer(name, "conv_bn_act", tuple(shape), out, macs, tuple(conv.weight.shape),
                 stride, padding, dilation, conv.groups, relu, residual, (conv, bn))


def _pool_out(shape, pool: nn.MaxPool2d) -> Tuple[int, ...]:
    n, c, h, w = shape
    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size,
                                     pool.padding, pool.dilation))
    dims = list(out_hw(h, w, k, s, p, d))  # floor mode: the conv formula
    if pool.ceil_mode:  # one more window where the last would start inside the (padded) input
        for i, (size, kk, ss, pp, dd) in enumerate(zip((h, w), k, s, p, d)):
            if (size + 2 * pp - dd * (kk - 1) - 1) % ss and dims[i] * ss < size + pp:
                dims[i] += 1
    return (n, c, *dims)


def layers(model: nn.Module, input_shape: Tuple[int, int, int, int]) -> List[Layer]:
    """The fused-forward layers of a torchvision-structured ResNet, shapes propagated analytically
    (no forward is run, so `model` may live on the meta device)."""
    shape = tuple(input_shape)
    out: List[Layer] = []
    stem = _conv_layer("conv1", model.conv1, model.bn1, shape, relu=True, residual=False)
    out.append(stem)
    shape = _pool_out(stem.out_shape, model.maxpool)
    out.append(Layer("maxpool", "maxpool", stem.out_shape, shape, 0, modules=(model.maxpool,)))
    for lname in STAGES:
        for i, block in enumerate(getattr(model, lname)):
            prefix = f"{lname}.{i}"
            block_in = shape
            convs = [("conv1", "bn1"), ("conv2", "bn2")]
            if hasattr(block, "conv3"):
                convs.append(("conv3", "bn3"))
            if block.downsample is not None:
                ds = block.downsample
                out.append(_conv_layer(f"{prefix}.downsample", ds[0], ds[1], block_in,
                                       relu=False, residual=False))
            for j, (c, b) in enumerate(convs):
                last = j == len(convs) - 1
                layer = _conv_layer(f"{prefix}.{c}", getattr(block, c), getattr(block, b), shape,
                                    relu=True, residual=last)
                out.append(layer)
                shape = layer.out_shape
    n, c = shape[:2]
    out.append(Layer("avgpool", "avgpool", shape, (n, c, 1, 1), 0, modules=(model.avgpool,)))
    fc = model.fc
    out.append(Layer("fc", "linear", (n, fc.in_features), (n, fc.out_features),
                     n * fc.in_features * fc.out_features, tuple(fc.weight.shape),
                     modules=(fc,)))
    return out


def meta_model(arch: str) -> nn.Module:
    """torchvision's `arch` on the meta device: structure only, no memory, nothing initialised."""
    import torchvision
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def count_macs(arch_or_model: Union[str, nn.Module], image_size: Union[int, Tuple[int, int]] = 224
               ) -> int:
    """Multiply-adds for ONE image (convs + fc, as torchvision's published figures)."""
    model = meta_model(arch_or_model) if isinstance(arch_or_model, str) else arch_or_model
    h, w = _pair(image_size)
    return sum(layer.macs for layer in layers(model, (1, 3, h, w)))


__all__ = ["Layer", "layers", "count_macs", "meta_model"]
