import os
import sys

import pytest
import torch

# Test helpers (tolerances, tiny_models) import both as `tests.x` and as plain `x`.
sys.path.insert(0, os.path.dirname(__file__))

# Without CUDA, Triton kernels run in the CPU interpreter; this must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
