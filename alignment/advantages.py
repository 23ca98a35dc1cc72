"""Outcome-reward advantage estimators for group-sampled rollouts (GRPO family).

Shape legend: B = sequences in the batch (prompts x group size G, in any order), T = completion tokens.
``group_ids_B`` says which prompt each sequence was sampled for; any integer ids work, groups need not be
contiguous or of equal size.

Every estimator returns a per-sequence advantage ``[B]``; ``broadcast_to_tokens`` spreads it over the completion
tokens. A group whose rewards are all equal carries no preference signal, so every estimator returns exactly 0 for
it (no ``0 / eps`` noise) -- dynamic sampling (``sampling.py``) can then drop such groups altogether.

Estimators are picked by name from ``ADVANTAGE_ESTIMATORS``:

- ``grpo``: ``(r - mean_g) / (std_g + eps)``, std unbiased (DeepSeekMath, Shao et al. 2024, sec. 4.1.2).
- ``drgrpo``: ``r - mean_g``, no std division (Dr. GRPO, Liu et al. 2025, sec. 3.1).
- ``rloo``: ``r_i - mean_{j != i} r_j`` (REINFORCE leave-one-out, Ahmadian et al. 2024, sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import Registry

AdvantageFn = Callable[[Tensor, Tensor, float], Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")


@dataclass(frozen=True)
class GroupStats:
    """Per-sequence views of the statistics of each sequence's group (all ``[B]``)."""

    mean: Tensor
    std: Tensor  # unbiased; 0 for groups of size 1
    size: Tensor
    constant: Tensor  # bool: every reward in the group is equal (includes groups of size 1)


def group_stats(rewards_B: Tensor, group_ids_B: Tensor) -> GroupStats:
    """Mean, unbiased std, size and "all rewards equal" of each sequence's group, gathered back to ``[B]``."""
    if rewards_B.dim() != 1 or group_ids_B.shape != rewards_B.shape:
        raise ValueError(
            f"rewards_B and group_ids_B must both be [B]; got {tuple(rewards_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    if not rewards_B.is_floating_point():
        raise TypeError(f"rewards_B must be floating point, got {rewards_B.dtype}")
    _, inv = torch.unique(group_ids_B, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = rewards_B.new_zeros(n_groups)
    size = zeros.index_add(0, inv, torch.ones_like(rewards_B))
    mean = zeros.index_add(0, inv, rewards_B) / size
    sq = zeros.index_add(0, inv, (rewards_B - mean[inv]) ** 2)
    std = torch.where(size > 1, sq / (size - 1).clamp(min=1), zeros).sqrt()
    rmax = zeros.scatter_reduce(0, inv, rewards_B, reduce="amax", include_self=False)
    rmin = zeros.scatter_reduce(0, inv, rewards_B, reduce="amin", include_self=False)
    return GroupStats(mean=mean[inv], std=std[inv], size=size[inv], constant=(rmax == rmin)[inv])


def group_ids_from_size(batch_size: int, group_size: int, device: torch.device | str | None = None) -> Tensor:
    """Ids ``[0]*G + [1]*G + ...`` for a batch laid out prompt-major with ``group_size`` samples per prompt."""
    if group_size <= 0 or batch_size % group_size:
        raise ValueError(f"batch_size {batch_size} is not a positive multiple of group_size {group_size}")
    return torch.arange(batch_size // group_size, device=device).repeat_interleave(group_size)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards_B: Tensor, group_ids_B: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage ``A_i = (r_i - mean_g) / (std_g + eps)``. ``[B], [B] -> [B]``.

    ``std_g`` is the unbiased (n-1) standard deviation, as in the reference implementations.
    Constant groups (including singletons) get exactly 0.
    """
    s = group_stats(rewards_B, group_ids_B)
    adv = (rewards_B - s.mean) / (s.std + eps)
    return torch.where(s.constant, torch.zeros_like(adv), adv)


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def drgrpo_advantages(rewards_B: Tensor, group_ids_B: Tensor, eps: float = 1e-6) -> Tensor:
    """Dr. GRPO advantage ``A_i = r_i - mean_g`` (no std division: removes the question-difficulty bias).

    ``[B], [B] -> [B]``; ``eps`` is accepted for a uniform signature and unused. Pair it with the
    ``seq-mean-token-sum-norm`` aggregation to also remove the length bias.
    """
    s = group_stats(rewards_B, group_ids_B)
    adv = rewards_B - s.mean
    return torch.where(s.constant, torch.zeros_like(adv), adv)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards_B: Tensor, group_ids_B: Tensor, eps: float = 1e-6) -> Tensor:
    """RLOO advantage ``A_i = r_i - (sum_g - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g)``.

    ``[B], [B] -> [B]``; ``eps`` unused. Singleton groups have no baseline and get 0.
    """
    s = group_stats(rewards_B, group_ids_B)
    adv = s.size / (s.size - 1).clamp(min=1) * (rewards_B - s.mean)
    return torch.where(s.constant, torch.zeros_like(adv), adv)


def compute_advantages(name: str, rewards_B: Tensor, group_ids_B: Tensor, eps: float = 1e-6) -> Tensor:
    """Look ``name`` up in ``ADVANTAGE_ESTIMATORS`` and apply it. ``[B], [B] -> [B]``."""
    return ADVANTAGE_ESTIMATORS.get(name)(rewards_B, group_ids_B, eps)


def broadcast_to_tokens(advantages_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Outcome advantage on every completion token, 0 on padding. ``[B], [B, T] -> [B, T]``."""
    return advantages_B.unsqueeze(-1) * mask_BT.to(advantages_B.dtype)
