"""Per-token KL estimators to a reference policy, for the KL term of the GRPO loss.

Shape legend: B = sequences, T = completion tokens. Tokens are sampled from the current policy pi_theta, and with
``r = log pi_ref(y_t) - log pi_theta(y_t)`` (so ``exp(r) = pi_ref / pi_theta``), Schulman's estimators of
``KL(pi_theta || pi_ref)`` are (http://joschu.net/blog/kl-approx.html):

- ``k1 = -r``: unbiased, high variance, negative whenever pi_ref > pi_theta on the sampled token.
- ``k2 = r**2 / 2``: biased, low variance, always >= 0.
- ``k3 = exp(r) - r - 1``: unbiased, low variance, always >= 0; the one GRPO uses (DeepSeekMath eq. 4).

With ``beta = 0`` the KL term is skipped altogether and no reference model has to be run
(``policy_loss.grpo_loss`` enforces that a reference is passed only when needed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``k1 = logp - ref_logp = -r``. ``[B, T], [B, T] -> [B, T]``."""
    return logp_BT - ref_logp_BT


@KL_ESTIMATORS.register("k2")
def kl_k2(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``k2 = 0.5 * (ref_logp - logp)**2``. ``[B, T], [B, T] -> [B, T]``."""
    return 0.5 * (ref_logp_BT - logp_BT) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``k3 = exp(r) - r - 1`` with ``r = ref_logp - logp``. ``[B, T], [B, T] -> [B, T]``.

    ``expm1`` keeps it accurate (and exactly 0) when ``r`` is tiny.
    """
    r = ref_logp_BT - logp_BT
    return torch.expm1(r) - r


def kl_penalty(logp_BT: Tensor, ref_logp_BT: Tensor, estimator: str = "k3", clamp: float | None = None) -> Tensor:
    """Per-token KL estimate picked by name; optionally clamped to ``[-clamp, clamp]`` against outlier tokens.

    ``[B, T], [B, T] -> [B, T]``. Masking and aggregation are the caller's (see ``policy_loss.aggregate_loss``).
    """
    kl = KL_ESTIMATORS.get(estimator)(logp_BT, ref_logp_BT)
    return kl if clamp is None else kl.clamp(min=-clamp, max=clamp)
