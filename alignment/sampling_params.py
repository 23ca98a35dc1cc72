"""Sampling parameters and the pure tensor functions the rollout engine samples with.

Shape legend: B rows (sequences being decoded), V vocabulary.

Two distributions are kept apart on purpose:

- the *sampling* distribution ``p`` = softmax(logits / T) restricted by top-k then top-p (what tokens are drawn from,
  what speculative decoding must preserve);
- the *policy* log-prob of a sampled token = log_softmax(logits / T)[token], with no top-k/top-p truncation. That is
  what a GRPO trainer recomputes from a full forward over prompt + completion, so the engine reports exactly that
  quantity (greedy, T = 0, reports T = 1 log-probs).

Randomness comes from one ``torch.Generator`` per sequence: every draw is a uniform number turned into a token by
inverse-CDF lookup, so a sequence's tokens depend on its own seed only, not on which other sequences share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to sample the completions of one prompt (the vLLM-style knobs a GRPO config sets)."""

    max_new_tokens: int = field(default=64, metadata={"help": "completion length cap (finish reason 'length')"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: smallest set with this much probability"})
    n: int = field(default=1, metadata={"help": "samples per prompt; they share the prompt's prefill"})
    seed: int | None = field(default=None, metadata={"help": "per-request seed; sample j uses seed * 1000003 + j"})
    stop_token_ids: Sequence[int] | None = field(
        default=None, metadata={"help": "token ids that end a completion (default: the model's eos ids)"}
    )
    stop: str | Sequence[str] | None = field(default=None, metadata={"help": "strings that end a completion"})
    ignore_eos: bool = field(default=False, metadata={"help": "do not stop at the default eos ids"})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid SamplingParams: {msg}")

        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            bad(f"n must be >= 1, got {self.n}")
        if self.stop is not None:
            items = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(items, (list, tuple)):
                kind = type(self.stop).__name__
                raise TypeError(f"invalid SamplingParams: stop must be a string or a list of strings, got {kind}")
            for s in items:
                if not isinstance(s, str):
                    raise TypeError(
                        f"invalid SamplingParams: stop strings must be str, got {type(s).__name__} ({s!r}); "
                        "put token ids in stop_token_ids"
                    )
                if not s:
                    bad("stop strings must be non-empty")
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"invalid SamplingParams: stop_token_ids must be ints, got {t!r}")

    def sample_seed(self, sample_index: int) -> int | None:
        """Sample ``sample_index``'s generator seed, in ``[0, 2**63)`` (``torch.Generator.manual_seed`` refuses
        2**64 and up, which ``seed * 1000003`` reaches for seeds the pipelines derive from a run seed of 185)."""
        return None if self.seed is None else (self.seed * 1000003 + sample_index) % 2**63


def policy_logprobs(logits_BV: Tensor, temperature_B: Tensor, tokens_B: Tensor) -> Tensor:
    """``log_softmax(logits / T)[token]`` in fp32 (T = 0 rows use T = 1). ``[B, V], [B], [B] -> [B]``."""
    t = torch.where(temperature_B > 0, temperature_B, torch.ones_like(temperature_B)).float()
    logp_BV = torch.log_softmax(logits_BV.float() / t[:, None], dim=-1)
    return logp_BV.gather(1, tokens_B[:, None].long())[:, 0]


def sampling_probs(logits_BV: Tensor, temperature_B: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p. ``[B, V] -> [B, V]`` fp32.

    Greedy rows (T = 0) get a one-hot on the argmax, which makes greedy a special case of sampling (and of the
    speculative acceptance rule, which then accepts exactly when the draft equals the argmax).
    """
    logits = logits_BV.float()
    V = logits.shape[-1]
    greedy_B = temperature_B <= 0
    t = torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B).float()
    logits = logits / t[:, None]
    k_B = torch.where((top_k_B > 0) & (top_k_B < V), top_k_B, torch.full_like(top_k_B, V))
    if bool((k_B < V).any()) or bool((top_p_B < 1).any()):
        sorted_BV, order_BV = logits.sort(dim=-1, descending=True)
        rank_V = torch.arange(V, device=logits.device)
        drop_BV = rank_V[None, :] >= k_B[:, None]
        probs_sorted = sorted_BV.masked_fill(drop_BV, float("-inf")).softmax(dim=-1)
        # keep a token if the mass strictly before it is below top_p (the top token always survives)
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop_BV |= (mass_before >= top_p_B.float()[:, None]) & (top_p_B < 1)[:, None]  # rows that asked for it
        drop_BV[:, 0] = False
        logits = logits.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))
    probs = logits.softmax(dim=-1)
    if bool(greedy_B.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits_BV.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy_B[:, None], onehot, probs)
    return probs


def draw(probs_BV: Tensor, uniforms_B: Tensor) -> Tensor:
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds ``u * total``. ``-> [B]`` long."""
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    target = uniforms_B.double()[:, None] * cdf_BV[:, -1:]
    idx = torch.searchsorted(cdf_BV, target, right=True)[:, 0]
    idx = idx.clamp(max=probs_BV.shape[-1] - 1)
    # never land on a zero-probability token (u at a flat stretch of the CDF)
    zero = probs_BV.gather(1, idx[:, None])[:, 0] <= 0
    if bool(zero.any()):
        idx = torch.where(zero, probs_BV.argmax(dim=-1), idx)
    return idx


def speculative_accept(
    p_BV: Tensor, q_BV: Tensor, draft_B: Tensor, u_accept_B: Tensor, u_resample_B: Tensor
) -> tuple[Tensor, Tensor]:
    """Speculative-sampling acceptance (Leviathan et al. 2023; Chen et al. 2023), one drafted token per row.

    Accept the draft ``d ~ q`` with probability ``min(1, p(d) / q(d))``; otherwise draw from the residual
    ``norm(max(0, p - q))``. The committed token is then distributed exactly as ``p``. Returns
    (accepted [B] bool, replacement token [B] for rejected rows; equals the draft where accepted).
    """
    p_d = p_BV.gather(1, draft_B[:, None])[:, 0]
    q_d = q_BV.gather(1, draft_B[:, None])[:, 0].clamp(min=1e-30)
    accepted = u_accept_B < (p_d / q_d)
    residual = (p_BV - q_BV).clamp(min=0)
    empty = residual.sum(dim=-1) <= 0  # p == q: rejection has probability 0, any fallback is fine
    residual = torch.where(empty[:, None], p_BV, residual)
    replacement = draw(residual, u_resample_B)
    return accepted, torch.where(accepted, draft_B, replacement)
