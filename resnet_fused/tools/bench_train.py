"""`python -m resnet_fused bench --train`: the providers of the training benchmark.

Each provider runs one training step on the same weights, input and targets: gradients cleared,
forward in train mode, cross-entropy, backward (no optimizer step, so every call does the same
work). fp32 runs in fp32; fp16/bf16 run as automatic mixed precision (fp32 weights under
torch.autocast), the way models are trained in those dtypes.

  eager         torchvision, NCHW
  eager_cl      torchvision, channels_last model and input
  compile       torch.compile(eager_cl model)                       (opt-in: --providers)
  fused         resnet_fused, NCHW, training BatchNorm as the policy picks it on this device
  fused_cl      the same, channels_last
  fused_bn      resnet_fused with the fused bn_act_train kernels forced ($RESNET_FUSED_TRAIN_BN=
  fused_bn_cl   fused), NCHW / channels_last: listed by default only where the policy does not
                pick them already, so the suite measures what the policy would switch to.
  fused_recompute     resnet_fused with $RESNET_FUSED_TRAIN_MEMORY=recompute (each stage keeps
  fused_recompute_cl  its conv outputs only; BN, adds, ReLUs recomputed), NCHW / channels_last
                                                                      (opt-in: --providers)
  fused_save          resnet_fused with $RESNET_FUSED_TRAIN_MEMORY=save (torchvision's saved
  fused_save_cl       tensors; the default, unless the variable says otherwise)
                                                                      (opt-in: --providers)
  checkpoint          torchvision with torch.utils.checkpoint around each of layer1..layer4:
  checkpoint_cl       stock PyTorch's way to trade compute for activation memory, what
                      fused_recompute is measured against               (opt-in: --providers)
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import extension, stage_recompute, training
from ..walk import STAGES

PROVIDERS = ("eager", "eager_cl", "compile", "fused", "fused_cl", "fused_bn", "fused_bn_cl",
             "fused_recompute", "fused_recompute_cl", "fused_save", "fused_save_cl",
             "checkpoint", "checkpoint_cl")
LABELS = {"eager": "train eager (torchvision, NCHW)", "eager_cl": "train eager (channels_last)",
          "compile": "train torch.compile (channels_last)",
          "checkpoint": "train eager, checkpointed stages (NCHW)",
          "checkpoint_cl": "train eager, checkpointed stages (channels_last)"}


class _Checkpointed(torch.nn.Module):
    """A stage run under torch.utils.checkpoint: only its input is kept for the backward
    pass, which runs the stage's forward again."""

    def __init__(self, stage: torch.nn.Module, use_reentrant: bool):
        super().__init__()
        self.stage, self.use_reentrant = stage, use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=self.use_reentrant)


def checkpoint_stages(model: torch.nn.Module, use_reentrant: bool = False) -> torch.nn.Module:
    """A shallow copy of a torchvision ResNet (sharing its parameters) whose layer1..layer4 run
    under torch.utils.checkpoint. (The reentrant variant saves the stage inputs through
    save_for_backward, where saved-tensor hooks count them; the default one holds them
    elsewhere: same memory, not visible to the hooks.) As with any checkpointed BatchNorm, the
    backward's rerun updates the running statistics a second time: fine for timing, not for
    training as torchvision does."""
    out = copy.copy(model)
    out._modules = dict(model._modules)
    for name in STAGES:
        out._modules[name] = _Checkpointed(model._modules[name], use_reentrant)
    return out


def default_providers(device: torch.device) -> List[str]:
    out = ["eager", "eager_cl", "fused", "fused_cl"]
    if (training.train_bn_choice(device) != "fused"
            and extension.unavailable_reason(device) is None):
        out += ["fused_bn", "fused_bn_cl"]
    return out


def label(provider: str, device: torch.device) -> str:
    if provider in LABELS:
        return LABELS[provider]
    layout = "channels_last" if provider.endswith("_cl") else "NCHW"
    bn = ("bn_act kernels" if provider.startswith("fused_bn")
          else f"{training.train_bn_choice(device)} BN")
    memory = {"recompute": ", recomputing per stage", "save": ", saving as torchvision",
              None: ""}[_memory(provider)]
    return f"train fused, {bn}{memory} ({layout})"


def _memory(provider: str) -> Optional[str]:
    """The $RESNET_FUSED_TRAIN_MEMORY a provider forces (None: the policy's)."""
    for memory in ("recompute", "save"):
        if provider.startswith(f"fused_{memory}"):
            return memory
    return None


@contextlib.contextmanager
def _env(name: str, setting: Optional[str]):
    """$name set to `setting` for the duration (None: left as it is)."""
    if setting is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = setting
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def make_runner(provider: str, stock: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                amp: Optional[torch.dtype]) -> Callable[[], Any]:
    """A zero-argument callable running one training step of `provider` (built from `stock`, a
    train-mode torchvision model); returns the loss, detached."""
    import resnet_fused

    if provider not in PROVIDERS:
        raise ValueError(f"unknown training provider {provider!r}; expected one of "
                         f"{', '.join(PROVIDERS)}")
    channels_last = provider.endswith("_cl") or provider == "compile"
    if provider.startswith("fused"):
        model = resnet_fused.fuse(copy.deepcopy(stock)).train()
    elif provider.startswith("checkpoint"):
        model = checkpoint_stages(copy.deepcopy(stock)).train()
    else:
        model = copy.deepcopy(stock).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if provider == "compile":
        model = torch.compile(model)
    train_bn = "fused" if provider.startswith("fused_bn") else None
    memory = _memory(provider)
    autocast = (torch.autocast(x.device.type, dtype=amp) if amp is not None
                else contextlib.nullcontext())
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        with _env(training.TRAIN_BN_ENV, train_bn), _env(stage_recompute.MEMORY_ENV, memory), \
                torch.enable_grad():
            with autocast:
                out = model(x)
            loss = F.cross_entropy(out.float(), target)
            loss.backward()
        return loss.detach()
    return step
