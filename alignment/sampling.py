"""Batch shaping around the rollouts: dynamic sampling and overlong reward shaping (DAPO, Yu et al. 2025).

Shape legend: B = sequences (prompts x group size), T = completion tokens.

- Dynamic sampling (DAPO sec. 3.2): a group whose G rewards are all equal has zero advantage under every estimator
  in ``advantages.py`` and contributes no gradient, only noise in the per-token normalisation. Such groups are
  dropped and the batch is refilled by sampling groups for further prompts until it holds ``target_groups``.
- Overlong reward shaping (DAPO sec. 3.4, eq. 13): completions longer than ``max_length - buffer_length`` get a
  penalty growing linearly from 0 to ``-penalty_factor`` at ``max_length``.
- Overlong filtering (DAPO sec. 3.4): completions cut off at the length limit never got to answer; their tokens can
  be masked out of the loss altogether instead of being punished for a length the model might not have chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import Tensor

from .advantages import group_stats

P = TypeVar("P")


def informative_group_mask(rewards_B: Tensor, group_ids_B: Tensor) -> Tensor:
    """True for sequences whose group has at least two different rewards. ``[B], [B] -> [B]`` bool."""
    return ~group_stats(rewards_B, group_ids_B).constant


@dataclass
class DynamicSamplingStats:
    """What one call of ``dynamic_sample`` did, for logging."""

    rounds: int = 0
    prompts_used: int = 0
    groups_kept: int = 0
    groups_dropped: int = 0
    groups_discarded_over_target: int = 0
    shortfall: int = field(default=0, metadata={"help": "target_groups minus groups returned (0 when full)"})


@dataclass
class SampledGroup(Generic[P]):
    """One prompt's G rollouts as returned by the caller's sampler: the rewards and an opaque payload."""

    prompt: P
    rewards: Sequence[float]
    payload: Any = None


def dynamic_sample(
    sample_groups: Callable[[list[P]], list[SampledGroup[P]]],
    prompts: Iterator[P],
    *,
    target_groups: int,
    prompts_per_round: int,
    max_rounds: int = 8,
    allow_partial: bool = False,
) -> tuple[list[SampledGroup[P]], DynamicSamplingStats]:
    """Collect ``target_groups`` groups with non-constant rewards, sampling ``prompts_per_round`` prompts a round.

    ``sample_groups`` runs the rollouts and rewards for a list of prompts (the trainer's business; nothing here
    knows about engines). Groups beyond the target in the last round are discarded, as in DAPO. If the prompts run
    out or ``max_rounds`` rounds did not fill the batch, raise -- the data is probably too easy or too hard -- or,
    with ``allow_partial``, return what was found and report the shortfall.
    """
    if target_groups <= 0 or prompts_per_round <= 0 or max_rounds <= 0:
        raise ValueError("target_groups, prompts_per_round and max_rounds must be positive")
    kept: list[SampledGroup[P]] = []
    stats = DynamicSamplingStats()
    while len(kept) < target_groups and stats.rounds < max_rounds:
        chunk = [p for _, p in zip(range(prompts_per_round), prompts)]
        if not chunk:
            break
        stats.rounds += 1
        stats.prompts_used += len(chunk)
        for group in sample_groups(chunk):
            if len(set(group.rewards)) > 1:
                kept.append(group)
            else:
                stats.groups_dropped += 1
    stats.groups_discarded_over_target = max(0, len(kept) - target_groups)
    kept = kept[:target_groups]
    stats.groups_kept = len(kept)
    stats.shortfall = target_groups - len(kept)
    if stats.shortfall and not allow_partial:
        raise RuntimeError(
            f"dynamic sampling found {len(kept)}/{target_groups} groups with varying rewards after {stats.rounds} "
            f"rounds ({stats.prompts_used} prompts, {stats.groups_dropped} constant groups dropped); the prompts are "
            "too easy or too hard for the policy -- raise max_rounds, filter the data, or pass allow_partial=True"
        )
    return kept, stats


def overlong_penalty(lengths_B: Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (eq. 13), added to the task reward. ``[B] -> [B]`` float32.

    ``0`` for ``len <= max_length - buffer_length``; ``(max_length - buffer_length - len) / buffer_length`` inside
    the buffer (reaching ``-1`` at ``max_length``); ``-1`` beyond; all times ``penalty_factor``.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length <= max_length, got {buffer_length}, {max_length}")
    start = max_length - buffer_length
    over = (lengths_B.float() - start).clamp(min=0.0)
    return -penalty_factor * (over / buffer_length).clamp(max=1.0)


def mask_truncated(mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """Zero the loss mask of completions that hit the length limit (DAPO overlong filtering). ``[B, T] -> [B, T]``.

    ``truncated_B`` is True where generation stopped on the length limit rather than on EOS.
    """
    return mask_BT * (~truncated_B.bool()).unsqueeze(-1).to(mask_BT.dtype)


def truncated_from_lengths(lengths_B: Tensor, ended_with_eos_B: Tensor, max_length: int) -> Tensor:
    """A completion is truncated when it reached ``max_length`` tokens without emitting EOS. ``[B], [B] -> [B]``."""
    return (lengths_B >= max_length) & ~ended_with_eos_B.bool()
