"""Supervised fine-tuning: conversations -> packed token batches -> CE on assistant tokens plus the MTP term.

The loss is the model's own ``causal_lm_loss`` (``CE_main + mtp_lambda / D * sum_k CE_k``, DeepSeek-V3 sec. 2.2),
with labels that are -100 everywhere except on assistant tokens (``chat.tokenize_conversation``), and with the
packed ``segment_ids`` so no target is predicted across two samples. The model's MoE balance loss (already weighted
by its config's alpha) is added with ``aux_loss_coef``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from dsalign.model import causal_lm_loss
from torch import Tensor

from .chat import ConversationError, tokenize_conversation
from .packing import PackedBatch
from .trainer.step import fused_head_weight

log = logging.getLogger(__name__)

@dataclass
class SFTConfig:
    """Knobs of the SFT loss and its data preparation."""

    max_length: int = field(default=4096, metadata={"help": "tokens per packed row; longer conversations truncate"})
    mtp_lambda: float = field(default=0.1, metadata={"help": "weight of the MTP loss (V3: 0.3, then 0.1)"})
    aux_loss_coef: float = field(default=1.0, metadata={"help": "multiplier of the model's MoE balance loss"})
    thinking: bool = field(default=False, metadata={"help": "R1 style: '<think>\\n' is part of the prompt"})
    messages_field: str = field(default="messages", metadata={"help": "dataset column holding conversations"})
    skip_invalid: bool = field(default=False, metadata={"help": "drop conversations that cannot be masked"})


def build_sft_examples(
    rows: Iterable[dict[str, Any]], tokenizer: Any, cfg: SFTConfig
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenize conversations into ``{"input_ids", "labels"}`` (assistant tokens only in the labels).

    Returns ``(examples, num_skipped)``; a conversation that cannot be masked raises ``ConversationError``
    naming its row, unless ``cfg.skip_invalid``. Conversations cut at ``cfg.max_length`` are counted and logged
    (a warning naming the count, the longest and the first row).
    """
    examples, skipped, truncated = [], 0, []
    for i, row in enumerate(rows):
        where = f"row {i + 1}" + (f" (prompt_id {row['prompt_id']})" if row.get("prompt_id") else "")
        try:
            if cfg.messages_field not in row:
                raise ConversationError(f"{where}: no {cfg.messages_field!r} field (fields: {sorted(row)})")
            conv = tokenize_conversation(
                tokenizer, row[cfg.messages_field], thinking=cfg.thinking, max_length=cfg.max_length, where=where
            )
        except ConversationError:
            if not cfg.skip_invalid:
                raise
            skipped += 1
            continue
        examples.append({"input_ids": conv.input_ids, "labels": conv.labels()})
        if conv.truncated:
            truncated.append((conv.full_length, where))
    if truncated:
        log.warning("%d of %d conversations were cut to max_length=%d tokens (longest %d tokens; first: %s); raise "
                    "max_length to train on their ends", len(truncated), len(examples), cfg.max_length,
                    max(n for n, _ in truncated), truncated[0][1])  # fmt: skip
    return examples, skipped


def sft_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    mtp_lambda: float = 0.1,
    aux_loss_coef: float = 1.0,
    fused_ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Forward a packed batch and return ``(loss [], metrics)``.

    ``loss = CE(assistant tokens) + mtp_lambda / D * sum_k CE_k + aux_loss_coef * aux_loss``. ``fused_ce`` (default)
    computes the CE terms with the fused chunked head + cross-entropy (``kernels.fused_ce``, no [B, T, V] logits;
    same values up to fp32 rounding; the logits path under ZeRO-3, see ``trainer.step.fused_head_weight``).
    """
    head_weight = fused_head_weight(model) if fused_ce else None
    out = model(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        segment_ids=batch.segment_ids,
        compute_mtp=mtp_lambda > 0,
        return_logits=head_weight is None,
    )
    loss, metrics = causal_lm_loss(out, batch.labels, mtp_lambda, batch.segment_ids, head_weight)
    if aux_loss_coef and out.aux_loss is not None:
        loss = loss + aux_loss_coef * out.aux_loss
        metrics["aux_loss"] = float(out.aux_loss.detach())
    metrics["target_tokens"] = float((batch.labels != -100).sum())
    return loss, metrics
