"""torchvision-compatible ResNet family whose eval path runs fused conv_bn_act chains.

Module names, parameter names, constructor arguments and initialisation order are torchvision's,
so state_dicts load both ways with strict=True and, under one seed, both build identical tensors.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import fold as folding, stage_recompute, training
from ..layers import conv_bn, observed, transformed
from ..stage_recompute import Block, Chain
from .weights import load_weights

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "wide_resnet50_2", "wide_resnet101_2"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(downsample: Optional[nn.Module], x: Tensor) -> Tensor:
    """The identity branch: x, or the downsample as one fused chain without ReLU."""
    if downsample is None:
        return x
    if type(downsample) is nn.Sequential and len(downsample) == 2 and not observed(downsample):
        return conv_bn(downsample[0], downsample[1], x)
    return downsample(x)  # hooked, or not torchvision's (conv, norm) pair: as torchvision


class _Scriptable(nn.Module):
    """forward: the fused path, or torchvision's module sequence, `_forward_modules`, where the
    fused one cannot run: under TorchScript (which cannot call it) and torch.func transforms
    (layers.transformed)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_modules(x)
        return self._forward_python(x)

    @torch.jit.unused
    def _forward_python(self, x: Tensor) -> Tensor:
        if transformed():
            return self._forward_modules(x)
        return self._forward_fused(x)


class BasicBlock(_Scriptable):
    """torchvision's BasicBlock (two 3x3 convs): each conv -> BN (-> + shortcut) -> ReLU is one
    fused chain."""
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and base_width=64, got "
                             f"groups={groups}, base_width={base_width}")
        if dilation > 1:
            raise ValueError(f"BasicBlock supports only dilation=1 (as torchvision), got "
                             f"dilation={dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        out = conv_bn(self.conv1, self.bn1, x, act=self.relu)
        return conv_bn(self.conv2, self.bn2, out, residual=_shortcut(self.downsample, x),
                       act=self.relu)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's forward, for TorchScript (which cannot call the fused path)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(_Scriptable):
    """torchvision's Bottleneck (1x1, 3x3 with groups/dilation, 1x1): three fused chains, the last
    with the shortcut added."""
    # The stride is on the 3x3 conv (ResNet V1.5), as in torchvision.
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        out = conv_bn(self.conv1, self.bn1, x, act=self.relu)
        out = conv_bn(self.conv2, self.bn2, out, act=self.relu)
        return conv_bn(self.conv3, self.bn3, out, residual=_shortcut(self.downsample, x),
                       act=self.relu)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's forward, for TorchScript (which cannot call the fused path)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(_Scriptable):
    """torchvision's ResNet with the same constructor, module tree and state_dict; every conv ->
    BN (-> + residual) (-> ReLU) chain runs through layers.conv_bn."""
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-initialise the last BN in each residual branch (https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _check_input(self, x: Tensor) -> None:
        w = self.conv1.weight
        if not isinstance(x, Tensor):
            raise TypeError(f"ResNet: expected a Tensor input, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != w.shape[1]:
            raise ValueError(f"ResNet: expected input of shape (N, {w.shape[1]}, H, W), got "
                             f"{tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"ResNet: expected a floating-point input of dtype {w.dtype}, got "
                            f"{x.dtype}")
        if x.dtype != w.dtype and not (x.device.type != "meta"
                                       and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"ResNet: expected input dtype {w.dtype} (the model's parameters), "
                            f"got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"ResNet: expected input on the model's device {w.device}, got "
                             f"{x.device}")

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's forward, for TorchScript (which cannot call the fused path)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
            # (captured graphs, made to deploy: checking the example input is moot, and eval
            # graphs get the fused kernels' layout)
            to_channels_last = not self.training
        else:
            self._check_input(x)
            to_channels_last = self._wants_channels_last(x)
        if to_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (once here, not per chain)
        x = conv_bn(self.conv1, self.bn1, x, act=self.relu)
        x = self.maxpool(x)
        x = self._stage(self.layer1, x)
        x = self._stage(self.layer2, x)
        x = self._stage(self.layer3, x)
        x = self._stage(self.layer4, x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    @torch.jit.unused
    def _wants_channels_last(self, x: Tensor) -> bool:
        """The activations' layout. Eval mode where nothing records: channels_last, the fused
        kernels' (their weights come prepared from the fold cache). In training, and where
        autograd records in eval mode (frozen-BN fine-tuning, an eval forward outside no_grad),
        the chains run stock's conv on the module's own weights, and channels_last activations
        with NCHW weights make every conv reorder its weight (and its weight's grad) per call:
        then they stay as given, as stock's do, unless the weights are channels_last or `x` is
        large enough for the channels_last convs to repay that (training.grad_channels_last)."""
        if not self.training and not folding.needs_grad(self.parameters()):
            return True
        return (self.conv1.weight.is_contiguous(memory_format=torch.channels_last)
                or training.grad_channels_last(x, self._design()))

    @torch.jit.unused
    def _design(self) -> Optional[tuple]:
        """(block class name, groups, width per group): what a layout rule is measured for (None
        where layer1's first block is not one of ours, e.g. a custom block class)."""
        first = next(iter(self.layer1.children()), None)
        if type(first) not in (BasicBlock, Bottleneck):
            return None
        return (type(first).__name__, self.groups, self.base_width)

    @torch.jit.unused
    def _stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        """stage(x); in a training step, one node that recomputes BN, adds and ReLUs in the
        backward pass instead of keeping their outputs, where nothing can tell the difference
        (stage_recompute.supported)."""
        # (the setting first: the default never walks the stage on this per-step path)
        if (self.training and torch.is_grad_enabled()
                and stage_recompute.memory_setting() == "recompute"):
            blocks = _blocks(stage)
            if stage_recompute.supported(stage, blocks, x):
                return stage_recompute.run(blocks, x)
        return stage(x)


def _blocks(stage: nn.Module) -> Optional[List[Block]]:
    """A stage built by _make_layer as stage_recompute's blocks; None where it is not that tree
    (another container, a block subclass or replacement, another activation or shortcut)."""
    if type(stage) is not nn.Sequential:
        return None
    blocks = []
    for b in stage:
        if type(b) not in (BasicBlock, Bottleneck) or type(b.relu) is not nn.ReLU:
            return None
        main = (Chain(b.conv1, b.bn1), Chain(b.conv2, b.bn2))
        if type(b) is Bottleneck:
            main += (Chain(b.conv3, b.bn3),)
        shortcut = b.downsample
        if shortcut is not None:
            if type(shortcut) is not nn.Sequential or len(shortcut) != 2:
                return None
            shortcut = Chain(shortcut[0], shortcut[1])
        blocks.append(Block(main, shortcut))
    return blocks


def _fixed(kwargs: dict, name: str, value: Any) -> None:
    """Set a builder-defined argument; a different caller value is an error (as torchvision)."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"the parameter '{name}' expected value {value} but got {kwargs[name]}")
    kwargs[name] = value


def _resnet(block, layers, weights, progress: bool, builder: str, **kwargs: Any) -> ResNet:
    state_dict = None
    if weights is not None:
        state_dict, num_classes = load_weights(weights, builder, progress)
        if num_classes is not None:
            _fixed(kwargs, "num_classes", num_classes)
    model = ResNet(block, layers, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def resnet18(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 as torchvision.models.resnet18: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, "resnet18", **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 as torchvision.models.resnet34: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, "resnet34", **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 as torchvision.models.resnet50: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "resnet50", **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 as torchvision.models.resnet101: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "resnet101", **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 as torchvision.models.resnet152: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, "resnet152", **kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d as torchvision.models.resnext50_32x4d: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    _fixed(kwargs, "groups", 32)
    _fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "resnext50_32x4d", **kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d as torchvision.models.resnext101_32x8d: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    _fixed(kwargs, "groups", 32)
    _fixed(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "resnext101_32x8d", **kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d as torchvision.models.resnext101_64x4d: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    _fixed(kwargs, "groups", 64)
    _fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "resnext101_64x4d", **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 as torchvision.models.wide_resnet50_2: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    _fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "wide_resnet50_2", **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 as torchvision.models.wide_resnet101_2: same arguments (`weights`: an
    enum, its name, a state_dict or a path), module names and state_dict; chains run fused."""
    _fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "wide_resnet101_2", **kwargs)
