"""GRPO glue: rollout rows -> padded batch -> token log-probs -> loss with the model in the loop."""

from __future__ import annotations

import math

import pytest
import torch
from dsalign.alignment.policy_loss import PolicyLossConfig
from dsalign.alignment.rl import build_rl_batch, correct_for_rollout, grpo_loss_fn, rollout_is_weights, token_logprobs
from dsalign.model import ModelConfig, Transformer


def _setup():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg)
    prompts = [[1, 5, 7], [1, 9]]
    completions = [[11, 12, 13, 2], [14, 2]]
    return model, build_rl_batch(prompts, completions, pad_id=0)


def test_batch_layout_and_logprobs_by_hand():
    model, batch = _setup()
    assert batch["input_ids"].tolist() == [[1, 5, 7, 11, 12, 13, 2], [1, 9, 14, 2, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    logp, _, _ = token_logprobs(model.eval(), batch, temperature=0.7)
    with torch.no_grad():
        alone = model(torch.tensor([[1, 9, 14, 2]])).logits[0]
    want = torch.log_softmax(alone[1] / 0.7, -1)[14]  # token at position 2 scored by logits at position 1
    assert abs(logp[1, 2].item() - want.item()) < 1e-5


def test_on_policy_loss_has_unit_ratio_and_mtp_term_trains_mtp_only_when_asked():
    model, batch = _setup()
    model.train()
    with torch.no_grad():
        old, _, _ = token_logprobs(model, batch)
    batch = {**batch, "old_logp": old, "advantages": torch.tensor([1.0, -1.0])}
    cfg = PolicyLossConfig()
    loss, metrics = grpo_loss_fn(cfg, aux_loss_coef=0.0)(model, batch)
    loss.backward()
    assert all(v == 0 for k, v in metrics.items() if "clip" in k)
    assert model.mtp[0].eh_proj.weight.grad is None
    model.zero_grad()
    loss, metrics = grpo_loss_fn(cfg, aux_loss_coef=0.0, mtp_lambda=0.3)(model, batch)
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0 and "mtp_ce_1" in metrics
    assert 0.0 <= metrics["mtp_acceptance"] <= 1.0
    # a rank whose completions are all masked (e.g. every one truncated under mask_truncated) reports the same keys
    # (NaN values): data-parallel ranks average their metrics key by key, and different keys abort the collective
    empty = {**batch, "completion_mask": torch.zeros_like(batch["completion_mask"])}
    _, none = grpo_loss_fn(cfg, aux_loss_coef=0.0, mtp_lambda=0.3)(model, empty)
    assert none.keys() == metrics.keys() and math.isnan(none["mtp_acceptance"])


def test_fused_token_logprobs_match_the_logits_path():
    """``token_logprobs(fused=True)`` (chunked head, no [B, T, V] logits) gives the log-probs, entropies and
    parameter gradients of the logits path."""
    model, batch = _setup()
    model.train()
    weights = torch.randn(2, 7)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        logp, ent, _ = token_logprobs(model, batch, temperature=0.7, with_entropy=True, fused=fused)
        ((logp * weights).sum() + 0.1 * ent.sum()).backward()
        results.append(
            (logp.detach(), ent.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (logp0, ent0, g0), (logp1, ent1, g1) = results
    torch.testing.assert_close(logp1, logp0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for name, g in g1.items():
        assert (g - g0[name]).norm() <= 1e-5 * g0[name].norm(), name  # fp32 rounding, relative to the tensor


def test_token_logprobs_on_completion_positions_only():
    """``positions=completion_mask``: the same log-probs, entropies and parameter gradients at those positions as
    the full computation, 0 elsewhere; with the fused head only those rows go through the vocabulary projection."""
    model, batch = _setup()
    model.train()
    mask = batch["completion_mask"]
    weights = torch.randn(2, 7) * mask
    for fused in (False, True):
        results = []
        for positions in (None, mask):
            model.zero_grad(set_to_none=True)
            logp, ent, _ = token_logprobs(model, batch, temperature=0.7, with_entropy=True, fused=fused,
                                          positions=positions)  # fmt: skip
            ((logp * weights).sum() + 0.1 * (ent * mask).sum()).backward()
            results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}))  # fmt: skip
        (logp0, ent0, g0), (logp1, ent1, g1) = results
        torch.testing.assert_close(logp1, logp0 * mask, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent1, ent0 * mask, rtol=1e-5, atol=1e-6)
        assert (logp1[mask == 0] == 0).all() and (ent1[mask == 0] == 0).all()
        assert (logp0[mask == 0] != 0).any()  # the full path does score prompt tokens
        assert g1.keys() == g0.keys()
        for name, g in g1.items():
            assert (g - g0[name]).norm() <= 1e-5 * g0[name].norm() + 1e-12, (fused, name)


def test_step_metrics_skip_micro_batches_with_nothing_in_the_loss():
    """A micro-batch whose completions are all masked (e.g. all truncated) reports no token statistics, so the
    step's ratio_mean stays 1 on-policy (averaging in its zeros used to log 0.5)."""
    import math

    from dsalign.alignment.trainer import TrainerConfig, prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.alignment.trainer.step import average_metrics

    model, batch = _setup()
    with torch.no_grad():
        old, _, _ = token_logprobs(model.train(), batch)
    batch = {**batch, "old_logp": old, "advantages": torch.tensor([1.0, -1.0])}
    masked = {**batch, "completion_mask": torch.zeros_like(batch["completion_mask"])}
    empty_loss, empty = grpo_loss_fn(PolicyLossConfig(), aux_loss_coef=0.0)(model, masked)
    assert float(empty_loss.detach()) == 0 and all(math.isnan(v) for v in empty.values())
    cfg = TrainerConfig(lr=1e-3, total_steps=1, warmup_steps=0, micro_batches=2)
    runner = build_runner(prepare_model(model, cfg), cfg)
    metrics = train_step(runner, [batch, masked], grpo_loss_fn(PolicyLossConfig(), aux_loss_coef=0.0), cfg)
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-5 and abs(metrics["ratio_max"] - 1.0) < 1e-5
    avg = average_metrics([{"a": 1.0, "b": math.nan}, {"a": 3.0}, {"a": math.nan, "c": 2.0}], None)
    assert avg["a"] == 2.0 and math.isnan(avg["b"]) and avg["c"] == 2.0
    # the logged loss is the objective: micro-batches weighted by their share (tokens) of it; maxima stay maxima and
    # token counts add up (two micro-batches of 10 and 30 tokens are 40 tokens, not 20)
    per_micro = [{"loss": 1.0, "ratio_max": 1.5, "target_tokens": 10.0}, {"loss": 4.0, "ratio_max": 1.2,
                                                                           "target_tokens": 30.0}]  # fmt: skip
    avg = average_metrics(per_micro, None, weights=[0.5, 1.5])
    assert avg == {"loss": 3.25, "ratio_max": 1.5, "target_tokens": 40.0}


def test_rollout_is_weights_by_hand():
    train = torch.tensor([[0.0, -1.0, -1.0, -1.0]])
    rollout = torch.tensor([[0.0, -1.5, -0.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    w, m = rollout_is_weights(train, rollout, mask, cap=1.2)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.2, math.exp(-0.5), 1.0]]))
    assert m["rollout_is_capped_frac"] == pytest.approx(1 / 3) and m["rollout_logp_diff_max"] == pytest.approx(0.5)
    assert m["rollout_logp_diff_mean"] == pytest.approx(1 / 3)
    assert m["rollout_is_weight_mean"] == pytest.approx((1.2 + math.exp(-0.5) + 1.0) / 3)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        rollout_is_weights(train, rollout, mask, cap=0.5)


def test_rollout_correction_gives_the_weighted_policy_gradient():
    """After ``correct_for_rollout`` the ratio is taken against the trainer's own log-probs (1 on-policy) and the
    loss's gradient is the TIS-weighted policy gradient ``-sum_t w_t A ∇logp_t / n`` (token mean)."""
    model, batch = _setup()
    mask = batch["completion_mask"]
    with torch.no_grad():
        exact = token_logprobs(model.eval(), batch, positions=mask)[0]
    shift = torch.tensor([[0, 0, 0, 0.9, -0.3, 0.05, 0.0], [0, 0, -1.2, 0.2, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.5])
    mb = {**batch, "old_logp": exact - shift, "advantages": adv}  # the rollout engine's log-probs, off by ``shift``
    model.train()
    metrics = correct_for_rollout(model, [mb], temperature=1.0, cap=2.0)
    assert model.training  # mode restored
    torch.testing.assert_close(mb["old_logp"], exact, rtol=0, atol=0)
    w = torch.exp(shift).clamp(max=2.0) * mask
    torch.testing.assert_close(mb["advantages"], adv[:, None] * w)
    assert metrics["rollout_logp_diff_max"] == pytest.approx(1.2) and metrics["rollout_is_capped_frac"] == 1 / 6

    loss, out = grpo_loss_fn(PolicyLossConfig(), aux_loss_coef=0.0)(model, mb)
    assert out["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    logp = token_logprobs(model, batch, positions=mask)[0]
    manual = -(adv[:, None] * w * logp * mask).sum() / mask.sum()
    want = torch.autograd.grad(manual, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    for g, h in zip(grads, want):
        if g is None or h is None:
            assert g is None and h is None
        else:
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def _grpo_rows(seed: int = 0):
    """3 prompts x 4 samples of random lengths: the layout a GRPO iteration builds."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(3, 60, (n,), generator=g).tolist() for n in (6, 2, 9)]
    rows = [p for p in prompts for _ in range(4)]
    comps = [torch.randint(3, 60, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist() + [2]
             for _ in rows]  # fmt: skip
    return rows, comps


def test_grpo_step_with_shared_prompts_equals_the_plain_step():
    """One optimizer step (PPO-clip + balance loss + MTP term, 2 micro-batches that split a group, bias update)
    on the batch with prompt groups (the pipeline's default) and without: same metrics and weights (fp32)."""
    from dsalign.alignment.trainer import TrainerConfig, prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.pipelines.stages import split_micro

    prompts, comps = _grpo_rows()
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        cfg = TrainerConfig(lr=1e-3, total_steps=1, warmup_steps=0, micro_batches=2, bias_update_gamma=0.01,
                            mtp_lambda=0.3)  # fmt: skip
        model = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
        batch = build_rl_batch(prompts, comps, pad_id=0, shared_prompts=shared)
        assert ("prompt_group" in batch) == shared
        with torch.no_grad():
            batch["old_logp"] = token_logprobs(model.train(), batch, positions=batch["completion_mask"])[0] - 0.05
        batch["advantages"] = torch.linspace(-1, 1, len(prompts))
        runner = build_runner(model, cfg)
        metrics = train_step(runner, split_micro(batch, 6), grpo_loss_fn(PolicyLossConfig(), mtp_lambda=0.3), cfg)
        results.append((metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (m_shared, w_shared), (m_plain, w_plain) = results
    for key in ("loss", "pg_loss", "entropy", "mtp_ce_1", "clip_frac"):
        assert m_shared[key] == pytest.approx(m_plain[key], rel=1e-5, abs=1e-7), key
    for name, w in w_shared.items():  # Adam's step is ~lr = 1e-3 per weight, even for gradients at rounding level
        torch.testing.assert_close(w, w_plain[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_teacher_scores_with_shared_prompts():
    from dsalign.alignment.distill import teacher_scores

    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.preset("tiny")).eval()
    prompts, comps = _grpo_rows(1)
    shared = teacher_scores(teacher, build_rl_batch(prompts, comps, 0), top_k=4)
    plain = teacher_scores(teacher, build_rl_batch(prompts, comps, 0, shared_prompts=False), top_k=4)
    torch.testing.assert_close(shared["teacher_logp"], plain["teacher_logp"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared["teacher_topk_logp"], plain["teacher_topk_logp"], atol=1e-5, rtol=1e-5)
