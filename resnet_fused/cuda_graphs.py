"""`resnet_fused.cuda_graphs(model)`: run a model's inference forward through captured CUDA graphs.

Batch-1 inference is launch-bound (~53 fused launches for ResNet-50, a few microseconds each), so
replaying one captured graph is part of the fast path. The wrapper:

- captures one graph per input signature (shape, strides, dtype, device, autocast state, selected
  backend) on first use, after a few warm-up calls on a side stream (autotuning, cuDNN benchmark
  and the fold cache all happen there, outside the graph);
- copies each new input into the graph's static input buffer, so it is correct for any tensor the
  caller passes, and returns a clone of the static output (pass `clone_output=False` to get the
  static buffer itself: faster, but the next call overwrites it);
- checks on every call the identity, storage and version counter of every parameter and buffer,
  and drops all graphs when one changed (optimizer step, load_state_dict, .to(), running-stat
  update), so the next call recaptures with the new weights; it also keeps the fold-cache entries
  the graph reads alive, since replay reads their memory. That check reads every tensor (~0.1 ms
  for ResNet-50 on the host); `check_weights="fast"` replaces it with a generation counter that
  hooks bump (any optimizer step, parameter/buffer/submodule assignment anywhere, the model's
  load_state_dict) plus one sentinel tensor's storage and version (catches .to()/.half()), a few
  microseconds: in-place edits of weights outside an optimizer step then need `.reset()`;
- runs the model plainly when graphs cannot or should not be used: CPU (or any non-CUDA) input,
  train mode, autograd recording (grad enabled and a parameter requires grad: a replayed graph
  carries no autograd history), non-tensor or extra arguments, torch.compile tracing, or a
  capture already in progress.

Graphs are inference-only; each holds its own memory pool (activations for its batch size).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import backends, fold

# Bumped by the hooks `check_weights="fast"` installs (once per process, on first use).
_generation = 0
_hooks_installed = False


def _bump(*_args: Any, **_kwargs: Any) -> None:
    global _generation
    _generation += 1


def _install_generation_hooks() -> None:
    """Global hooks (public torch APIs) that bump the generation on any optimizer step and any
    parameter, buffer or submodule assignment; they return None, so they change nothing."""
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(_bump)
    from torch.nn.modules import module
    module.register_module_parameter_registration_hook(_bump)
    module.register_module_buffer_registration_hook(_bump)
    module.register_module_module_registration_hook(_bump)
    _hooks_installed = True


class _CapturedCUDAGraph:
    """One captured forward: static input buffer -> graph -> static output."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], example: torch.Tensor, warmup: int):
        device = example.device
        with torch.cuda.device(device):
            # Same strides as the caller's tensor, so a channels_last input stays channels_last.
            with torch.inference_mode(False):  # a normal tensor: copy_ works in any mode
                self.static_in = torch.empty_strided(example.shape, example.stride(),
                                                     dtype=example.dtype, device=device)
                self.static_in.copy_(example)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(max(1, warmup)):  # autotuning, cudnn.benchmark, fold cache
                    fn(self.static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.inference_mode():
                self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> Any:
        if self.static_in.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.static_in.device):
                return self(x)
        self.static_in.copy_(x)  # on the current stream, which replay() also uses
        self.graph.replay()
        return self.static_out


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


class CUDAGraphs(nn.Module):
    """Wraps `model`; see the module docstring. Build it with `resnet_fused.cuda_graphs(model)`."""

    # Device types whose inputs are captured, and how a capture is made. Tests on machines
    # without a GPU replace these on an instance to exercise the bookkeeping.
    _device_types: Tuple[str, ...] = ("cuda",)
    _factory: Callable[..., Callable[[torch.Tensor], Any]] = _CapturedCUDAGraph

    def __init__(self, model: nn.Module, *, warmup: int = 3, clone_output: bool = True,
                 check_weights: Any = True):
        super().__init__()
        if check_weights not in (True, False, "fast"):
            raise ValueError(f"cuda_graphs: check_weights must be True, False or 'fast', got "
                             f"{check_weights!r}")
        self.model = model
        self.warmup = int(warmup)
        self.clone_output = bool(clone_output)
        self.check_weights = check_weights
        if check_weights == "fast":
            _install_generation_hooks()
            model.register_load_state_dict_post_hook(_bump)
        self._graphs: Dict[tuple, Callable[[torch.Tensor], Any]] = {}
        self._weights_key: Optional[tuple] = None
        self._pinned: List[Any] = []  # fold-cache entries the graphs read
        self._entries: Optional[list] = None
        self._tensor_list: List[torch.Tensor] = []
        self.captures = 0             # graphs captured so far (bookkeeping, for tests/users)
        self.replays = 0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call recaptures."""
        self._graphs.clear()
        self._pinned = []
        self._weights_key = None
        self._entries = None

    # -- when to capture ------------------------------------------------------------------------
    def _collect(self) -> None:
        """Remember where every parameter, buffer and submodule sits, to spot replacements."""
        entries, tensors = [], []
        for mod in self.model.modules():
            for d in (mod._parameters, mod._buffers):
                for n, t in d.items():
                    if t is not None:
                        entries.append((d, n, t))
                        tensors.append(t)
            for n, child in mod._modules.items():
                entries.append((mod._modules, n, child))
        self._entries, self._tensor_list = entries, tensors

    def _tensors(self) -> List[torch.Tensor]:
        """The model's parameters and buffers; re-collected when one was replaced (cheap check:
        one dict lookup each, so the per-call cost stays in the tens of microseconds)."""
        if self._entries is None or any(d.get(n) is not o for d, n, o in self._entries):
            self._collect()
        return self._tensor_list

    @staticmethod
    def _weights_signature(tensors: List[torch.Tensor]) -> tuple:
        sig = []
        for t in tensors:
            try:
                version = t._version
            except RuntimeError:  # an inference tensor has no version counter: storage only
                version = -1
            sig.append((id(t), t.data_ptr(), version))
        return tuple(sig)

    def _input_key(self, x: torch.Tensor) -> tuple:
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)
        return (tuple(x.shape), x.stride(), x.dtype, x.device, autocast,
                torch.get_autocast_dtype(dev) if autocast else None, backends.get_backend())

    def _use_graphs(self, x: Any, tensors: List[torch.Tensor]) -> bool:
        if not isinstance(x, torch.Tensor) or x.device.type not in self._device_types:
            return False
        if self.model.training or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
            return False
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        return True

    def _pin_fold_cache(self) -> None:
        pinned = []
        for m in self.model.modules():
            entries = fold.entries_for(m)
            if entries:
                pinned.append(dict(entries))
        self._pinned = pinned

    # -- the call -------------------------------------------------------------------------------
    def _fast_key(self) -> tuple:
        """The generation, plus one sentinel tensor's identity, storage and version."""
        if self._entries is None:
            self._collect()
        sentinel = self._tensor_list[0] if self._tensor_list else None
        return (_generation,) + (self._weights_signature([sentinel]) if sentinel is not None
                                 else ())

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.check_weights is True:
            tensors = self._tensors()
        else:
            if self.check_weights == "fast":
                # replacements bump the generation: the tensor list stays valid until then
                key = self._fast_key()
                if key != self._weights_key:
                    self._entries = None
                    self.reset()
                    self._weights_key = self._fast_key()
            if self._entries is None:
                self._collect()
            tensors = self._tensor_list
        if args or kwargs or not self._use_graphs(x, tensors):
            if self.model.training:  # a train forward updates BN statistics in place
                self._weights_key = None
            return self.model(x, *args, **kwargs)
        if self.check_weights is True or self._weights_key is None:
            weights = self._weights_signature(tensors)
            if weights != self._weights_key:  # new weights (or first call): graphs are stale
                self.reset()
                self._weights_key = weights
        key = self._input_key(x)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._factory(self.model, x, self.warmup)
            self._graphs[key] = graph
            self.captures += 1
            self._pin_fold_cache()
        out = graph(x)
        self.replays += 1
        return _clone(out) if self.clone_output else out

    def extra_repr(self) -> str:
        return (f"graphs={self.num_graphs}, warmup={self.warmup}, "
                f"clone_output={self.clone_output}, check_weights={self.check_weights}")


def cuda_graphs(model: nn.Module, *, warmup: int = 3, clone_output: bool = True,
                check_weights: Any = True) -> CUDAGraphs:
    """Wrap `model` so that eval-mode inference on CUDA runs through captured CUDA graphs.

        fast = resnet_fused.cuda_graphs(resnet_fused.resnet50().eval().cuda().half())
        with torch.inference_mode():
            y = fast(x)          # first call per input shape/dtype: warm-up + capture
            y = fast(x2)         # later calls: copy x2 in, replay, clone the output

    On CPU (or in train mode, or when autograd records) it runs `model` plainly.
    warmup: calls before each capture. clone_output=False returns the graph's static output
    buffer (overwritten by the next call). check_weights=True reads every parameter and buffer
    per call (~0.1 ms for ResNet-50 on the host); "fast" checks a generation counter that
    optimizer steps, assignments and load_state_dict bump (a few us; in-place edits outside an
    optimizer need .reset()); False checks nothing: call .reset() yourself after changing weights.
    """
    return CUDAGraphs(model, warmup=warmup, clone_output=clone_output,
                      check_weights=check_weights)
