"""Sequence packing for SFT with per-sample attention isolation.

Several tokenized examples share one row of length ``max_length``. The model keeps them apart through
``segment_ids`` (1..n for the n samples of a row, 0 for padding): attention is causal *and* restricted to equal
segment ids (``dsalign.model.build_attention_mask``), ``position_ids`` restart at 0 for every sample so RoPE sees
the same positions as an unpacked run, and ``causal_lm_loss(..., segment_ids=...)`` ignores targets that lie in
another sample than the predicting position (main head and every MTP depth).

Additionally the first label of each sample is set to -100: it would be predicted by the previous sample's last
token, which is never a legitimate target even without segment-aware losses.

Shape legend: N = packed rows, L = ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """``input_ids``, ``labels``, ``position_ids``, ``segment_ids`` all ``[N, L]`` (long)."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    segment_ids: Tensor

    @property
    def attention_mask(self) -> Tensor:
        """1 on real tokens, 0 on padding. ``[N, L]``."""
        return (self.segment_ids > 0).long()

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.position_ids, self.segment_ids)))


def plan_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing assignment of example indices to rows of at most ``max_length`` tokens.

    Deterministic: ties keep the original order. Within a row, indices are sorted so samples keep their order.
    An example longer than ``max_length`` is an error (truncate when tokenizing, not here).
    """
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}; truncate it when tokenizing")
        if n <= 0:
            raise ValueError(f"example {i} is empty")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return [sorted(b) for b in bins]


def collate_packed(
    examples: Sequence[dict[str, Sequence[int]]],
    bins: Sequence[Sequence[int]],
    max_length: int,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Lay the examples of each bin side by side in one row. Each example has ``input_ids`` and ``labels``
    (aligned, -100 = no loss). Returns ``[len(bins), max_length]`` tensors, padded on the right."""
    n = len(bins)
    input_ids = torch.full((n, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, max_length), dtype=torch.long)
    segment_ids = torch.zeros((n, max_length), dtype=torch.long)
    for row, members in enumerate(bins):
        cur = 0
        for seg, idx in enumerate(members, start=1):
            ids, lab = examples[idx]["input_ids"], examples[idx]["labels"]
            if len(ids) != len(lab):
                raise ValueError(f"example {idx}: {len(ids)} input_ids but {len(lab)} labels")
            k = len(ids)
            if cur + k > max_length:
                raise ValueError(f"bin {row} holds {cur + k} tokens > max_length {max_length}")
            input_ids[row, cur : cur + k] = torch.as_tensor(ids, dtype=torch.long)
            labels[row, cur : cur + k] = torch.as_tensor(lab, dtype=torch.long)
            labels[row, cur] = IGNORE_INDEX
            position_ids[row, cur : cur + k] = torch.arange(k)
            segment_ids[row, cur : cur + k] = seg
            cur += k
    return PackedBatch(input_ids, labels, position_ids, segment_ids)


def pack_examples(examples: Sequence[dict[str, Sequence[int]]], max_length: int, pad_token_id: int = 0) -> PackedBatch:
    """``plan_bins`` + ``collate_packed``: pack every example into as few rows of ``max_length`` as FFD finds."""
    bins = plan_bins([len(e["input_ids"]) for e in examples], max_length)
    return collate_packed(examples, bins, max_length, pad_token_id)


def collate_padded(
    examples: Sequence[dict[str, Sequence[int]]], pad_token_id: int = 0, max_length: int | None = None
) -> PackedBatch:
    """One example per row (no packing), right-padded: the unpacked baseline, same tensor layout."""
    length = max_length or max(len(e["input_ids"]) for e in examples)
    return collate_packed(examples, [[i] for i in range(len(examples))], length, pad_token_id)
