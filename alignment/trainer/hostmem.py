"""Host-memory policy of a training process on CPU: keep freed memory for reuse instead of re-faulting it each step.

A training step allocates and frees the same large tensors every time: activations, the parameter gradients that
``zero_grad(set_to_none=True)`` frees, the fused head's logits chunk. glibc's ``malloc`` serves a block above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap``
on free, and it trims the heap's free top beyond the trim threshold. So every step the kernel hands the process the
same amount of memory again, one zero-filled 4 KiB page at a time, on first touch inside whichever op writes it: on
the ``bench`` preset (4 x 512 tokens, fp32) ~143,000 minor page faults per step, ~10% of the step's time, spread
over GEMM outputs, ``torch.zeros`` fills and elementwise ops (docs/PERFORMANCE.md has the measurement).

``retain_host_memory`` asks glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and not to trim the heap
(``M_TRIM_THRESHOLD`` at its maximum), so freed blocks stay in the process and the next step reuses them: a few
page faults per step instead. This is what the usual CPU advice (preloading jemalloc or tcmalloc) buys, without a
preload: the setting is made from Python when the trainer prepares its model. The process then keeps its
high-water mark of memory until it exits, as a GPU caching allocator does; measured peak RSS did not grow (bench:
3,807-3,927 MiB vs 3,910-3,991 MiB without). Process-wide and one-way; ``TrainerConfig.retain_host_memory=False``
leaves the allocator alone. Only glibc has these knobs: elsewhere (macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

log = logging.getLogger(__name__)

# glibc <malloc.h>: mallopt parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet in this process


def retain_host_memory() -> bool:
    """Make glibc keep freed memory in this process (see the module docstring). Idempotent; returns whether the
    setting is in force (False where the C library is not glibc or refuses it)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("retain_host_memory: not glibc (%s %s); allocator left as is", platform.system(), platform.libc_ver())
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        log.info("retain_host_memory: no mallopt in libc.so.6 (%s); allocator left as is", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        log.warning("retain_host_memory: glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD); allocator unchanged")
    return ok
