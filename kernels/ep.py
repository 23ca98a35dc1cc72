"""Expert parallelism: experts sharded over a process group, tokens moved by all-to-all (DeepSeek-V3 section 3.4).

Shape legend: N local tokens, K experts per token, H hidden, I expert intermediate size, W EP world size,
L = E / W local experts, R rows (token-expert assignments).

Rank r owns experts [r*L, (r+1)*L). One MoE call:
  1. sort the N*K assignments by global expert id (so also by destination rank);
  2. exchange the per-(rank, local expert) row counts with one ``all_to_all_single`` (counts first ...);
  3. send the token rows with a second ``all_to_all_single`` (... then tokens);
  4. regroup the received rows (ordered source rank -> local expert) by local expert, run the local experts with
     the grouped GEMM of ``moe.swiglu_experts`` (bf16 or FP8, Triton on CUDA);
  5. undo the regrouping, all-to-all the results back (combine), weight by the router and sum per token.
The token all-to-alls are an ``autograd.Function`` whose backward runs the reverse all-to-all, so the same path
serves the training forward/backward and the generation forward. The combine weights stay on the token's rank,
so their gradient needs no communication.

Node-limited routing (each token's experts lie on at most M nodes) is a constraint the gate already applies; the
dispatch here moves whatever indices arrive. Works on gloo (CPU) and NCCL (CUDA tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dsalign.kernels.grouped_gemm import ExpertWeightCache
from dsalign.kernels.moe import combine_rows, permute_by_expert, swiglu_experts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends the gradients back along the reverse splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0: ``send_splits[r]`` rows go to rank r."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def exchange_counts(counts_WL: torch.Tensor, group=None) -> torch.Tensor:
    """Counts first: rank r sends row ``counts_WL[d]`` (its rows per expert of rank d) to rank d.

    Returns ``recv_WL`` [W, L]: rows each source rank will send to each of this rank's experts.
    """
    recv = torch.empty_like(counts_WL)
    dist.all_to_all_single(recv, counts_WL.contiguous(), group=group)
    return recv


def _regroup_index(recv_WL: torch.Tensor) -> torch.Tensor:
    """Order that turns rows laid out (source rank, local expert) into (local expert, source rank)."""
    w, l = recv_WL.shape
    block_start = (torch.cumsum(recv_WL.flatten(), 0) - recv_WL.flatten()).view(w, l)
    starts = block_start.t().flatten()  # blocks in (expert, source) order
    lengths = recv_WL.t().flatten()
    block_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first_row_of_block = torch.cumsum(lengths, 0) - lengths
    offset_in_block = torch.arange(block_of_row.numel(), device=lengths.device) - first_row_of_block[block_of_row]
    return starts[block_of_row] + offset_in_block


def ep_moe_forward(
    x_NH: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    local_gate_up: torch.Tensor,
    local_down: torch.Tensor,
    group=None,
    fp8: bool = False,
    backend: str = "auto",
    caches: tuple[ExpertWeightCache, ExpertWeightCache] | None = None,
) -> torch.Tensor:
    """Expert-parallel ``moe_experts_forward``: same result as the single-process call with all E experts.

    Args:
        x_NH: [N, H] this rank's tokens. topk_idx_NK: [N, K] global expert ids in [0, W*L).
        topk_weight_NK: [N, K] combine weights.
        local_gate_up: [L, 2I, H] and local_down: [L, H, I]: this rank's experts (rank r owns r*L ... r*L+L-1).
        group: the EP process group (default: the world). fp8, backend, caches: as in ``moe.swiglu_experts``.
    Returns:
        [N, H] in x's dtype; differentiable w.r.t. x, the local expert weights and the combine weights.
    """
    world = dist.get_world_size(group)
    n_local = local_gate_up.shape[0]
    num_experts = world * n_local
    if topk_idx_NK.numel() and (int(topk_idx_NK.min()) < 0 or int(topk_idx_NK.max()) >= num_experts):
        raise ValueError(
            f"ep_moe_forward: expert ids must lie in [0, {num_experts}) for EP={world} x {n_local} local experts; "
            f"got [{int(topk_idx_NK.min())}, {int(topk_idx_NK.max())}]"
        )
    order, token_of_row, counts_E = permute_by_expert(topk_idx_NK, num_experts)
    counts_WL = counts_E.view(world, n_local)
    recv_WL = exchange_counts(counts_WL, group)
    send_splits, recv_splits = counts_WL.sum(1).tolist(), recv_WL.sum(1).tolist()

    x_rows = all_to_all(x_NH.index_select(0, token_of_row), send_splits, recv_splits, group)
    regroup = _regroup_index(recv_WL)
    y_rows = swiglu_experts(
        x_rows.index_select(0, regroup), local_gate_up, local_down, recv_WL.sum(0), fp8=fp8, backend=backend,
        caches=caches,
    )  # fmt: skip
    inverse = torch.empty_like(regroup)
    inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
    y_back = y_rows.index_select(0, inverse)
    y_sorted = all_to_all(y_back, recv_splits, send_splits, group)
    return combine_rows(y_sorted, topk_weight_NK, order, token_of_row, x_NH)
