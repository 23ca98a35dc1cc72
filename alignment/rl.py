"""GRPO's training-side glue: rollouts -> padded token batch -> per-token log-probs -> the policy loss.

Shape legend: B sequences (prompt + completion), T padded length, V vocab.

Log-probs are computed exactly as the rollout engine computes them (temperature-scaled log-softmax of the same
model's logits), so with on-policy data the importance ratio starts at 1 up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from dsalign.kernels.fused_ce import fused_linear_logprobs
from dsalign.model import mtp_loss
from torch import Tensor

from .metrics import entropy_from_logits, logprobs_from_logits
from .policy_loss import PolicyLossConfig, aggregation_units, grpo_loss
from .trainer.step import fused_head_weight


def build_rl_batch(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
    shared_prompts: bool = True,
) -> dict[str, Tensor]:
    """Right-padded ``prompt + completion`` rows.

    Returns ``input_ids`` [B, T], ``attention_mask`` [B, T], and ``completion_mask`` [B, T] (1 where the token at
    that position is a completion token, i.e. where its log-prob enters the loss). With ``shared_prompts`` also
    ``prompt_group`` [B] (rows with the same prompt tokens share an id) and ``prompt_len`` [B]: the forwards of
    ``token_logprobs`` then compute each distinct prompt once per micro-batch (``model/layout.py``; same results).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"build_rl_batch: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(rows[b], dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, len(p) : n] = 1.0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if shared_prompts:
        ids: dict[tuple[int, ...], int] = {}
        batch["prompt_group"] = torch.tensor([ids.setdefault(tuple(p), len(ids)) for p in prompt_ids], dtype=torch.long)
        batch["prompt_len"] = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    return batch


def forward_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch of ``build_rl_batch``: its attention mask and, when the batch
    carries prompt groups, ``shared_prompts``."""
    kw: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
    if "prompt_group" in batch:
        kw["shared_prompts"] = (batch["prompt_group"], batch["prompt_len"])
    return kw


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]], completions: Sequence[Any], pad_id: int, shared_prompts: bool = True
) -> dict[str, Tensor]:
    """``build_rl_batch`` of rollout completions (objects with ``token_ids`` and ``logprobs``; one prompt per
    completion) plus their log-probs as ``old_logp`` [B, T], aligned with the tokens (0 off the completions)."""
    batch = build_rl_batch(prompt_ids, [c.token_ids for c in completions], pad_id, shared_prompts)
    old = torch.zeros_like(batch["completion_mask"])
    for b, (p, c) in enumerate(zip(prompt_ids, completions)):
        old[b, len(p) : len(p) + len(c.token_ids)] = torch.tensor(c.logprobs, dtype=old.dtype)
    batch["old_logp"] = old
    return batch


def token_logprobs(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    compute_mtp: bool = False,
    fused: bool = True,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Any]:
    """``logp[b, t] = log softmax(logits[b, t-1] / temperature)[input_ids[b, t]]`` (0 at t = 0), float32 [B, T].

    Also returns the per-token entropy (same alignment) when asked, and the model output (for aux losses).
    ``fused`` (default): the model returns its head inputs and ``kernels.fused_ce.fused_linear_logprobs`` computes
    both in row chunks, never holding the [B, T, V] logits (same values up to fp32 rounding; the backward recomputes
    each chunk's logits). Then the output has ``hidden`` / ``mtp_hidden`` instead of ``logits`` / ``mtp_logits``.
    Under ZeRO-3 the logits path runs (``trainer.step.fused_head_weight``).
    ``positions`` [B, T] (e.g. the completion mask): only those tokens' log-probs and entropies are computed, the
    rest are 0. With the fused head the head GEMMs then run over those rows only (TRL's ``logits_to_keep``: prompt
    and padding tokens cost no vocabulary projection, forward or backward). A batch with ``prompt_group`` /
    ``prompt_len`` runs each shared prompt once (``forward_inputs``).
    """
    ids = batch["input_ids"]
    head_weight = fused_head_weight(model) if fused else None
    out = model(ids, compute_mtp=compute_mtp, return_logits=head_weight is None, **forward_inputs(batch))
    keep_N = None if positions is None else positions[:, 1:].reshape(-1).bool()
    if head_weight is not None:
        B, T = ids.shape
        hidden_ND = out.hidden[:, :-1].reshape(-1, out.hidden.shape[-1])
        target_N = ids[:, 1:].reshape(-1)
        if keep_N is None:
            logp, ent = fused_linear_logprobs(hidden_ND, head_weight, target_N, 1.0 / temperature)
        else:
            rows = keep_N.nonzero().squeeze(1)
            logp_K, ent_K = fused_linear_logprobs(hidden_ND.index_select(0, rows), head_weight, target_N[rows],
                                                  1.0 / temperature)  # fmt: skip
            zeros_N = hidden_ND.new_zeros(hidden_ND.shape[0], dtype=torch.float32)
            logp, ent = zeros_N.index_copy(0, rows, logp_K), zeros_N.index_copy(0, rows, ent_K)
        logp, ent = logp.view(B, T - 1), ent.view(B, T - 1)
    else:
        logits = out.logits[:, :-1].float() / temperature
        logp = logprobs_from_logits(logits, ids[:, 1:])
        ent = entropy_from_logits(logits) if with_entropy else None
        if keep_N is not None:
            keep_BT = keep_N.view(logp.shape)
            logp = logp.masked_fill(~keep_BT, 0.0)
            ent = ent.masked_fill(~keep_BT, 0.0) if with_entropy else None
    logp = torch.nn.functional.pad(logp, (1, 0))
    ent = torch.nn.functional.pad(ent, (1, 0)) if with_entropy else None
    return logp, ent, out


def grpo_loss_fn(
    cfg: PolicyLossConfig, temperature: float = 1.0, aux_loss_coef: float = 1.0, mtp_lambda: float = 0.0
) -> Callable[[torch.nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """A trainer loss function over batches holding ``input_ids``, ``attention_mask``, ``completion_mask``,
    ``old_logp`` [B, T], ``advantages`` [B] and, when ``cfg.kl_beta > 0``, ``ref_logp`` [B, T].

    With ``mtp_lambda > 0`` the MTP modules keep training during RL: their CE on the sampled completion tokens
    (the policy's own continuations) is added with weight ``mtp_lambda / D``, so speculative decoding stays useful.
    """

    def loss_fn(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        mask = batch["completion_mask"]
        logp, ent, out = token_logprobs(model, batch, temperature, with_entropy=True, compute_mtp=mtp_lambda > 0,
                                        positions=mask)  # fmt: skip
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg, batch.get("ref_logp"))
        if aux_loss_coef and out.aux_loss is not None:
            loss = loss + aux_loss_coef * out.aux_loss
        if mtp_lambda > 0:
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            mtp, mtp_metrics = mtp_loss(out, labels, mtp_lambda, head_weight=fused_head_weight(model))
            loss = loss + mtp
            metrics.update(mtp_metrics)
        n = mask.sum().clamp(min=1)
        plain = {k: float(v) for k, v in metrics.items()}
        plain["entropy"] = float((ent.detach() * mask).sum() / n)
        if not bool(mask.any()):  # nothing in the loss here (e.g. every completion masked as truncated): no token
            plain = {k: math.nan for k in plain}  # statistics to report; the trainer averages over the others
        return loss, plain

    loss_fn.units = lambda batch: aggregation_units(batch["completion_mask"], cfg.agg)
    return loss_fn


def rollout_is_weights(
    train_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS) for a rollout engine whose log-probs differ from the trainer's.

    The same weights give slightly different log-probs in the rollout's decode and the trainer's forward when they
    round differently (bf16: the absorbed latent attention vs the expanded one). Samples come from
    ``pi_rollout``; the objective is about ``pi_old`` (the trainer's). Each token's policy-gradient term is weighted by
    ``w = min(pi_old / pi_rollout, cap)`` (detached; Yao et al. 2025, TRL's ``vllm_importance_sampling_cap``), and
    the PPO ratio is taken against ``pi_old``. ``[B, T] x3 -> (w [B, T], 0 off the mask; metrics)``.
    """
    if cap < 1.0:
        raise ValueError(f"rollout_is_weights: cap must be >= 1 (a weight bound), got {cap}")
    on = mask_BT.bool()
    log_w = (train_logp_BT - rollout_logp_BT).float()
    w = torch.exp(log_w.clamp(max=math.log(cap))) * on
    return w, rollout_is_metrics(log_w[on], cap)


def rollout_is_metrics(log_w_N: Tensor, cap: float) -> dict[str, float]:
    """TIS statistics of N completion tokens' ``log pi_old - log pi_rollout``: mean weight, capped share, mean and
    max absolute log-prob gap (NaN for N = 0)."""
    if log_w_N.numel() == 0:
        return dict.fromkeys(ROLLOUT_IS_METRICS, math.nan)
    log_w_N = log_w_N.double()  # means of many tokens, and shares that are exact fractions
    diff = log_w_N.abs()
    return {
        "rollout_is_weight_mean": float(torch.exp(log_w_N.clamp(max=math.log(cap))).mean()),
        "rollout_is_capped_frac": float((log_w_N > math.log(cap)).double().mean()),
        "rollout_logp_diff_mean": float(diff.mean()),
        "rollout_logp_diff_max": float(diff.max()),
    }


ROLLOUT_IS_METRICS = ("rollout_is_weight_mean", "rollout_is_capped_frac", "rollout_logp_diff_mean",
                      "rollout_logp_diff_max")  # fmt: skip


def correct_for_rollout(
    model: torch.nn.Module, micro_batches: list[dict[str, Tensor]], temperature: float, cap: float
) -> dict[str, float]:
    """Apply TIS (``rollout_is_weights``) to GRPO micro-batches in place, before the update.

    Each micro-batch's ``old_logp`` (the rollout's) is replaced by the trainer's log-probs of the same tokens under
    the current weights (no gradient; eval mode, so adapter dropout is off) and its ``advantages`` become per-token
    ``A * w``. Folding ``w > 0`` into the advantage scales every term of the clipped surrogate (and the dual clip's
    cap) by ``w``, so any policy loss and aggregation apply it unchanged. Call it under the update's autocast.
    Returns the metrics over completion tokens (means, and ``*_max`` maxima; NaN without any) and their count
    ``rollout_tokens``."""
    was_training = model.training
    model.eval()
    gaps = []  # every completion token's log pi_old - log pi_rollout
    try:
        for mb in micro_batches:
            mask = mb["completion_mask"]
            with torch.no_grad():
                train_logp = token_logprobs(model, mb, temperature, positions=mask)[0]
            w, _ = rollout_is_weights(train_logp, mb["old_logp"], mask, cap)
            gaps.append((train_logp - mb["old_logp"]).float()[mask.bool()])
            adv = mb["advantages"]
            mb["advantages"] = (adv[:, None] if adv.dim() == 1 else adv).float() * w
            mb["old_logp"] = train_logp
    finally:
        model.train(was_training)
    log_w_N = torch.cat(gaps) if gaps else torch.zeros(0)
    return {**rollout_is_metrics(log_w_N, cap), "rollout_tokens": log_w_N.numel()}
