"""The GRPO stage run in-process (no Ray): LoRA (one worker, colocated) and the rollout log-prob correction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dsalign.model import load_checkpoint
from dsalign.pipelines.config import LoraConfig, load_config
from dsalign.pipelines.demo_tokenizer import task_tokenizer
from dsalign.pipelines.stages import StageEnv, load_source, run_grpo

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


SOURCE = {"preset": "tiny"}


def _grpo_stage(tmp_path: Path, *overrides: str, lora: LoraConfig | None = None, dtype: str = "fp32"):
    """configs/tiny.yaml's GRPO stage from an untrained ``tiny`` model, rewarded by length (so advantages are not
    all zero), no warm-up; returns (final checkpoint dir, logged metrics, run config, tokenizer)."""
    g = "stages.grpo.grpo"
    base = [f"{g}.optim.lr=0.02", f"{g}.optim.warmup_steps=0", f"{g}.mask_truncated=false",
            "stages.grpo.rewards=[{fn: target_length}]", "stages.grpo.data.length_target=8",
            f"stages.grpo.training.compute_dtype={dtype}"]  # fmt: skip
    run = load_config(TINY, [f"output_dir={tmp_path}", *base, *(f"{g}.{o}" for o in overrides)])
    stage = next(s for s in run.stages if s.name == "grpo")
    stage.training.lora = lora
    tokenizer = task_tokenizer(run.task)
    env = StageEnv(run=run, stage=stage, out_dir=tmp_path / "grpo", tokenizer=tokenizer, sources={"model": SOURCE},
                   resume=False)  # fmt: skip
    env.out_dir.mkdir(parents=True)
    final = run_grpo(env)
    log = [json.loads(line) for line in (env.out_dir / "metrics.jsonl").read_text().splitlines()]
    return final, log, run, tokenizer


def test_lora_grpo_samples_from_the_adapted_policy_and_exports_merged(tmp_path):
    """LoRA: rollouts sample from the adapted policy, the KL reference is the policy with its adapters off, and the
    export is merged."""
    lora = LoraConfig(r=4, alpha=8.0, target_modules=["kv_b_proj", "o_proj"])
    final, log, run, tokenizer = _grpo_stage(tmp_path, "iterations=3", "kl_beta=0.1", lora=lora)
    assert [r["step"] for r in log] == [1, 2, 3]
    # Adapters start with B = 0, so the first iteration's policy is its reference: KL exactly 0 there, not after.
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert log[-1]["kl"] > 1e-5
    # On-policy (one update per batch): the update's log-probs equal the rollout's. Decoding with the base weight
    # of kv_b_proj (the adapters ignored) puts ratios off 1 once the adapters have moved.
    for r in log:
        assert abs(r["ratio_max"] - 1.0) < 1e-4 and abs(r["ratio_mean"] - 1.0) < 1e-5, r

    initial = load_source(SOURCE, tokenizer, run.seed).state_dict()
    merged = load_checkpoint(final).state_dict()
    assert not any("lora" in k for k in merged) and merged.keys() == initial.keys()
    changed = {k for k in initial if not torch.equal(initial[k], merged[k]) and "e_score_correction_bias" not in k}
    assert changed and all(k.endswith(("kv_b_proj.weight", "o_proj.weight")) for k in changed), sorted(changed)


def test_rollout_is_correction_under_bf16(tmp_path):
    """``training.compute_dtype: bf16``: the rollout's absorbed decode and the update's forward round differently,
    so the update's ratio against the rollout's log-probs is off 1 even on-policy. With ``rollout_is_cap`` the ratio
    is taken against the trainer's recomputed log-probs (1 on-policy) and the mismatch goes into the TIS weights."""
    _, plain, _, _ = _grpo_stage(tmp_path / "plain", "iterations=2", dtype="bf16")
    _, tis, _, _ = _grpo_stage(tmp_path / "tis", "iterations=2", "rollout_is_cap=2.0", dtype="bf16")
    assert max(abs(r["ratio_max"] - 1.0) for r in plain) > 1e-3  # the mismatch the correction is for
    for r in tis:
        assert r["ratio_max"] == pytest.approx(1.0, abs=1e-6) and r["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert 1e-3 < r["rollout_logp_diff_max"] < 0.5 and r["rollout_is_weight_mean"] == pytest.approx(1.0, abs=0.01)
    # Iteration 1 of both runs: same weights, same samples. The plain run's largest ratio is one of the tokens whose
    # log-prob gap the corrected run measured.
    assert math.log(plain[0]["ratio_max"]) <= tis[0]["rollout_logp_diff_max"] + 1e-6


def test_lora_kl_reference_routes_with_the_source_biases():
    """Under LoRA the KL reference is the policy with its adapters off. The router-bias update moves
    ``e_score_correction_bias`` during the stage, so the reference swaps in the source's biases for its forward:
    its log-probs are then the source model's, and the policy's own biases are back afterwards."""
    from dsalign.alignment.rl import build_rl_batch
    from dsalign.alignment.trainer.lora import LoraSettings, apply_lora
    from dsalign.pipelines.stages import reference_logprobs

    run = load_config(TINY, [])
    tokenizer = task_tokenizer(run.task)
    source = load_source(SOURCE, tokenizer, run.seed).eval()
    policy = load_source(SOURCE, tokenizer, run.seed)
    lora = apply_lora(policy, LoraSettings(r=4, alpha=8.0, target_modules=("kv_b_proj", "o_proj")))
    biases = [g.e_score_correction_bias.clone() for g in policy.gates()]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=gen)  # adapters that have trained
        for g in policy.gates():
            g.e_score_correction_bias.add_(torch.randn(g.e_score_correction_bias.shape, generator=gen))
    moved = [g.e_score_correction_bias.clone() for g in policy.gates()]
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (5, 8, 3, 6)]
    completions = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (12, 4, 9, 10)]
    batch = build_rl_batch(prompts, completions, pad_id=0)

    want = reference_logprobs(source, None, batch, 1.0)
    got = reference_logprobs(policy, lora, batch, 1.0, biases)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(g.e_score_correction_bias, m) for g, m in zip(policy.gates(), moved))
    stale = reference_logprobs(policy, lora, batch, 1.0)  # adapters off, current (moved) biases
    assert (stale - want).abs().max() > 1e-3


def test_all_truncated_iteration_is_reported_not_silent(tmp_path, monkeypatch, capsys):
    """When every completion of an iteration hits max_new_tokens under ``mask_truncated``, no token enters the
    policy loss (pg_loss NaN): the stage says so once and logs ``truncated_frac`` every step (it used to be silent)."""
    import dsalign.pipelines.stages as stages

    original = stages.sample_iteration

    def all_cut(*args, **kwargs):
        prompt_ids, comps, scored, gen_s, sampling = original(*args, **kwargs)
        for c in comps:
            c.finish_reason = "length"
        return prompt_ids, comps, scored, gen_s, sampling

    monkeypatch.setattr(stages, "sample_iteration", all_cut)
    _, log, _, _ = _grpo_stage(tmp_path, "iterations=2", "mask_truncated=true")
    assert [r["truncated_frac"] for r in log] == [1.0, 1.0]
    assert all(r["pg_loss"] is None or math.isnan(r["pg_loss"]) for r in log)
    out = capsys.readouterr().out
    assert out.count("every completion hit grpo.max_new_tokens") == 1, out
    monkeypatch.setattr(stages, "sample_iteration", original)
    _, log, _, _ = _grpo_stage(tmp_path / "plain", "iterations=1")
    assert 0.0 <= log[0]["truncated_frac"] <= 1.0 and "every completion hit" not in capsys.readouterr().out



def test_iteration_no_reward_scored_is_reported_not_silent(tmp_path, monkeypatch, capsys):
    """Every reward returned None (or raised) on every sample: all advantages are 0 and nothing is learned; the
    stage says so once (unscorable_frac = 1 was logged, but nothing else told the user)."""
    import dsalign.pipelines.stages as stages

    original = stages.sample_iteration

    def unscored(*args, **kwargs):
        prompt_ids, comps, scored, gen_s, sampling = original(*args, **kwargs)
        scored.rewards = [None] * len(scored.rewards)
        return prompt_ids, comps, scored, gen_s, sampling

    monkeypatch.setattr(stages, "sample_iteration", unscored)
    _, log, _, _ = _grpo_stage(tmp_path, "iterations=2")
    assert [r["unscorable_frac"] for r in log] == [1.0, 1.0]
    assert capsys.readouterr().out.count("no reward scored any sample") == 1
