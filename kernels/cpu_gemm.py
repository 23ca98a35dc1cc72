"""fp32 GEMMs on CPU through oneDNN instead of torch's default BLAS.

Shape legend: M rows, K reduction, N output features.

torch's CPU ``mm`` calls MKL's sgemm, which picks its kernel by CPU vendor: on AMD processors it runs its AVX2 path
even where the CPU has AVX-512. oneDNN, which ships inside torch (``torch.ops.mkldnn._linear_pointwise``, the op
Inductor's CPU backend uses for linear layers), JIT-compiles its GEMM for the instruction set the CPU reports. On the
2-core AMD EPYC (Zen 5) these numbers come from, fp32 ``x @ W^T`` at the ``bench`` preset's shapes runs at
~170-190 GFLOP/s in MKL and ~290-430 in oneDNN (``python bench/cpu_gemm.py``; docs/PERFORMANCE.md). Results are
IEEE fp32 products (oneDNN's default math mode; no bf16 down-conversion): the error against an fp64 reference is
~1e-6 of the output's magnitude, as MKL's.

Policy (``DSALIGN_CPU_GEMM`` environment variable, or ``set_cpu_gemm``): ``"auto"`` (default) uses oneDNN for fp32
CPU GEMMs of at least ``MIN_MACS`` multiply-adds when the op exists and passes a probe; ``"onednn"`` the same but
raises if oneDNN cannot run; ``"torch"`` always uses torch's own ``mm``. Small GEMMs stay on torch (``use_onednn``):
oneDNN's fixed cost per call (~15 us) loses below ~2M multiply-adds (a 64 x 192 x 96 decode projection: 20 vs 17 us),
and its per-call weight repacking loses on a few rows over a short reduction (a decode step's 64 rows at hidden 192).

oneDNN builds (JIT-compiles) a kernel per distinct shape and keeps it in an LRU cache; a new shape costs ~0.4 ms
once. Fixed shapes (dense projections, the LM head) hit the cache every step; the MoE grouped GEMM, whose row counts
per expert change every step, rounds each expert's rows into a few fixed-size pieces (``grouped_mm``).

Each function stands in for a torch op, with autograd where the caller needs it: ``linear`` (``F.linear``),
``mm`` (``a @ b``, no autograd: for the custom backward passes of fused kernels) and ``grouped_mm``. Whatever oneDNN
cannot do as torch would falls back to torch: a bias that is not a plain ``[out]`` vector, a weight that is not 2-D,
``torch.func`` transforms and forward-mode AD, and a backward that is itself differentiated (``create_graph=True``:
``mm`` then runs in torch whenever an operand requires grad, so the backward's GEMMs stay in the graph).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

POLICIES = ("auto", "onednn", "torch")

# oneDNN keeps every compiled kernel (~0.6-1.5 MB each at these shapes) in two LRU caches of 1024 entries by default;
# a run whose batch shapes vary (GRPO's rows x longest sequence changes every step) fills them, +300 MB in
# bench/grpo.py. 256 entries hold a training step's ~100 shapes (measured: the bench preset's step time is the
# same at 256 and 1024). Read by oneDNN on first use, so set here, at import, unless the user set them.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
os.environ.setdefault("LRU_CACHE_CAPACITY", "256")
MIN_MACS = 1 << 21  # below ~2M multiply-adds oneDNN's per-call cost outweighs its faster kernel
MIN_ROWS, SHORT_MIN_K = 128, 256  # fewer rows than MIN_ROWS go to oneDNN only over a reduction of SHORT_MIN_K

_policy = os.environ.get("DSALIGN_CPU_GEMM", "auto")
_available: bool | None = None


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"DSALIGN_CPU_GEMM / set_cpu_gemm: expected one of {POLICIES}, got {policy!r}")
    return policy


def get_cpu_gemm() -> str:
    return _check_policy(_policy)


def set_cpu_gemm(policy: str) -> str:
    """Set the process-wide policy; returns the previous one."""
    global _policy
    previous, _policy = _policy, _check_policy(policy)
    return previous


@contextlib.contextmanager
def cpu_gemm(policy: str):
    """``with cpu_gemm("torch"): ...`` runs a block under another policy."""
    previous = set_cpu_gemm(policy)
    try:
        yield
    finally:
        set_cpu_gemm(previous)


def _linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_available() -> bool:
    """Whether oneDNN's linear runs in this torch build and agrees with ``torch.mm`` on a probe (checked once)."""
    global _available
    if _available is None:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a, w = torch.randn(33, 70, generator=g), torch.randn(40, 70, generator=g)
                ok = torch.allclose(_linear_op(a, w.t().contiguous().t(), None), a @ w.t(), rtol=1e-4, atol=1e-4)
            except (RuntimeError, NotImplementedError, AttributeError):
                ok = False
        _available = ok
    return _available


def _transforms_active() -> bool:
    try:
        return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0
    except AttributeError:  # private APIs; if a torch version lacks them, stay on the safe side
        return True


def use_onednn(a: torch.Tensor, b: torch.Tensor, m: int, k: int, n: int) -> bool:
    """Whether the GEMM ``a [m, k] @ b [k, n]`` goes to oneDNN under the current policy: fp32 on CPU, at least
    ``MIN_MACS`` multiply-adds, and either ``MIN_ROWS`` rows or a reduction of ``SHORT_MIN_K``. oneDNN repacks the
    weight on every call; a few rows over a short reduction do not pay for it when the weight is cold (measured:
    64 x 192 x 600 decode head 295 vs 220 us in torch, 128 rows 155 vs 225 us, 32 x 512 x 512 117 vs 166 us)."""
    policy = get_cpu_gemm()
    if policy == "torch" or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if _transforms_active():  # torch.func / forward-mode AD: the oneDNN op has no autograd or batching rule
        return False
    if policy == "onednn" and not onednn_available():
        raise RuntimeError("DSALIGN_CPU_GEMM=onednn, but this torch build cannot run oneDNN's linear op")
    if m * k * n < MIN_MACS or (m < MIN_ROWS and k < SHORT_MIN_K):
        return False
    return onednn_available()


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, transposed_ok: bool = True) -> torch.Tensor:
    """``a @ b`` for 2-D operands (any strides); oneDNN where ``use_onednn`` says so. No autograd.

    oneDNN's linear takes its weight in any layout (it repacks it anyway) but copies a non-contiguous input first.
    So when ``a`` is a transposed view (a weight gradient's ``g^T``) and ``b^T`` is cheaper to make contiguous, this
    computes ``(b^T a^T)^T`` instead and returns that transposed view: at 2048 x 128 x 1024 (``g^T x``, the input
    ``g^T`` 8x the size of ``x^T``) 265 instead of 144 GFLOP/s. ``transposed_ok=False`` keeps the direct
    orientation, for a caller that copies the result into a contiguous slice (a transposed copy costs more)."""
    M, K = a_MK.shape
    N = b_KN.shape[1]
    if torch.is_grad_enabled() and (a_MK.requires_grad or b_KN.requires_grad):
        return a_MK @ b_KN  # a differentiated backward (create_graph=True): oneDNN's op would drop out of the graph
    if not use_onednn(a_MK, b_KN, M, K, N):
        return a_MK @ b_KN
    copy_a = 0 if a_MK.is_contiguous() else a_MK.numel()
    copy_b = 0 if b_KN.t().is_contiguous() else b_KN.numel()
    if transposed_ok and copy_b < copy_a:
        return _linear_op(b_KN.t(), a_MK, None).t()
    return _linear_op(a_MK, b_KN.t(), None)


class _Linear(torch.autograd.Function):
    """``x @ w^T + b`` with all three GEMMs (forward, input gradient, weight gradient) through ``mm``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear_op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g_MN = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # e.g. the expanded gradient of a sum
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm(g_MN, weight).view(*x.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # contiguous like nn.Linear's (AccumulateGrad would copy a transposed view anyway)
            grad_w = mm(g_MN.t(), x.reshape(-1, x.shape[-1])).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_MN.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with oneDNN GEMMs for large fp32 CPU products (forward and backward alike)."""
    if x.dim() < 2 or weight.dim() != 2:
        return F.linear(x, weight, bias)
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != torch.float32):
        return F.linear(x, weight, bias)  # oneDNN takes only a plain [out] bias (no broadcasting)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not use_onednn(x, weight, rows, weight.shape[1], weight.shape[0]):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, None if bias is None else bias.contiguous())  # oneDNN ignores a bias's strides


# Rows of one expert are cut into a multiple of ROW_QUANTUM plus a remainder, which is zero-padded to ROW_QUANTUM
# rows, so the GEMM shapes oneDNN compiles repeat across steps: about R / ROW_QUANTUM + 1 distinct row counts per
# weight shape instead of one per count an expert ever receives. (With the remainders unpadded, the bench preset's
# step touched ~270 shapes, and capping oneDNN's caches at 256 slowed it from 2.2 to 2.5 s.)
ROW_QUANTUM = 32


def _pieces(start: int, count: int) -> list[tuple[int, int]]:
    """``[start, start + count)`` as at most two row ranges: a multiple of ``ROW_QUANTUM``, then the rest."""
    whole = count - count % ROW_QUANTUM
    spans = [(start, start + whole)] if whole else []
    if whole < count:
        spans.append((start + whole, start + count))
    return spans


def _rows(t_RX: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows ``a:b`` of ``t``; a remainder piece comes zero-padded to ``ROW_QUANTUM`` rows (zero rows add nothing
    to a weight gradient, and their output rows are dropped)."""
    if (b - a) % ROW_QUANTUM == 0:
        return t_RX[a:b]
    block = t_RX.new_zeros(ROW_QUANTUM, t_RX.shape[1])
    block[: b - a] = t_RX[a:b]
    return block


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` with one oneDNN GEMM per expert piece, forward and backward."""

    @staticmethod
    def forward(ctx, x_RK, w_EOK, counts):
        y_RO = x_RK.new_empty(x_RK.shape[0], w_EOK.shape[1])
        start = 0
        for e, n in enumerate(counts):
            for a, b in _pieces(start, n):
                y_RO[a:b] = mm(_rows(x_RK, a, b), w_EOK[e].t())[: b - a]
            start += n
        ctx.save_for_backward(x_RK, w_EOK)
        ctx.counts = counts
        return y_RO

    @staticmethod
    def backward(ctx, g_RO):
        x_RK, w_EOK = ctx.saved_tensors
        g_RO = g_RO.contiguous()  # e.g. the expanded gradient of a sum
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x_RK.new_empty(x_RK.shape) if need_x else None
        grad_w = torch.empty_like(w_EOK) if need_w else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if need_w and n == 0:
                grad_w[e].zero_()
            for i, (a, b) in enumerate(_pieces(start, n)):
                g = _rows(g_RO, a, b)
                if need_x:
                    grad_x[a:b] = mm(g, w_EOK[e])[: b - a]
                if need_w:
                    gw = mm(g.t(), _rows(x_RK, a, b), transposed_ok=False)
                    if i == 0:
                        grad_w[e] = gw
                    else:
                        grad_w[e] += gw
            start += n
        return grad_x, grad_w, None


def grouped_mm(x_RK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]^T`` for rows sorted by group (``moe.grouped_mm``'s contract), with
    autograd; every GEMM through ``mm``. ``counts_E`` is read on the host once."""
    return _GroupedLinear.apply(x_RK, w_EOK, [int(c) for c in counts_E.tolist()])
