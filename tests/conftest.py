"""Shared fixtures, the strict rule for missing components (components.py), and intra-op
threads per pytest-xdist worker."""
import os

import pytest
import torch

import components


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each gets its
    share of intra-op threads, so OpenMP pools never oversubscribe them (tests of thread-count
    effects set their counts explicitly)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`requires` marks (components.needs / needs_gpu): skip, or fail under strict mode."""
    components.run_marks(item)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster here and kinder to a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_tuning_cache(tmp_path_factory, monkeypatch):
    """Tuning decisions of a test go to a fresh folder, never the user's cache, and no test sees
    another's decisions in memory."""
    from resnet_fused import tuning
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path_factory.mktemp("tuning")))
    tuning.clear()
    yield
    tuning.clear()
