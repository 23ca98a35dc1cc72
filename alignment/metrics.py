"""Masked reductions and the diagnostics every RL step logs.

Shape legend: B = sequences in the batch, T = completion tokens (right-padded), V = vocabulary.
``mask_BT`` is 1 for real completion tokens and 0 for padding (and for tokens excluded from the loss).

All functions are pure: tensors in, tensors out, nothing is ``.item()``-ed here so that a trainer on GPU can
batch the host syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is non-zero. ``x`` and ``mask`` broadcast to the same shape."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero; 0 (not NaN) where the mask is empty."""
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return total / count.clamp(min=1.0)


def logprobs_from_logits(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Log-probability of ``labels_BT`` under ``softmax(logits_BTV)``; returns ``[B, T]`` in float32.

    The logits and labels must already be aligned (logits at position t score label t). Computed as
    ``logit[label] - logsumexp(logits)`` in float32 so bf16 logits do not lose the small differences the
    importance ratio depends on.
    """
    logits = logits_BTV.float()
    picked = torch.gather(logits, -1, labels_BT.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` per position; ``[B, T, V] -> [B, T]`` float32."""
    logits = logits_BTV.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def approx_kl(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    """Two estimates of KL(pi_old || pi_theta) over the batch's tokens (Schulman, "Approximating KL divergence").

    ``k1 = mean(old - new)`` (unbiased, high variance, can be negative) and ``k3 = mean(exp(r) - r - 1)`` with
    ``r = new - old`` (unbiased for samples from pi_old, always >= 0). Both are detached.
    """
    log_ratio = (logp_BT - old_logp_BT).detach()
    k1 = masked_mean(-log_ratio, mask_BT)
    k3 = masked_mean(torch.expm1(log_ratio) - log_ratio, mask_BT)
    return {"approx_kl_k1": k1, "approx_kl_k3": k3}


def clip_fractions(ratio_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, eps_low: float, eps_high: float) -> dict:
    """Fraction of tokens whose gradient the PPO clip removes, split by side.

    A token is clipped on the high side when ``A > 0`` and ``ratio > 1 + eps_high``, on the low side when ``A < 0``
    and ``ratio < 1 - eps_low``: exactly the tokens where ``max(-A r, -A clip(r))`` picks the constant branch.
    """
    ratio = ratio_BT.detach()
    high = (advantages_BT > 0) & (ratio > 1.0 + eps_high)
    low = (advantages_BT < 0) & (ratio < 1.0 - eps_low)
    m = mask_BT.float()
    return {
        "clip_frac": masked_mean((high | low).float(), m),
        "clip_frac_high": masked_mean(high.float(), m),
        "clip_frac_low": masked_mean(low.float(), m),
    }


def advantage_stats(advantages_B: Tensor, mask_B: Tensor | None = None) -> dict[str, Tensor]:
    """Mean / std / min / max / fraction-zero of per-sequence (or per-token with a mask) advantages, detached."""
    a = advantages_B.detach().float()
    if mask_B is not None:
        a = a[mask_B.bool()]
    if a.numel() == 0:
        z = torch.zeros((), device=advantages_B.device)
        return {"adv_mean": z, "adv_std": z, "adv_min": z, "adv_max": z, "adv_frac_zero": z}
    return {
        "adv_mean": a.mean(),
        "adv_std": a.std(unbiased=False),
        "adv_min": a.min(),
        "adv_max": a.max(),
        "adv_frac_zero": (a == 0).float().mean(),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``,
    the chance that ``k`` of the ``n`` drawn without replacement include a correct one.

    >>> pass_at_k(4, 0, 4), pass_at_k(4, 1, 4), pass_at_k(4, 2, 1)
    (0.0, 1.0, 0.5)
    """
    import math

    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], scores: list[float | None]) -> float:
    """maj@k for one prompt: the score of the most frequent extracted answer among ``answers`` (None = no answer;
    ties go to the answer seen first), 0 when no sample gave one. ``scores[i]`` is sample i's correctness, the same
    for every sample with the same answer.

    >>> majority_correct(["7", "8", "7", None], [1.0, 0.0, 1.0, 0.0]), majority_correct([None, None], [0.0, 0.0])
    (1.0, 0.0)
    """
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return 0.0
    top = max(counts, key=counts.get)  # max keeps the first of equal counts, in insertion order
    return float(scores[answers.index(top)] or 0.0)
