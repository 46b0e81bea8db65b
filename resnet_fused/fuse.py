"""fuse(model): a torchvision ResNet as a resnet_fused.ResNet that shares its modules/tensors."""
from __future__ import annotations

from torch import nn

from .models import resnet as ours

_CLASSES = ("ResNet", "BasicBlock", "Bottleneck")


def _convert(module: nn.Module) -> nn.Module:
    # Only torchvision's own classes (or ours) by exact class; a subclass may override
    # forward(), and silently dropping that would be a wrong result.
    cls = type(module)
    if cls.__name__ in _CLASSES and cls.__module__ in ("torchvision.models.resnet", ours.__name__):
        new = getattr(ours, cls.__name__).__new__(getattr(ours, cls.__name__))
        new.__dict__.update(module.__dict__)
        new._modules = dict(module._modules)  # a copy: converting children must not touch `module`
        for name, child in new._modules.items():
            if child is not None:
                new._modules[name] = _convert(child)
        return new
    if type(module) is nn.Sequential:
        return nn.Sequential(*[_convert(child) for child in module])
    return module


def fuse(model: nn.Module) -> ours.ResNet:
    """Convert a torchvision ResNet (any builder) to resnet_fused.ResNet.

    The result shares every parameter and buffer with `model` (an optimizer step on one is seen
    by the other); the training flag is kept.
    """
    cls = type(model)
    if not (cls.__name__ == "ResNet" and cls.__module__ in ("torchvision.models.resnet",
                                                            ours.__name__)):
        raise TypeError(f"fuse: expected a torchvision.models.ResNet, got "
                        f"{cls.__module__}.{cls.__qualname__}")
    return _convert(model)
