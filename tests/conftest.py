"""Test set-up. Without a GPU the Triton kernels run in the Triton interpreter, which reads
TRITON_INTERPRET when a kernel is decorated: it must be set here, before topd_kernels.triton_rows imports."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Import every backend now, before any test patches torch (nan_poisoned_empty): registering the Triton ops
# initialises torch.compile's tables of torch functions, which must see the real torch.empty.
from topd_kernels.rows import registry  # noqa: E402

for _name in registry.BACKENDS:
    registry.unavailable(_name, torch.device("cpu"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed on failure so a failing draw can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """During the test, torch.empty / torch.empty_like return NaN-filled floating tensors, so any
    output element a backend allocates but never writes shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
