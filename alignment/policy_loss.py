"""Clipped policy-gradient losses for GRPO and its variants, and how token losses are aggregated.

Shape legend: B = sequences, T = completion tokens (right-padded). ``logp_BT`` are the current policy's log-probs of
the sampled tokens (with grad), ``old_logp_BT`` the behaviour policy's (detached; equal to ``logp_BT.detach()`` on
the first, on-policy update), ``advantages`` are ``[B]`` or ``[B, T]``, ``mask_BT`` is 1 on completion tokens.

Surrogate (PPO, Schulman et al. 2017, eq. 7), with separate clip bounds (DAPO "clip-higher", Yu et al. 2025, sec. 3.1):

    loss_t = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps_low, 1 + eps_high))

Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): for ``A_t < 0`` the loss is also
capped at ``-A_t * c`` (``c > 1``) so one token with a huge ratio cannot blow the update up.

Importance ratio, picked by name from ``POLICY_LOSSES``:

- ``ppo_clip``: per token, ``r_t = pi(y_t) / pi_old(y_t)`` (GRPO / DAPO).
- ``gspo``: per sequence, ``s_i = exp(mean_t log(pi / pi_old))`` (GSPO, Zheng et al. 2025, eq. 7), applied to every
  token of the sequence in its "GSPO-token" form ``sg[s_i] * pi(y_t) / sg[pi(y_t)]`` (eq. 13): same value as
  ``s_i``, and with equal advantages on all tokens the same gradient as the sequence objective. GSPO's paper uses
  far smaller clip ranges (3e-4 / 4e-4) and ``seq-mean-token-mean``; set them in the config.

Aggregation, picked by name from ``LOSS_AGGREGATIONS`` (the three modes of verl's ``agg_loss``):

- ``token-mean``: ``sum_{i,t} l / sum_{i,t} m`` -- every token weighs the same (DAPO sec. 3.3).
- ``seq-mean-token-mean``: ``mean_i (sum_t l / sum_t m)`` -- every sequence weighs the same (original GRPO).
- ``seq-mean-token-sum-norm``: ``sum_{i,t} l / (B * L)`` with a constant ``L`` (``norm_length``, default T) --
  Dr. GRPO sec. 3.1, no length bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kl import KL_ESTIMATORS, kl_penalty
from .metrics import approx_kl, clip_fractions, masked_mean, masked_sum
from .registry import Registry

AggFn = Callable[[Tensor, Tensor, "int | None"], Tensor]
LOSS_AGGREGATIONS: Registry[AggFn] = Registry("loss aggregation")

# exp() of a log-ratio beyond this overflows float32 gradients; verl clamps at the same bound.
MAX_LOG_RATIO = 20.0


@LOSS_AGGREGATIONS.register("token-mean")
def agg_token_mean(loss_BT: Tensor, mask_BT: Tensor, norm_length: int | None = None) -> Tensor:
    """``sum(l * m) / sum(m)``. ``[B, T], [B, T] -> []``; 0 for an empty mask."""
    return masked_mean(loss_BT, mask_BT)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def agg_seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, norm_length: int | None = None) -> Tensor:
    """Mean over sequences of each sequence's token mean. ``[B, T], [B, T] -> []``.

    Sequences with no unmasked token (e.g. a masked truncated completion) are left out of the mean rather than
    counted as zero, so masking one completion does not shrink everyone else's gradient.
    """
    seq_loss_B = masked_mean(loss_BT, mask_BT, dim=-1)
    has_tokens_B = mask_BT.sum(-1) > 0
    return masked_mean(seq_loss_B, has_tokens_B)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, norm_length: int | None = None) -> Tensor:
    """``sum(l * m) / (B * L)`` with ``L = norm_length`` or, if None, ``T``. ``[B, T], [B, T] -> []``."""
    length = mask_BT.shape[-1] if norm_length is None else norm_length
    if length <= 0:
        raise ValueError(f"norm_length must be positive, got {length}")
    return masked_sum(loss_BT, mask_BT) / (loss_BT.shape[0] * length)


def aggregation_units(mask_BT: Tensor, mode: str) -> int | None:
    """What the aggregation named ``mode`` averages over in a batch: unmasked tokens (``token-mean``), sequences
    with at least one (``seq-mean-token-mean``), or sequences (``seq-mean-token-sum-norm``: ``B`` in ``B * L``).
    The trainer weighs micro-batches by it, so the step's loss is that aggregation over the whole batch. None for
    an aggregation registered elsewhere (the trainer then weighs micro-batches equally)."""
    if mode == "token-mean":
        return int(mask_BT.sum())
    if mode == "seq-mean-token-mean":
        return int((mask_BT.sum(-1) > 0).sum())
    if mode == "seq-mean-token-sum-norm":
        return int(mask_BT.shape[0])
    return None


def aggregate_loss(
    loss_BT: Tensor, mask_BT: Tensor, mode: str = "token-mean", norm_length: int | None = None
) -> Tensor:
    """Reduce per-token losses to a scalar with the aggregation named ``mode``. ``[B, T], [B, T] -> []``."""
    return LOSS_AGGREGATIONS.get(mode)(loss_BT, mask_BT, norm_length)


@dataclass
class PolicyLossConfig:
    """Knobs of the GRPO-family loss. Defaults give plain GRPO with symmetric clipping and no KL term."""

    policy_loss: str = field(default="ppo_clip", metadata={"help": "'ppo_clip' (token ratio) or 'gspo' (seq ratio)"})
    eps_low: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "upper clip: ratio <= 1 + eps_high (DAPO uses 0.28)"})
    dual_clip_c: float | None = field(
        default=None, metadata={"help": "dual-clip bound c > 1 for negative advantages (e.g. 3.0); None = off"}
    )
    agg: str = field(
        default="token-mean",
        metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm"},
    )
    norm_length: int | None = field(
        default=None, metadata={"help": "constant L of seq-mean-token-sum-norm; None = padded completion length T"}
    )
    kl_beta: float = field(default=0.0, metadata={"help": "weight of the KL-to-reference term; 0 = no reference"})
    kl_estimator: str = field(default="k3", metadata={"help": "k1 | k2 | k3 (see kl.py)"})
    kl_clamp: float | None = field(default=None, metadata={"help": "clamp per-token KL to [-c, c]; None = off"})

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss {self.policy_loss!r} unknown; known: {POLICY_LOSSES.names()}")
        if self.agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"agg {self.agg!r} unknown; known: {LOSS_AGGREGATIONS.names()}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator {self.kl_estimator!r} unknown; known: {KL_ESTIMATORS.names()}")
        if not (0.0 <= self.eps_low < 1.0) or self.eps_high < 0.0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (it caps -A * ratio from above), got {self.dual_clip_c}")
        if self.kl_beta < 0.0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")


def clipped_surrogate(
    log_ratio_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, cfg: PolicyLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped (and optionally dual-clipped) surrogate loss from a log importance ratio.

    ``[B, T] x3 -> ([B, T], metrics)``; the loss is not masked or aggregated yet.
    """
    ratio = torch.exp(log_ratio_BT.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = advantages_BT
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = clip_fractions(ratio, adv, mask_BT, cfg.eps_low, cfg.eps_high)
    if cfg.dual_clip_c is not None:
        cap = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        metrics["dual_clip_frac"] = masked_mean(dual.float(), mask_BT)
    metrics["ratio_mean"] = masked_mean(ratio.detach(), mask_BT)
    metrics["ratio_max"] = torch.where(mask_BT.bool(), ratio.detach(), torch.zeros_like(ratio)).max()
    return loss, metrics


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossConfig], "tuple[Tensor, dict[str, Tensor]]"]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _as_tokens(advantages: Tensor, mask_BT: Tensor) -> Tensor:
    if advantages.dim() == 1:
        return advantages.unsqueeze(-1).expand_as(mask_BT).to(torch.float32)
    if advantages.shape != mask_BT.shape:
        raise ValueError(f"advantages must be [B] or [B, T]={tuple(mask_BT.shape)}, got {tuple(advantages.shape)}")
    return advantages.float()


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, advantages: Tensor, mask_BT: Tensor, cfg: PolicyLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-ratio clipped surrogate, aggregated by ``cfg.agg``. ``[B, T], [B, T], [B] | [B, T], [B, T] -> []``."""
    adv = _as_tokens(advantages, mask_BT)
    per_token, metrics = clipped_surrogate(logp_BT - old_logp_BT, adv, mask_BT, cfg)
    metrics.update(approx_kl(logp_BT, old_logp_BT, mask_BT))
    return aggregate_loss(per_token, mask_BT, cfg.agg, cfg.norm_length), metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, advantages: Tensor, mask_BT: Tensor, cfg: PolicyLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-ratio (GSPO-token) clipped surrogate. ``[B, T], [B, T], [B] | [B, T], [B, T] -> []``.

    ``log s_i = mean_t (logp - old_logp)`` over the sequence's tokens; every token carries
    ``log s_i`` as its value with the gradient of its own ``logp_t``.
    """
    adv = _as_tokens(advantages, mask_BT)
    seq_log_ratio_B = masked_mean(logp_BT - old_logp_BT, mask_BT, dim=-1)
    log_ratio_BT = logp_BT - logp_BT.detach() + seq_log_ratio_B.detach().unsqueeze(-1)
    per_token, metrics = clipped_surrogate(log_ratio_BT, adv, mask_BT, cfg)
    metrics.update(approx_kl(logp_BT, old_logp_BT, mask_BT))
    return aggregate_loss(per_token, mask_BT, cfg.agg, cfg.norm_length), metrics


def grpo_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    advantages: Tensor,
    mask_BT: Tensor,
    cfg: PolicyLossConfig,
    ref_logp_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full GRPO objective: policy loss named ``cfg.policy_loss`` plus ``kl_beta`` times the aggregated KL.

    ``ref_logp_BT`` is required iff ``cfg.kl_beta > 0`` (with beta 0 no reference model runs at all).
    Returns ``(loss [], metrics)``; metrics include ``pg_loss`` and, with a KL term, ``kl``.
    """
    pg, metrics = POLICY_LOSSES.get(cfg.policy_loss)(logp_BT, old_logp_BT, advantages, mask_BT, cfg)
    metrics["pg_loss"] = pg.detach()
    if cfg.kl_beta == 0.0:
        return pg, metrics
    if ref_logp_BT is None:
        raise ValueError(f"kl_beta={cfg.kl_beta} > 0 needs ref_logp_BT from a reference model; set kl_beta=0 to skip")
    kl = aggregate_loss(
        kl_penalty(logp_BT, ref_logp_BT, cfg.kl_estimator, cfg.kl_clamp), mask_BT, cfg.agg, cfg.norm_length
    )
    metrics["kl"] = kl.detach()
    return pg + cfg.kl_beta * kl, metrics
