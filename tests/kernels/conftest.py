"""Kernel tests run Triton kernels on CPU through the interpreter when no CUDA device is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before ``dsalign.kernels`` is
imported; pytest loads this conftest before the test modules of this folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
