"""Kernel tests run Triton kernels on CPU through the interpreter when no CUDA device is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before ``dsalign.kernels`` is
imported; pytest loads this conftest before the test modules of this folder.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_devices() -> list:
    """Devices a Triton kernel test runs on: CPU under the interpreter, CUDA (marked ``gpu``) when present."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")),
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ]
