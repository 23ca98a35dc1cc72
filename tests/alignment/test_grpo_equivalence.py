"""GRPO against REINFORCE (autograd) and against an independent loop implementation on random padded batches."""

import math
import random

import pytest
import torch
from dsalign.alignment.advantages import compute_advantages, group_ids_from_size
from dsalign.alignment.metrics import logprobs_from_logits
from dsalign.alignment.policy_loss import PolicyLossConfig, grpo_loss

B, G, T, V, D = 8, 4, 7, 11, 5


def _rollout(seed):
    """A tiny linear policy, sampled tokens, right-padded completion mask and 0/1 rewards."""
    gen = torch.Generator().manual_seed(seed)
    policy = torch.nn.Linear(D, V)
    with torch.no_grad():
        policy.weight.copy_(torch.randn(V, D, generator=gen))
        policy.bias.copy_(torch.randn(V, generator=gen))
    feats = torch.randn(B, T, D, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (B,), generator=gen).float()
    rewards[:G] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # make sure at least one group is informative
    return policy, feats, tokens, mask, rewards


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_on_policy_grpo_gradient_equals_reinforce(policy_loss, agg):
    policy, feats, tokens, mask, rewards = _rollout(seed=0)
    adv = compute_advantages("grpo", rewards, group_ids_from_size(B, G))
    assert adv.abs().sum() > 0

    logp = logprobs_from_logits(policy(feats), tokens)
    cfg = PolicyLossConfig(policy_loss=policy_loss, agg=agg, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask, cfg)  # first update: ratio == 1
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    assert metrics["clip_frac"].item() == 0.0

    # REINFORCE with the group-normalised advantage: -A_i * log pi(y_t), same token weighting
    logp2 = logprobs_from_logits(policy(feats), tokens)
    weighted = -adv[:, None] * logp2 * mask
    if agg == "token-mean":
        ref_loss = weighted.sum() / mask.sum()
    elif agg == "seq-mean-token-mean":
        ref_loss = (weighted.sum(1) / mask.sum(1)).mean()
    else:
        ref_loss = weighted.sum() / (B * T)
    ref_grads = torch.autograd.grad(ref_loss, list(policy.parameters()))
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 1e-4
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def _loop_advantages(rewards, groups, eps):
    """Second, independent implementation: plain Python lists and math.*."""
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        n = len(members)
        mean = sum(members) / n
        if n == 1 or max(members) == min(members):
            out.append(0.0)
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        out.append((r - mean) / (std + eps))
    return out


def _loop_clipped_token_mean(logp, old, adv, mask, eps_low, eps_high):
    total, count = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            lo, hi = 1 - eps_low, 1 + eps_high
            total += max(-adv[i] * ratio, -adv[i] * min(max(ratio, lo), hi))
            count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_loop_implementation(seed):
    rng = random.Random(seed)
    b, t = 12, 9
    groups = [rng.randrange(4) for _ in range(b)]  # unequal, shuffled groups
    rewards = [float(rng.choice([0, 0.5, 1, 2])) for _ in range(b)]
    lengths = [rng.randint(1, t) for _ in range(b)]
    mask = [[1 if k < n else 0 for k in range(t)] for n in lengths]
    old = [[rng.uniform(-3, -0.1) for _ in range(t)] for _ in range(b)]
    logp = [[o + rng.gauss(0, 0.3) for o in row] for row in old]  # off-policy: many tokens clip

    adv_ref = _loop_advantages(rewards, groups, 1e-6)
    adv = compute_advantages("grpo", torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    torch.testing.assert_close(adv, torch.tensor(adv_ref, dtype=torch.float64))

    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28)
    loss, m = grpo_loss(
        torch.tensor(logp, dtype=torch.float64),
        torch.tensor(old, dtype=torch.float64),
        adv.float(),
        torch.tensor(mask),
        cfg,
    )
    want = _loop_clipped_token_mean(logp, old, adv_ref, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert 0 < m["clip_frac"].item() < 1
