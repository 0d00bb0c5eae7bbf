"""Run the Triton kernels on CPU through Triton's interpreter when no CUDA GPU is present.

Triton decides between compiling and interpreting when a kernel is decorated, so the variable
must be set before anything imports triton; conftest.py is loaded before any test module.
Importing torch first is safe: it does not import triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
