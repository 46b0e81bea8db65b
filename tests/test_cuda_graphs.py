"""resnet_fused.cuda_graphs: CPU fallback, and the capture bookkeeping (with a stand-in graph on
CPU; the real CUDA capture is tested when a GPU is present)."""
from __future__ import annotations

import copy

import pytest
import torch

import resnet_fused
from resnet_fused.cuda_graphs import CUDAGraphs

from numerics import randomize_bn


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()


def test_cpu_falls_back_to_plain_execution():
    model = _model()
    fast = resnet_fused.cuda_graphs(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert fast.captures == 0 and fast.num_graphs == 0
    fast.train()
    assert model.training  # the wrapper forwards train()/eval() to the model


class SnapshotGraph:
    """Stand-in for a CUDA graph on CPU: 'capture' freezes a copy of the model (as a real graph
    freezes the addresses of the weights it read), 'replay' reads the static input buffer."""
    made = 0

    def __init__(self, model, example, warmup):
        type(self).made += 1
        with torch.inference_mode():  # the warm-up a real capture does (fills the fold cache)
            model(example)
        with torch.inference_mode(False):  # a copy made in inference mode would be frozen
            self.frozen = copy.deepcopy(model)
        self.static_in = torch.empty_strided(example.shape, example.stride(), dtype=example.dtype)
        self.static_out = None

    def __call__(self, x):
        self.static_in.copy_(x)
        with torch.inference_mode():
            out = self.frozen(self.static_in)
        if self.static_out is None:
            self.static_out = out.clone()
        else:
            self.static_out.copy_(out)
        return self.static_out


def _fake(model, **kw):
    fast = CUDAGraphs(model, **kw)
    fast._device_types = ("cpu",)
    fast._factory = SnapshotGraph
    return fast


def test_one_graph_per_input_signature_and_new_inputs_are_used():
    model = _model()
    fast = _fake(model)
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        y1 = fast(x1)
        y2 = fast(x2)  # same signature: replay with the new values
        torch.testing.assert_close(y1, model(x1))
        torch.testing.assert_close(y2, model(x2))
        assert (fast.captures, fast.num_graphs, fast.replays) == (1, 1, 2)
        assert not torch.equal(y1, y2)  # y1 was a clone, not the static buffer
        fast(torch.randn(4, 3, 32, 32))                                      # new batch size
        fast(x1.contiguous(memory_format=torch.channels_last))               # new strides
        fast(torch.randn(2, 3, 40, 32))                                      # new spatial size
        assert (fast.captures, fast.num_graphs) == (4, 4)
        fast(x2)
        assert fast.captures == 4
        with resnet_fused.backend("torch"):                                  # new backend choice
            fast(x2)
        assert fast.captures == 5


@pytest.mark.parametrize("change", ["weight", "bn_stat", "load_state_dict", "fc_bias"])
def test_recaptured_when_weights_change(change):
    model = _model()
    fast = _fake(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fast(x)
        fast(torch.randn(1, 3, 32, 32))
    assert fast.num_graphs == 2
    with torch.no_grad():
        if change == "weight":
            model.layer1[0].conv1.weight.mul_(0.5)
        elif change == "bn_stat":
            model.layer2[0].bn2.running_var.mul_(4.0)
        elif change == "fc_bias":
            model.fc.bias.add_(1.0)
        else:
            model.load_state_dict(_model(seed=3).state_dict())
    with torch.inference_mode():
        y = fast(x)
        torch.testing.assert_close(y, model(x))
    assert fast.captures == 3 and fast.num_graphs == 1  # stale graphs dropped, one recaptured


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "new_parameter",
                                    "dtype", "train_forward"])
def test_fast_check_recaptures_on_what_its_hooks_see(change):
    """check_weights="fast": a generation counter instead of reading every tensor. It sees
    optimizer steps, assignments, load_state_dict, .to()/.double() (sentinel) and train-mode
    forwards (BN statistics)."""
    model = _model()
    fast = _fake(model, check_weights="fast")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fast(x)
        fast(x)
    assert (fast.captures, fast.replays) == (1, 2)
    if change == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        model(x).sum().backward()
        opt.step()
    elif change == "load_state_dict":
        model.load_state_dict(_model(seed=3).state_dict())
    elif change == "new_parameter":
        model.fc.bias = torch.nn.Parameter(model.fc.bias.detach() + 1.0)
    elif change == "dtype":
        model.double()
        x = x.double()
    else:
        model.train()
        fast(x)
        fast.eval()
    with torch.inference_mode():
        y = fast(x)
        torch.testing.assert_close(y, model(x))
    assert fast.captures == 2


def test_fast_check_misses_inplace_edits_until_reset():
    """The documented limit of the fast check: an in-place edit outside an optimizer step is not
    seen (the full check sees it); .reset() recaptures."""
    model = _model()
    fast = _fake(model, check_weights="fast")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = fast(x)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), before)   # the stale graph
        fast.reset()
        torch.testing.assert_close(fast(x), model(x))
    with pytest.raises(ValueError, match="check_weights must be True, False or 'fast', got 'x'"):
        CUDAGraphs(model, check_weights="x")


def test_plain_execution_when_graphs_do_not_apply():
    model = _model()
    fast = _fake(model)
    x = torch.randn(2, 3, 32, 32)
    y = fast(x)  # grad enabled and parameters require grad: autograd must record
    assert y.requires_grad and fast.captures == 0
    with torch.no_grad():
        fast(x)
    assert fast.captures == 1
    fast.train()
    fast(x)
    assert fast.captures == 1
    fast.eval()
    with torch.no_grad():
        with pytest.raises(TypeError):
            fast(x, "extra")  # extra args go to the model as-is (and it rejects them)
    assert fast.captures == 1


def test_fold_cache_entries_are_pinned_and_reset():
    model = _model()
    fast = _fake(model)
    with torch.inference_mode():
        fast(torch.randn(1, 3, 32, 32))
    assert len(fast._pinned) == 20  # every conv of resnet18 has a live fold-cache entry
    fast.reset()
    assert fast.num_graphs == 0 and fast._pinned == []


def test_clone_output_false_returns_the_static_buffer():
    fast = _fake(_model(), clone_output=False)
    with torch.inference_mode():
        a = fast(torch.randn(1, 3, 32, 32))
        b = fast(torch.randn(1, 3, 32, 32))
    assert a is b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_capture_replay_and_recapture(dtype):
    model = _model().cuda().to(dtype)
    fast = resnet_fused.cuda_graphs(model)
    xs = [torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype) for _ in range(3)]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        outs = [fast(x) for x in xs]
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model(x), **tol)
        assert fast.captures == 1 and fast.replays == 3
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(xs[0]), model(xs[0]), **tol)
    assert fast.captures == 2
    with torch.inference_mode():
        fast(torch.randn(1, 3, 64, 64, device="cuda", dtype=dtype))
    assert fast.captures == 3 and fast.num_graphs == 2
