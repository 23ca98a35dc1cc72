"""Suite-wide test setup.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when ``dsalign.kernels`` is first
imported, which may happen while collecting any test folder. Without CUDA the kernels can only run in the
interpreter, so turn it on before anything is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
