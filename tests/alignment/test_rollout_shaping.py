"""Dynamic sampling, overlong shaping and the logged metrics."""

import math

import pytest
import torch
from dsalign.alignment.metrics import (
    advantage_stats,
    approx_kl,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
)
from dsalign.alignment.sampling import (
    SampledGroup,
    dynamic_sample,
    informative_group_mask,
    mask_truncated,
    overlong_penalty,
    truncated_from_lengths,
)


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([50, 80, 90, 99, 100, 120])
    # max 100, buffer 20: free up to 80, then linear to -1 at 100, -1 beyond; scaled by the factor
    got = overlong_penalty(lengths, max_length=100, buffer_length=20, penalty_factor=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.475, -0.5, -0.5]))
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=10, buffer_length=20)


def test_mask_truncated_completions():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    truncated = truncated_from_lengths(torch.tensor([3, 2, 3]), torch.tensor([True, True, False]), max_length=3)
    assert truncated.tolist() == [False, False, True]
    assert mask_truncated(mask, truncated).tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def test_informative_group_mask():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert (
        informative_group_mask(rewards, torch.tensor([0, 0, 1, 1, 2, 2])).tolist()
        == [False, False] + [True] * 2 + [False] * 2
    )


def _sampler(calls):
    def sample(prompts):
        calls.append(list(prompts))
        # prompts divisible by 3 are "too easy": every completion gets reward 1
        return [SampledGroup(p, [1.0, 1.0] if p % 3 == 0 else [0.0, 1.0], payload=f"rollouts-{p}") for p in prompts]

    return sample


def test_dynamic_sampling_drops_constant_groups_and_refills():
    calls = []
    groups, stats = dynamic_sample(_sampler(calls), iter(range(100)), target_groups=5, prompts_per_round=4)
    # round 1: 0..3 -> keeps 1, 2, drops 0, 3; round 2: 4..7 -> keeps 4, 5, 7, drops 6 (target reached exactly)
    assert [g.prompt for g in groups] == [1, 2, 4, 5, 7]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (stats.rounds, stats.prompts_used, stats.groups_dropped, stats.shortfall) == (2, 8, 3, 0)
    assert groups[0].payload == "rollouts-1"


def test_dynamic_sampling_shortfall():
    with pytest.raises(RuntimeError, match="found 2/5 groups"):
        dynamic_sample(_sampler([]), iter(range(4)), target_groups=5, prompts_per_round=4)
    groups, stats = dynamic_sample(
        _sampler([]), iter(range(4)), target_groups=5, prompts_per_round=4, allow_partial=True
    )
    assert len(groups) == 2 and stats.shortfall == 3


def test_entropy_and_logprobs_from_logits():
    logits = torch.randn(2, 3, 7)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    labels = torch.randint(0, 7, (2, 3))
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits.bfloat16(), labels), want, atol=0.05, rtol=0)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_approx_kl_and_stats():
    logp = torch.tensor([[math.log(0.5), 0.0]])
    old = torch.tensor([[math.log(0.25), 0.0]])
    m = approx_kl(logp, old, torch.tensor([[1, 0]]))
    assert m["approx_kl_k1"].item() == pytest.approx(-math.log(2))  # k1 = old - new
    assert m["approx_kl_k3"].item() == pytest.approx(2 - 1 - math.log(2))  # exp(r) - 1 - r, r = new - old
    s = advantage_stats(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert (s["adv_mean"].item(), s["adv_max"].item(), s["adv_frac_zero"].item()) == (0.0, 1.0, 0.5)
    assert s["adv_std"].item() == pytest.approx(math.sqrt(0.5))
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0
