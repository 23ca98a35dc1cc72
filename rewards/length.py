"""Length rewards: target-length control, DAPO's soft overlong penalty, Kimi-1.5's group length reward, and a
penalty for completions that never stop.

Lengths are token counts from ``completion_ids`` when the trainer passes them (it always does in GRPO), otherwise
characters of the completion text, so the functions stay usable on plain strings (docs, tests, offline scoring).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .accuracy import math_accuracy
from .api import completion_text, register_reward


def completion_lengths(completions: list[Any], completion_ids: list[list[int]] | None) -> list[int]:
    """Tokens per completion if ids are given, else characters.

    >>> completion_lengths(["abc", "de"], None), completion_lengths(["abc", "de"], [[1], [2, 3, 4]])
    ([3, 2], [1, 3])
    """
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


@register_reward("target_length")
def target_length(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    budget: int | None = None,
    length_target: list[int | None] | None = None,
    **columns: Any,
) -> list[float | None]:
    """``max(0, 1 - |len - target| / target)``: 1 at the target, falling linearly, 0 at twice (or zero) the target.

    The target is the ``length_target`` column (budget-conditioned prompts as in L1, arXiv:2503.04697) or a fixed
    ``budget``; a row whose target is ``None`` gets ``None``.

    >>> target_length([""] * 3, ["x" * 100, "x" * 150, "x" * 300], budget=100)
    [1.0, 0.5, 0.0]
    >>> target_length([""] * 2, ["x" * 50, "x" * 50], length_target=[50, None])
    [1.0, None]
    """
    if (budget is None) == (length_target is None):
        raise ValueError("target_length needs exactly one of budget=<int> or a 'length_target' column")
    targets = length_target if length_target is not None else [budget] * len(completions)
    lengths = completion_lengths(completions, completion_ids)
    return [
        None if t is None else max(0.0, 1.0 - abs(n - t) / t) if t > 0 else 0.0
        for n, t in zip(lengths, targets, strict=True)
    ]


@register_reward("soft_overlong")
def soft_overlong(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    max_length: int,
    cache_length: int,
    **columns: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13): 0 up to ``max_length - cache_length``, then a
    linear ramp to -1 at ``max_length``, -1 beyond. Penalises running long without rewarding being short.

    >>> soft_overlong([""] * 4, ["x" * 70, "x" * 90, "x" * 100, "x" * 120], max_length=100, cache_length=20)
    [0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length=} {max_length=}")
    free = max_length - cache_length
    lengths = completion_lengths(completions, completion_ids)
    return [0.0 if n <= free else max(-1.0, (free - n) / cache_length) for n in lengths]


@register_reward("kimi_length")
def kimi_length(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    correct: list[Any] | None = None,
    group_ids: list[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """Kimi k1.5's length reward (arXiv:2501.12599, section 2.3.3), computed within each group of samples.

    ``lambda = 0.5 - (len - min_len) / (max_len - min_len)`` over the group; correct answers get ``lambda`` (shorter
    is better), wrong ones ``min(0, lambda)`` (long wrong answers are penalised, short ones not rewarded).
    Groups are the ``group_ids`` column if given, else samples with the same prompt (GRPO repeats each prompt G
    times in a batch). Correctness is the ``correct`` column if given, else :func:`math_accuracy` on the batch's
    gold column. A group whose lengths are all equal gets 0. Needs the whole batch: the combiner never re-runs it
    sample by sample.

    >>> kimi_length(["q"] * 3, ["x" * 10, "x" * 20, "x" * 30], correct=[1, 1, 0])
    [0.5, 0.0, -0.5]
    """
    n = len(completions)
    for name, column in (("correct", correct), ("group_ids", group_ids)):
        if column is not None and len(column) != n:
            raise ValueError(f"kimi_length: column {name!r} has {len(column)} values for {n} completions")
    if correct is None:
        correct = math_accuracy(prompts, completions, completion_ids, **columns)
    keys = [repr(g) for g in group_ids] if group_ids is not None else [repr(p) for p in prompts]
    lengths = completion_lengths(completions, completion_ids)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    rewards: list[float | None] = [None] * len(completions)
    for members in groups.values():
        shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
        for i in members:
            if correct[i] is None:
                continue
            lam = 0.0 if longest == shortest else 0.5 - (lengths[i] - shortest) / (longest - shortest)
            rewards[i] = lam if correct[i] else min(0.0, lam)
    return rewards


kimi_length.requires_full_batch = True  # type: ignore[attr-defined]


@register_reward("stop_properly")
def stop_properly(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    finish_reason: list[str | None] | None = None,
    penalty: float = 1.0,
    **columns: Any,
) -> list[float | None]:
    """``-penalty`` for a completion cut at the token limit (``finish_reason == "length"``: it never ended its
    answer), 0 for one that stopped; ``None`` where the reason is unknown. The pipelines pass ``finish_reason`` with
    every sample; TRL does not, so outside them the column must be supplied.

    >>> stop_properly([""] * 3, ["a", "b", "c"], finish_reason=["stop", "length", None], penalty=0.5)
    [0.0, -0.5, None]
    """
    if finish_reason is None:
        raise ValueError("stop_properly needs a 'finish_reason' column (stop | length per sample); dsalign's "
                         "pipelines pass it, TRL's trainer does not")  # fmt: skip
    return [None if r is None else -float(penalty) if r == "length" else 0.0 for r in finish_reason]
