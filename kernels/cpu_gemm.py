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
raises if oneDNN cannot run; ``"torch"`` always uses torch's own ``mm``. Small GEMMs stay on torch: oneDNN's fixed
cost per call (~15 us) loses below ~2M multiply-adds (a 64 x 192 x 96 decode projection: 20 vs 17 us).

oneDNN builds (JIT-compiles) a kernel per distinct shape and keeps it in an LRU cache; a new shape costs ~0.4 ms
once. Fixed shapes (dense projections, the LM head) hit the cache every step; the MoE grouped GEMM, whose row counts
per expert change every step, rounds each expert's rows into a few fixed-size pieces (``grouped_mm``).

Everything here is a drop-in for the torch op it replaces, with autograd where the caller needs it: ``linear``
(``F.linear``), ``mm`` (``a @ b``, no autograd: for the custom backward passes of fused kernels) and ``grouped_mm``.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

POLICIES = ("auto", "onednn", "torch")
MIN_MACS = 1 << 21  # below ~2M multiply-adds oneDNN's per-call cost outweighs its faster kernel

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


def use_onednn(a: torch.Tensor, b: torch.Tensor, macs: int) -> bool:
    """Whether a GEMM of ``macs`` multiply-adds on ``a`` and ``b`` goes to oneDNN under the current policy."""
    policy = get_cpu_gemm()
    if policy == "torch" or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if policy == "onednn" and not onednn_available():
        raise RuntimeError("DSALIGN_CPU_GEMM=onednn, but this torch build cannot run oneDNN's linear op")
    return macs >= MIN_MACS and onednn_available()


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D operands (any strides); oneDNN where ``use_onednn`` says so. No autograd."""
    M, K = a_MK.shape
    N = b_KN.shape[1]
    if use_onednn(a_MK, b_KN, M * K * N):
        return _linear_op(a_MK, b_KN.t(), None)
    return a_MK @ b_KN


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
        g_MN = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm(g_MN, weight).view(*x.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = mm(g_MN.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_MN.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with oneDNN GEMMs for large fp32 CPU products (forward and backward alike)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dim() < 2 or not use_onednn(x, weight, rows * weight.shape[0] * weight.shape[1]):
        return F.linear(x, weight, bias)
    if bias is not None and bias.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


# Rows of one expert are cut into a multiple of ROW_QUANTUM plus a remainder, so the GEMM shapes oneDNN compiles
# repeat across steps (about R / ROW_QUANTUM + ROW_QUANTUM distinct row counts per weight shape, instead of one
# per count an expert ever receives).
ROW_QUANTUM = 32


def _pieces(start: int, count: int) -> list[tuple[int, int]]:
    """``[start, start + count)`` as at most two row ranges: a multiple of ``ROW_QUANTUM``, then the rest."""
    whole = count - count % ROW_QUANTUM
    spans = [(start, start + whole)] if whole else []
    if whole < count:
        spans.append((start + whole, start + count))
    return spans


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` with one oneDNN GEMM per expert piece, forward and backward."""

    @staticmethod
    def forward(ctx, x_RK, w_EOK, counts):
        y_RO = x_RK.new_empty(x_RK.shape[0], w_EOK.shape[1])
        start = 0
        for e, n in enumerate(counts):
            for a, b in _pieces(start, n):
                y_RO[a:b] = mm(x_RK[a:b], w_EOK[e].t())
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
                if need_x:
                    grad_x[a:b] = mm(g_RO[a:b], w_EOK[e])
                if need_w and i == 0:
                    grad_w[e] = mm(g_RO[a:b].t(), x_RK[a:b])
                elif need_w:
                    grad_w[e] += mm(g_RO[a:b].t(), x_RK[a:b])
            start += n
        return grad_x, grad_w, None


def grouped_mm(x_RK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]^T`` for rows sorted by group (``moe.grouped_mm``'s contract), with
    autograd; every GEMM through ``mm``. ``counts_E`` is read on the host once."""
    return _GroupedLinear.apply(x_RK, w_EOK, [int(c) for c in counts_E.tolist()])
