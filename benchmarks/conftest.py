"""pytest-benchmark suites: device selection, smoke sizes when benchmarks are disabled.

    pytest benchmarks/ --benchmark-only            # measure (CPU variants here; GPU ones on CUDA)
    pytest benchmarks/ --benchmark-disable -q      # smoke run in `make test`: tiny sizes, 1 call
    pytest benchmarks/ --benchmark-only --bench-compile   # also torch.compile on CPU (slow)
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # harness.py


def pytest_addoption(parser):
    group = parser.getgroup("resnet_fused benchmarks")
    group.addoption("--bench-compile", action="store_true", default=False,
                    help="also run torch.compile providers on CPU (needs a C++ compiler; "
                         "about a minute per model and shape)")


def smoke(config) -> bool:
    """True when benchmarks will not be measured (--benchmark-disable): use tiny sizes."""
    return bool(config.getoption("benchmark_disable", default=False)) or \
        bool(config.getoption("benchmark_skip", default=False))


@pytest.fixture
def is_smoke(request) -> bool:
    return smoke(request.config)


@pytest.fixture
def bench_compile(request) -> bool:
    return bool(request.config.getoption("--bench-compile"))


@pytest.fixture(autouse=True)
def _smoke_threads(request):
    """The smoke run uses tiny tensors: one intra-op thread (faster, kinder to shared CI)."""
    if not smoke(request.config):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
