"""Devices a Triton kernel test runs on (a module of its own: ``from conftest import ...`` picked up whichever
folder's conftest was imported first when several test folders ran together)."""

import os

import pytest
import torch


def triton_devices() -> list:
    """CPU under the interpreter, CUDA (marked ``gpu``) when present."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpret, reason="CPU Triton needs TRITON_INTERPRET=1")),
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ]
