"""Hand-computed examples for the advantage estimators, policy losses, aggregations and KL estimators."""

import math

import pytest
import torch
from dsalign.alignment.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    group_ids_from_size,
)
from dsalign.alignment.kl import kl_penalty
from dsalign.alignment.policy_loss import PolicyLossConfig, aggregate_loss, grpo_loss
from dsalign.alignment.registry import Registry

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])


def test_registry_refuses_duplicates_and_names_choices():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda r, g, e: r)


def test_grpo_advantage_hand_computed():
    # group 0: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 * sqrt(3); group 1 constant -> 0; group 2 singleton -> 0
    adv = compute_advantages("grpo", REWARDS, GROUPS, eps=0.0)
    s = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    # with the default eps the value is (r - mean) / (std + 1e-6)
    adv_eps = compute_advantages("grpo", REWARDS, GROUPS)
    assert adv_eps[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6), rel=1e-6)


def test_grpo_advantage_groups_in_any_order():
    adv = compute_advantages("grpo", torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([7, 3, 7, 3]), eps=0.0)
    h = 1 / math.sqrt(2.0)  # group 7: [1, 3], group 3: [2, 5] -> each +-1/sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-h, -h, h, h]))


def test_drgrpo_and_rloo_hand_computed():
    torch.testing.assert_close(
        compute_advantages("drgrpo", REWARDS, GROUPS), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )
    # RLOO: 1 - mean(0, 0, 1) = 2/3 ; 0 - mean(1, 0, 1) = -2/3
    t = 2 / 3
    torch.testing.assert_close(compute_advantages("rloo", REWARDS, GROUPS), torch.tensor([t, -t, -t, t, 0, 0, 0, 0]))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_constant_group_gives_exact_zero(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = compute_advantages(name, rewards, group_ids_from_size(6, 3))
    assert torch.equal(adv, torch.zeros(6))


def test_group_ids_and_broadcast():
    assert group_ids_from_size(6, 2).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_ids_from_size(5, 2)
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# Each token: (ratio, advantage). eps_low=0.2, eps_high=0.3.
#   r=1.5, A=+1 -> max(-1.5, -1.3) = -1.3  clipped high, no gradient
#   r=1.3, A=+1 -> -1.3 exactly on the boundary: not counted as clipped, gradient flows
#   r=0.5, A=+1 -> max(-0.5, -0.8) = -0.5  low ratio with A>0 is never clipped
#   r=0.5, A=-1 -> max(0.5, 0.8)   =  0.8  clipped low, no gradient
#   r=2.0, A=-1 -> max(2.0, 1.3)   =  2.0  (dual-clip c=1.8 caps it at 1.8, no gradient)
#   r=1.0, A=-2 -> 2.0
RATIOS = torch.tensor([[1.5, 1.3, 0.5], [0.5, 2.0, 1.0]])
ADVS = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -2.0]])
MASK = torch.ones(2, 3)


def _loss_and_grad(cfg, ratios=RATIOS, advs=ADVS, mask=MASK):
    old = torch.zeros_like(ratios)
    logp = ratios.log().clone().requires_grad_(True)
    loss, metrics = grpo_loss(logp, old, advs, mask, cfg)
    loss.backward()
    return loss, logp.grad, metrics


def test_clipped_loss_hand_computed_with_boundaries():
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.3)
    loss, grad, m = _loss_and_grad(cfg)
    per_token = torch.tensor([[-1.3, -1.3, -0.5], [0.8, 2.0, 2.0]])
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    # d(-A r)/dlogp = -A r on unclipped tokens, 0 where the clip picked the constant, / 6 tokens
    expected_grad = torch.tensor([[0.0, -1.3, -0.5], [0.0, 2.0, 2.0]]) / 6
    torch.testing.assert_close(grad, expected_grad)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)


def test_dual_clip_hand_computed():
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.3, dual_clip_c=1.8)
    loss, grad, m = _loss_and_grad(cfg)
    per_token = torch.tensor([[-1.3, -1.3, -0.5], [0.8, 1.8, 2.0]])
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.3, -0.5], [0.0, 0.0, 2.0]]) / 6)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 6)
    # dual-clip never touches positive advantages, however large the ratio
    loss_pos, _, _ = _loss_and_grad(cfg, torch.tensor([[5.0]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    assert loss_pos.item() == pytest.approx(-1.3)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        PolicyLossConfig(dual_clip_c=1.0)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    # the fully-masked third row is left out of the sequence mean: (2 + 4) / 2
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (3 * 3))
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=5).item() == pytest.approx(10 / 15)
    assert aggregate_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(KeyError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "sum")


def test_policy_loss_uses_aggregation_mode():
    ratios = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    advs = torch.tensor([1.0, -2.0])  # per-sequence advantages are broadcast over tokens
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for agg, want in [
        ("token-mean", (-3 + 2) / 4),
        ("seq-mean-token-mean", (-1 + 2) / 2),
        ("seq-mean-token-sum-norm", -1 / 6),
    ]:
        loss, _, _ = _loss_and_grad(PolicyLossConfig(agg=agg), ratios, advs, mask)
        assert loss.item() == pytest.approx(want), agg


def test_gspo_sequence_ratio_hand_computed():
    # seq 0: log-ratios (0.1, 0.3) -> s = e^0.2 = 1.221 > 1.2 -> clipped at -1.2, no gradient
    # seq 1: log-ratios (0.0, 0.1) -> s = e^0.05, loss -s per token, grad -s / (2 tokens * 2 seqs)
    cfg = PolicyLossConfig(policy_loss="gspo", eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean")
    logp = torch.tensor([[0.1, 0.3], [0.0, 0.1]], requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.ones(2, 2), cfg)
    loss.backward()
    s1 = math.exp(0.05)
    assert loss.item() == pytest.approx((-1.2 - s1) / 2, rel=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-s1 / 4, -s1 / 4]]))
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # the token ratio would not have clipped token (0, 0): e^0.1 < 1.2, so the two losses differ
    tok, _ = grpo_loss(logp.detach(), torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.ones(2, 2), PolicyLossConfig())
    assert tok.item() != pytest.approx(loss.item())


def test_kl_estimators_values_and_signs():
    # r = ref - logp. pi = 0.5, ref = 0.25: r = -log 2 -> k1 = +log 2, k2 = (log 2)^2 / 2, k3 = 0.5 + log 2 - 1
    # pi = 0.25, ref = 0.5: r = +log 2 -> k1 = -log 2 (negative!), k2 same, k3 = 2 - log 2 - 1
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    ln2 = math.log(2.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[ln2, -ln2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[ln2**2 / 2, ln2**2 / 2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[ln2 - 0.5, 1.0 - ln2, 0.0]]))
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3", clamp=0.25), torch.tensor([[0.1931, 0.25, 0.0]]), atol=1e-4, rtol=0
    )


def test_kl_term_in_grpo_loss_needs_reference_only_with_beta():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2)
    cfg = PolicyLossConfig(kl_beta=0.1, kl_estimator="k3")
    with pytest.raises(ValueError, match="needs ref_logp_BT"):
        grpo_loss(logp, logp, torch.zeros(1), mask, cfg)
    loss, m = grpo_loss(logp, logp, torch.zeros(1), mask, cfg, ref_logp_BT=ref)
    ln2 = math.log(2.0)
    assert m["kl"].item() == pytest.approx(((ln2 - 0.5) + (1 - ln2)) / 2)
    assert loss.item() == pytest.approx(0.1 * m["kl"].item())
    loss0, m0 = grpo_loss(logp, logp, torch.zeros(1), mask, PolicyLossConfig())  # beta 0: no reference needed
    assert loss0.item() == 0.0 and "kl" not in m0
