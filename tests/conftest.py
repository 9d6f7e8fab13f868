import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
# variable is read when a kernel is decorated, so set it before any test imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # FlashInfer JIT-compiles its fa2 module on first use (~36 s on the H100): one writable
    # build cache for the tests and the engines they start (read when flashinfer is imported).
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fiws")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly on machines without CUDA (e.g. CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
