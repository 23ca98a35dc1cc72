"""Grouped MoE expert computation: permute tokens by expert, one grouped GEMM per projection, unpermute.

Shape legend: N tokens, K experts per token, E experts (local), H hidden, I expert intermediate size.

Expert weights are stacked like ``nn.Linear`` weights, one slab per expert:
``gate_up_proj`` [E, 2I, H] (gate rows first, as transformers v5 fuses them) and ``down_proj`` [E, H, I].

The hot path never loops over experts in Python: tokens are sorted by expert id and every projection is a single
grouped GEMM: the Triton kernels of ``grouped_gemm.py`` on CUDA (bf16 or FP8), and on CPU ``torch._grouped_mm``
where the backend supports it, otherwise a padded batched matmul (FP8 emulated through the same quantization).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsalign.kernels import cpu_gemm
from dsalign.kernels.grouped_gemm import ExpertWeightCache, grouped_gemm


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded (stride-0) gradients such as the one ``y.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype) whether ``torch._grouped_mm`` runs here."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                x = torch.zeros(16, 16, device=device, dtype=dtype)
                w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                torch._grouped_mm(x, w, offs=offs)
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _aligned16(*tensors: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned data and strides (e.g. an fp32 hidden or intermediate size that
    is a multiple of 4); the padded ``bmm`` takes any shape."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(stride != 1 and (stride * size) % 16 for stride in t.stride()):
            return False
    return True


def torch_grouped_mm_runs(x_NK: torch.Tensor, w_EOK: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``x @ w[e].T`` here: the backend supports the dtype, there are rows, and
    the operands are 16-byte aligned."""
    return x_NK.shape[0] > 0 and _grouped_mm_supported(x_NK.device, x_NK.dtype) and _aligned16(
        x_NK, w_EOK.transpose(1, 2)
    )


def combine_rows(y_sorted: torch.Tensor, topk_weight_NK: torch.Tensor, order: torch.Tensor, token_of_row: torch.Tensor,
                 x_NH: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``sum_k w_k * y_k`` per token from expert-sorted rows (``permute_by_expert``'s ``order`` / ``token_of_row``),
    summed in fp32 when the experts ran in bf16 under autocast; returned in x's dtype."""
    acc_dtype = torch.promote_types(y_sorted.dtype, x_NH.dtype)
    weight_sorted = topk_weight_NK.reshape(-1).index_select(0, order).to(acc_dtype)
    out = torch.zeros(x_NH.shape[0], x_NH.shape[-1], dtype=acc_dtype, device=x_NH.device)
    out.index_add_(0, token_of_row, y_sorted.to(acc_dtype) * weight_sorted[:, None])
    return out.to(x_NH.dtype)


def grouped_mm_padded(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM through one padded ``bmm``: rows of group e (contiguous in ``x``) times ``w[e]``.

    Works on every backend and dtype. Memory is E x max(count) rows; fine for the small CPU models it serves.
    """
    num_groups = w_EKO.shape[0]
    n_rows = x_NK.shape[0]
    if n_rows == 0:
        # a 0-row product, not new_zeros: the result must stay in the autograd graph. Under expert parallelism a
        # rank whose experts got no rows still has to run the all-to-all backward its peers are waiting in
        return x_NK @ w_EKO[0]
    counts_list = counts_E.tolist()
    cap = max(counts_list)
    starts = torch.cumsum(counts_E, 0) - counts_E
    group_of_row = torch.repeat_interleave(torch.arange(num_groups, device=x_NK.device), counts_E)
    slot_of_row = torch.arange(n_rows, device=x_NK.device) - starts[group_of_row]
    flat_index = group_of_row * cap + slot_of_row
    padded = x_NK.new_zeros(num_groups * cap, x_NK.shape[-1]).index_copy(0, flat_index, x_NK)
    out = torch.bmm(padded.view(num_groups, cap, -1), w_EKO)
    return out.view(num_groups * cap, -1).index_select(0, flat_index)


def grouped_mm(x_NK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e].T`` for rows sorted by group; ``w`` is [E, out, in] (Linear layout).

    Args:
        x_NK: [N, in] rows sorted by group.
        w_EOK: [E, out, in] stacked weights.
        counts_E: [E] int rows per group, summing to N.
    Returns:
        [N, out].
    """
    if x_NK.dim() != 2 or w_EOK.dim() != 3 or x_NK.shape[-1] != w_EOK.shape[-1]:
        raise ValueError(
            f"grouped_mm: expected x [N, K] and w [E, O, K], got {tuple(x_NK.shape)} and {tuple(w_EOK.shape)}"
        )
    (num_groups, out_features, in_features), rows = w_EOK.shape, x_NK.shape[0]
    # oneDNN runs one GEMM per expert: worth it when an average expert's GEMM qualifies (in a decode step the
    # experts get a few rows each, and torch's single grouped call beats a Python loop over them).
    per_group = -(-rows // num_groups)
    if rows and cpu_gemm.use_onednn(x_NK, w_EOK, per_group, in_features, out_features):
        return cpu_gemm.grouped_mm(x_NK, w_EOK, counts_E)
    w_EKO = w_EOK.transpose(1, 2)
    if torch_grouped_mm_runs(x_NK, w_EOK):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_NK, w_EKO, offs=offs))
    return grouped_mm_padded(x_NK, w_EKO, counts_E)


def permute_by_expert(topk_idx_NK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N*K (token, expert) assignments by expert.

    Returns:
        order: [N*K] positions into the flattened ``topk_idx`` in expert order (stable, so token order is kept
            inside each expert).
        token_of_row: [N*K] source token of each sorted row.
        counts_E: [E] rows per expert.
    """
    flat = topk_idx_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_row = order // topk_idx_NK.shape[-1]
    # index_add rather than bincount: bincount sizes its output from the data, a host sync on CUDA
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    return order, token_of_row, counts_E


def swiglu_experts(
    x_NH: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    counts_E: torch.Tensor,
    fp8: bool = False,
    backend: str = "auto",
    caches: tuple[ExpertWeightCache, ExpertWeightCache] | None = None,
) -> torch.Tensor:
    """SwiGLU over rows already grouped by expert: ``down(silu(gate x) * up x)`` with one grouped GEMM each.

    ``fp8``: FP8 grouped GEMMs (DeepSeek-V3 tiling); ``backend``: "auto" (CUDA: Triton, or torch's grouped GEMM
    for aligned bf16; CPU: torch), "triton", "torch"; ``caches``: (gate_up, down) fp8 weight caches owned by the
    layer, so generation does not requantize.
    """
    cache_gu, cache_down = caches if caches is not None else (None, None)
    gate_up = grouped_gemm(x_NH, gate_up_proj, counts_E, fp8=fp8, cache=cache_gu, backend=backend)
    gate, up = gate_up.chunk(2, dim=-1)
    return grouped_gemm(F.silu(gate) * up, down_proj, counts_E, fp8=fp8, cache=cache_down, backend=backend)


def moe_experts_forward(
    x_NH: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    fp8: bool = False,
    backend: str = "auto",
    caches: tuple[ExpertWeightCache, ExpertWeightCache] | None = None,
) -> torch.Tensor:
    """Routed-expert output ``sum_k w_k * Expert_{idx_k}(x)`` for every token, computed grouped.

    Args:
        x_NH: [N, H] tokens.
        topk_idx_NK: [N, K] expert ids in [0, E).
        topk_weight_NK: [N, K] combine weights.
        gate_up_proj: [E, 2I, H]; down_proj: [E, H, I].
        fp8, backend, caches: see ``swiglu_experts``.
    Returns:
        [N, H] in x's dtype; differentiable w.r.t. x, the weights and the combine weights.
    """
    order, token_of_row, counts_E = permute_by_expert(topk_idx_NK, gate_up_proj.shape[0])
    x_sorted = x_NH.index_select(0, token_of_row)
    y_sorted = swiglu_experts(x_sorted, gate_up_proj, down_proj, counts_E, fp8=fp8, backend=backend, caches=caches)
    return combine_rows(y_sorted, topk_weight_NK, order, token_of_row, x_NH)


def moe_experts_reference(
    x_NH: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Plain per-expert loop; the readable reference the grouped path is tested (and benchmarked) against."""
    out = torch.zeros_like(x_NH)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(topk_idx_NK == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x_NH[token], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        out = out.index_add(0, token, y * topk_weight_NK[token, slot, None].to(y.dtype))
    return out
