"""The step API: accumulation equals one big batch; schedule; bf16 moments; bf16 compute; FP8 GEMMs through the
trainer track the fp32 run (the short version of bench/fp8_train.py)."""

import math

import pytest
import torch
from dsalign.alignment.trainer import (
    AdamW,
    LocalRunner,
    TrainerConfig,
    lm_loss_fn,
    lr_factor,
    prepare_model,
    train_step,
)
from dsalign.model import ModelConfig, Transformer


def _run(steps: int, micro: int = 1, fp8: bool = False, **cfg_kwargs) -> tuple[list[float], LocalRunner]:
    torch.manual_seed(0)
    cfg = TrainerConfig(lr=3e-3, total_steps=steps, micro_batches=micro, bias_update_gamma=0.01, **cfg_kwargs)
    model = prepare_model(Transformer(ModelConfig.preset("tiny").replace(fp8=fp8)), cfg)
    runner = LocalRunner(model, cfg)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    batches = [{"input_ids": part, "labels": part} for part in ids.chunk(micro)]
    losses = [train_step(runner, batches, lm_loss_fn(mtp_lambda=0.3), cfg)["loss"] for _ in range(steps)]
    return losses, runner


def test_accumulation_equals_one_big_batch():
    one, r1 = _run(3, micro=1)
    two, r2 = _run(3, micro=2)
    assert one == pytest.approx(two, rel=1e-5)  # params: Adam amplifies summation-order noise of ~0 grads
    for (name, a), b in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("agg", ["lm", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_unequal_micro_batches_accumulate_the_full_batch_gradient(agg):
    """Micro-batches with very different numbers of targets (2 vs 16 tokens; a fully masked sequence) accumulate
    the gradient of the loss over the whole batch, not a mean of per-micro-batch means: ``train_step`` weighs each
    by its share of the loss's ``units`` (target tokens, sequences)."""
    from dsalign.alignment.policy_loss import PolicyLossConfig
    from dsalign.alignment.rl import grpo_loss_fn
    from dsalign.alignment.trainer.step import forward_backward, micro_batch_shares

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 18), generator=torch.Generator().manual_seed(3))
    if agg == "lm":
        labels = ids.clone()
        labels[:2, 3:] = -100  # rows 0-1: 2 targets each; rows 2-3: 17 each
        batch, loss_fn = {"input_ids": ids, "labels": labels}, lm_loss_fn(mtp_lambda=0.0)
    else:
        mask = torch.zeros(4, 18)
        mask[0, 15:] = 1.0
        mask[2, 2:] = 1.0
        mask[3, 4:] = 1.0  # row 1 is fully masked (a truncated completion)
        batch = {"input_ids": ids, "attention_mask": torch.ones(4, 18, dtype=torch.long), "completion_mask": mask,
                 "old_logp": -torch.rand(4, 18), "advantages": torch.tensor([1.0, -0.5, 0.3, -1.0])}  # fmt: skip
        loss_fn = grpo_loss_fn(PolicyLossConfig(agg=agg, norm_length=16), aux_loss_coef=0.0)

    def grads(micro: int) -> dict[str, torch.Tensor]:
        cfg = TrainerConfig(micro_batches=micro, grad_clip=0.0, bias_update_gamma=0.0)
        torch.manual_seed(0)
        model = prepare_model(Transformer(ModelConfig.preset("tiny").replace(aux_loss_alpha=0.0)), cfg)
        runner = LocalRunner(model, cfg)
        parts = [{k: v[i : i + 4 // micro] for k, v in batch.items()} for i in range(0, 4, 4 // micro)]
        shares = micro_batch_shares(parts, loss_fn, None)
        for i, mb in enumerate(parts):  # the accumulation train_step does, without the optimizer step
            forward_backward(runner, mb, loss_fn, cfg, i, micro, shares[i])
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, two = grads(1), grads(2)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_wrong_number_of_micro_batches_is_explained():
    cfg = TrainerConfig(micro_batches=2)
    runner = LocalRunner(prepare_model(Transformer(ModelConfig.preset("tiny")), cfg), cfg)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="micro_batches is 2"):
        train_step(runner, [{"input_ids": ids, "labels": ids}], lm_loss_fn(), cfg)


def test_warmup_cosine_schedule():
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_a_resume_with_more_total_steps_follows_the_new_schedule_from_its_first_step():
    """The optimizer's saved lr came from the schedule it was saved under; resumed with more total steps (more
    GRPO iterations) the first step used it, the next ones the new schedule."""
    _, runner = _run(3, warmup_steps=1)  # total 3: the cosine is near its end
    state = runner.state_dict()
    cfg = TrainerConfig(lr=3e-3, total_steps=30, warmup_steps=1)
    resumed = LocalRunner(prepare_model(Transformer(ModelConfig.preset("tiny")), cfg), cfg)
    resumed.load_state_dict(state)
    assert resumed.lr() == pytest.approx(3e-3 * lr_factor(3, 1, 30, cfg.min_lr_ratio))
    assert resumed.lr() > 2 * runner.lr()
    lower = TrainerConfig(lr=1e-4, total_steps=30, warmup_steps=1)  # and another optim.lr: the new peak applies
    again = LocalRunner(prepare_model(Transformer(ModelConfig.preset("tiny")), lower), lower)
    again.load_state_dict(state)
    assert again.lr() == pytest.approx(1e-4 * lr_factor(3, 1, 30, lower.min_lr_ratio))


def test_bf16_moments_and_bf16_compute_track_fp32():
    base, _ = _run(6)
    bf16_moments, runner = _run(6, moment_dtype="bf16")
    assert isinstance(runner.optimizer, AdamW)  # ours: torch's fused AdamW keeps moments in the param dtype
    states = list(runner.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())  # fp32 master weights
    bf16_compute, _ = _run(6, compute_dtype="bf16")
    assert base[-1] < 0.9 * base[0]
    assert bf16_moments[-1] == pytest.approx(base[-1], rel=0.02)
    assert bf16_compute[-1] == pytest.approx(base[-1], rel=0.03)


def test_fp8_training_tracks_fp32():
    """Short version of ``bench/fp8_train.py``: FP8 projections (fwd/dgrad/wgrad e4m3) through the trainer, with
    torch's fused AdamW (which does not move the weights' version counter, so the FP8 weight caches must be
    refreshed by the trainer: without that the run trains against stale weights and ends ~6% higher here)."""
    base, _ = _run(12)
    fp8, runner = _run(12, fp8=True)
    assert isinstance(runner.optimizer, torch.optim.AdamW)
    assert any(type(m).__name__ == "FP8Linear" for m in runner.model.modules())
    assert fp8[-1] < 0.8 * fp8[0]
    assert fp8[-1] == pytest.approx(base[-1], rel=0.01)


def test_fp8_training_under_bf16_compute():
    """FP8 GEMMs with ``compute_dtype: bf16`` (the tiny preset's expert widths are not multiples of 128, so each
    expert's fp8 copy is quantized alone and stacked): stacking fp8 tensors under autocast raised, failing every
    FP8 + bf16 stage."""
    base, _ = _run(6)
    fp8_bf16, _ = _run(6, fp8=True, compute_dtype="bf16")
    assert fp8_bf16[-1] == pytest.approx(base[-1], rel=0.03)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown key"):
        TrainerConfig.from_dict({"lr": 1e-4, "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="moment_dtype"):
        TrainerConfig(moment_dtype="fp16")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_lr_ratio": -0.5}, r"min_lr_ratio must be in \[0, 1\]"),  # the cosine's tail would ascend
        ({"min_lr_ratio": 3.0}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"beta2": 1.5}, r"beta1 and beta2 must be in \[0, 1\)"),
        ({"lr": -1e-3}, r"lr must be > 0"),
        ({"lr": "1e-5"}, r"lr must be a finite number, got str '1e-5'"),  # YAML 1.1 reads 1e-5 as a string
        ({"eps": 0.0}, r"need eps > 0"),
        ({"total_steps": 10.5}, r"total_steps must be an integer, got float"),
    ],
)
def test_config_names_a_bad_optimizer_value(values, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig.from_dict(values)


def test_activation_checkpointing_gives_the_same_step():
    plain, r1 = _run(2)
    recomputed, r2 = _run(2, activation_checkpointing=True)
    assert r2.model.activation_checkpointing and not r1.model.activation_checkpointing
    assert recomputed == pytest.approx(plain, rel=1e-6)
    for (name, a), b in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_export_hf_round_trip(tmp_path):
    from dsalign.alignment.trainer import export_hf
    from dsalign.model import load_checkpoint

    _, runner = _run(2)
    export_hf(runner, tmp_path / "hf")
    back = load_checkpoint(tmp_path / "hf")
    for name, tensor in runner.model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name  # incl. the trained router biases


@pytest.mark.parametrize("mtp_lambda", [0.0, 0.3])
def test_fused_ce_loss_equals_the_logits_loss(mtp_lambda):
    """``lm_loss_fn(fused_ce=True)`` (head inputs + fused chunked CE) gives the loss, metrics and every parameter
    gradient of the plain logits path, with ignored labels, packed segments and MTP."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    labels = ids.masked_fill(torch.arange(17) < 5, -100)
    segment_ids = torch.tensor([[0] * 9 + [1] * 8, [0] * 17])
    batch = {"input_ids": ids, "labels": labels, "segment_ids": segment_ids}
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss, metrics = lm_loss_fn(mtp_lambda, fused_ce=fused)(model, batch)
        loss.backward()
        results.append((loss.item(), metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_metrics, plain_grads), (fused, fused_metrics, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6)
    assert fused_metrics.keys() == plain_metrics.keys() and ("mtp_ce_1" in fused_metrics) == (mtp_lambda > 0)
    assert fused_metrics == pytest.approx(plain_metrics, rel=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, g in fused_grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_zero3_with_expert_parallelism_is_refused_with_the_reason():
    assert TrainerConfig(zero_stage=3).zero_stage == 3  # data parallel only: allowed
    with pytest.raises(ValueError, match="AutoEP"):
        TrainerConfig(zero_stage=3, ep_size=2)
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        TrainerConfig(zero_stage=4)
