"""Which implementation runs: Triton kernels on CUDA, the torch references elsewhere.

``backend`` arguments across ``dsalign.kernels`` take ``"auto"`` (Triton on CUDA tensors, torch otherwise),
``"triton"`` (Triton, also on CPU tensors when ``TRITON_INTERPRET=1``; used by the tests) or ``"torch"``.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs run the torch references.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor, backend: str) -> bool:
    """Resolve ``backend`` for a tensor; raises when Triton is requested but cannot run on ``t``'s device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = HAS_TRITON and (t.is_cuda or triton_interpret())
    if backend == "triton" and not runnable:
        raise RuntimeError(
            f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU); got a {t.device} "
            f"tensor with triton {'installed' if HAS_TRITON else 'missing'}. Use backend='torch' or 'auto'."
        )
    return runnable and (backend == "triton" or t.is_cuda)
