"""Acceptance 3: speculative sampling keeps the target distribution (tiny vocabulary, exact reference, fixed seed).

The model has 8 tokens, so the exact distribution of the first three completion tokens is enumerated from full
forwards. Spec and plain sampling are both compared with it by chi-square on the (t1, t2) joint and on t3.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dsalign.alignment.rollout import RolloutEngine
from dsalign.alignment.sampling_params import SamplingParams, sampling_probs
from scipy.stats import chisquare

from .conftest import tiny_model

V, N = 8, 3000
PROMPT = [3, 1, 4, 1, 5]


def _exact(model, sp: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t1, t2) [V, V] and P(t3) [V] under the sampling distribution, from full forwards."""
    knobs = (torch.tensor([sp.temperature]), torch.tensor([sp.top_k]), torch.tensor([sp.top_p]))

    def probs(prefix):
        with torch.no_grad():
            return sampling_probs(model(torch.tensor([PROMPT + prefix])).logits[:, -1], *knobs)[0].double()

    p1 = probs([])
    joint12 = torch.stack([p1[a] * probs([a]) for a in range(V)])
    p3 = torch.zeros(V, dtype=torch.float64)
    for a, b in itertools.product(range(V), range(V)):
        p3 += joint12[a, b] * probs([a, b])
    return joint12, p3


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.flatten() / probs.sum() * counts.sum()
    keep = expected >= 5  # chi-square needs expected counts >= 5; lump the rest into one cell
    obs = torch.cat([counts.flatten()[keep], counts.flatten()[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.95)])
def test_speculative_sampling_preserves_distribution(knobs):
    model = tiny_model(seed=3, vocab_size=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # far from uniform, and the MTP draft disagrees with the main model
    sp = SamplingParams(max_new_tokens=3, n=N, seed=2026, ignore_eos=True, **knobs)
    joint12, p3 = _exact(model, sp)
    for speculative in (False, True):
        engine = RolloutEngine(model, max_batch_size=64, max_len=16, speculative=speculative)
        out = engine.generate([PROMPT], sp)
        toks = torch.tensor([c.token_ids for c in out])
        assert toks.shape == (N, 3)
        c12 = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).double()
        c3 = torch.bincount(toks[:, 2], minlength=V).double()
        assert _pvalue(c12, joint12) > 1e-3, (speculative, "t1,t2")
        assert _pvalue(c3, p3) > 1e-3, (speculative, "t3")
        if speculative:
            rate = engine.last_stats.acceptance_rate
            assert 0.05 < rate < 0.95, rate  # both the accept and the residual branch were exercised


def test_chi_square_detects_a_biased_sampler():
    """The test above can fail: always accepting the MTP draft (no rejection) is caught."""
    model = tiny_model(seed=3, vocab_size=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    sp = SamplingParams(max_new_tokens=3, n=N, seed=2026, ignore_eos=True)
    joint12, _ = _exact(model, sp)
    import dsalign.alignment.rollout as rollout

    def always_accept(p, q, draft, u_acc, u_res):
        return torch.ones_like(draft, dtype=torch.bool), draft

    mp = pytest.MonkeyPatch()
    mp.setattr(rollout, "speculative_accept", always_accept)
    try:
        out = RolloutEngine(model, max_batch_size=64, max_len=16, speculative=True).generate([PROMPT], sp)
    finally:
        mp.undo()
    toks = torch.tensor([c.token_ids for c in out])
    c12 = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).double()
    assert _pvalue(c12, joint12) < 1e-6


def test_a_row_without_top_p_keeps_its_tail_beside_rows_with_one():
    """A row's distribution does not depend on its batch mates: a top_p = 1 row sharing a batch with a top_p = 0.9
    row keeps every token (fp32 cumulative sums reach 1.0 before the end of a long peaked vocabulary, and the nucleus
    cut used to be applied to every row once any row asked for it)."""
    from dsalign.alignment.sampling_params import sampling_probs

    V = 129_280
    logits = 8 * torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    one = torch.ones(1)
    alone = sampling_probs(logits, one, torch.zeros(1, dtype=torch.long), one)
    batched = sampling_probs(logits.expand(2, V), torch.ones(2), torch.zeros(2, dtype=torch.long),
                             torch.tensor([1.0, 0.9]))  # fmt: skip
    assert int((alone == 0).sum()) == 0
    torch.testing.assert_close(batched[:1], alone, atol=0, rtol=0)
    assert int((batched[1] == 0).sum()) > V // 2  # the other row did get its nucleus cut
