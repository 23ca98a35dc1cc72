"""Acceptance 3: the auxiliary-loss-free bias update moves expert load toward balance (and nothing else does)."""

import pytest
import torch
from dsalign.alignment.trainer import LocalRunner, TrainerConfig, lm_loss_fn, prepare_model, train_step
from dsalign.model import ModelConfig, Transformer

STEPS = 24


def _imbalance_history(gamma: float) -> tuple[list[float], Transformer]:
    torch.manual_seed(0)
    cfg = TrainerConfig(lr=1e-4, total_steps=STEPS, bias_update_gamma=gamma, aux_loss_alpha=0.0)
    model = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
    with torch.no_grad():  # skew: every token shares a direction d that experts 0 and 1 answer to
        d = torch.randn(model.cfg.hidden_size)
        model.embed_tokens.weight += 0.05 * d
        for gate in model.gates():
            gate.weight[:2] += 0.2 * d / d.norm()
    runner = LocalRunner(model, cfg)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    history = []
    for _ in range(STEPS):
        metrics = train_step(runner, [{"input_ids": ids, "labels": ids}], lm_loss_fn(mtp_lambda=0.1), cfg)
        layers = [k for k in metrics if k.startswith("load_max_mean/") and k.split("/")[1].isdigit()]
        assert len(layers) == len(model.gates())  # one metric per MoE layer (main + MTP)
        history.append(metrics["load_max_mean/avg"])
    return history, model


@pytest.mark.parametrize("gamma", [0.0, 0.02])
def test_bias_update_moves_load_toward_balance(gamma):
    history, model = _imbalance_history(gamma)
    k, e = model.cfg.num_experts_per_tok, model.cfg.n_routed_experts
    assert history[0] > 0.9 * e / k  # nearly every token starts on experts 0 and 1 (max/mean -> E/K = 4)
    tail = sum(history[-10:]) / 10
    biases = torch.stack([g.e_score_correction_bias for g in model.gates()])
    if gamma > 0:
        assert tail < 0.75 * history[0], history
        assert (
            biases[0, :2] < 0
        ).all() and biases.abs().max() <= gamma * STEPS + 1e-6  # sign rule: hot experts pushed down
    else:
        assert tail > 0.85 * history[0], history
        assert (biases == 0).all()
