"""Shared fixtures, and the strict rule for missing components (components.py)."""
import pytest
import torch

import components


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
