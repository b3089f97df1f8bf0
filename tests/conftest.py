import os

import pytest
import torch

import unigist


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and unigist.has_cuda_kernels()


def pytest_collection_modifyitems(config, items):
    if _cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of unigist (run `pytest -m cuda` there)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test (inputs are never the same twice); printed on failure."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a64, b64 = a.double(), b.double()
    denom = b64.norm().item()
    return (a64 - b64).norm().item() / max(denom, 1e-30)
