"""Run the Triton kernels on CPU through Triton's interpreter when no CUDA GPU is present.

Triton decides between compiling and interpreting when a kernel is decorated, so the variable
must be set before anything imports triton; conftest.py is loaded before any test module.
Importing torch first is safe: it does not import triton. The `data` fixture, the micro
phantom that the end-to-end tests share, imports the project only when first used.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A micro phantom in ChestX-ray14's format, 40 images at 64 px: the end-to-end tests' data set."""
    from minimal_amkp.data import phantom
    root = tmp_path_factory.mktemp("phantom") / "micro"
    phantom.generate(str(root), n_images=40, size=64, seed=0)
    return str(root)
