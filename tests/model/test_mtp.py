"""Acceptance 4: MTP weights round-trip at layer num_hidden_layers + k; module output and loss by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dsalign.model import (
    ModelOutput,
    Transformer,
    causal_lm_loss,
    load_checkpoint,
    mtp_acceptance,
    save_checkpoint,
)
from safetensors import safe_open

from .conftest import tiny


def test_mtp_round_trips_through_layer_n_keys(tmp_path):
    cfg = tiny(num_nextn_predict_layers=2)
    model = Transformer(cfg)
    save_checkpoint(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    n = cfg.num_hidden_layers
    for k in range(2):
        for suffix in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "self_attn.kv_b_proj.weight",
            "mlp.experts.3.up_proj.weight",
            "mlp.gate.e_score_correction_bias",
            "input_layernorm.weight",
        ):
            assert f"model.layers.{n + k}.{suffix}" in keys
    assert not any(k.startswith(f"model.layers.{n + 2}.") for k in keys)
    loaded = load_checkpoint(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def _make_block_identity(model):
    """Zero the MTP block's output projections so the block is the identity (residual only)."""
    with torch.no_grad():
        block = model.mtp[0].block
        block.self_attn.o_proj.weight.zero_()
        block.mlp.experts.down_proj.zero_()
        block.mlp.shared_experts.down_proj.weight.zero_()


def _rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_mtp_module_by_hand_embedding_first():
    cfg = tiny()
    model = Transformer(cfg).eval()
    _make_block_identity(model)
    m, H, eps = model.mtp[0], cfg.hidden_size, cfg.rms_norm_eps
    with torch.no_grad():
        m.enorm.weight.fill_(2.0)
        m.hnorm.weight.fill_(3.0)
        m.norm.weight.fill_(0.5)
        # First half of eh_proj's input is the embedding (released-checkpoint order): select it.
        m.eh_proj.weight.copy_(torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1))
    x = torch.randint(1, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        out = model(x, compute_mtp=True)
        emb_next = model.embed_tokens.weight[x[:, 1:]]
        h = 2.0 * _rms(emb_next, eps)
        want = (0.5 * _rms(h, eps)) @ model.lm_head.weight.t()
        assert (out.mtp_logits[0][:, :-1] - want).abs().max().item() < 1e-4
        # Now select the hidden half: the main model's post-norm hidden state feeds hnorm.
        m.eh_proj.weight.copy_(torch.cat([torch.zeros(H, H), torch.eye(H)], dim=1))
        out = model(x, compute_mtp=True)
        want = (0.5 * _rms(3.0 * _rms(out.hidden, eps), eps)) @ model.lm_head.weight.t()
        assert (out.mtp_logits[0] - want).abs().max().item() < 1e-4


def test_causal_lm_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, T, V = 2, 6, 5
    logits, mtp1, mtp2 = (torch.randn(B, T, V) for _ in range(3))
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = -100
    out = ModelOutput(logits=logits, mtp_logits=[mtp1, mtp2])
    lam = 0.3
    loss, metrics = causal_lm_loss(out, labels, mtp_lambda=lam)

    def ce(lg, shift):
        terms = []
        for b in range(B):
            for i in range(T - shift):
                y = int(labels[b, i + shift])
                if y == -100:
                    continue
                terms.append(-(lg[b, i, y] - torch.logsumexp(lg[b, i], dim=0)))
        return torch.stack(terms).mean()

    want = ce(logits, 1) + lam / 2 * (ce(mtp1, 2) + ce(mtp2, 3))
    assert abs(loss.item() - want.item()) < 1e-5
    assert abs(metrics["mtp_ce_2"] - ce(mtp2, 3).item()) < 1e-5


def test_loss_ignores_targets_across_packed_samples():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 7)
    labels = torch.randint(0, 7, (1, 6))
    seg = torch.tensor([[1, 1, 1, 2, 2, 2]])
    loss, _ = causal_lm_loss(ModelOutput(logits=logits), labels, segment_ids=seg)
    keep = [0, 1, 3, 4]  # position 2 would predict the first token of sample 2
    want = F.cross_entropy(logits[0, keep], labels[0, [k + 1 for k in keep]])
    assert abs(loss.item() - want.item()) < 1e-6


def test_mtp_trains_with_the_main_model():
    cfg = tiny()
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(x)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == out.logits.shape
    loss, _ = causal_lm_loss(out, x, mtp_lambda=0.3)
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def _acceptance_by_hand(logits, drafts, labels, seg=None):
    """Depth k at position i is accepted iff argmax(draft_k[i]) == argmax(logits[i + k]); over positions whose
    target labels[i + k + 1] is trained and in position i's segment."""
    B, T = labels.shape
    rates = []
    for k, d in enumerate(drafts, start=1):
        hits = []
        for b in range(B):
            for i in range(T - k - 1):
                if labels[b, i + k + 1] == -100 or (seg is not None and seg[b, i] != seg[b, i + k + 1]):
                    continue
                hits.append(int(d[b, i].argmax() == logits[b, i + k].argmax()))
        rates.append(sum(hits) / len(hits))
    return rates


def test_mtp_acceptance_by_hand():
    """Drafts built to agree with the main head on known positions: the rate counts exactly those, skips untrained
    targets and targets in another packed sample, and reports each depth."""
    torch.manual_seed(0)
    B, T, V = 2, 10, 7
    logits = torch.randn(B, T, V)
    d1, d2 = torch.randn(B, T, V), torch.randn(B, T, V)
    d1[:, :-1] = logits[:, 1:]  # depth 1 agrees everywhere ...
    d1[0, 3] = -logits[0, 4]  # ... but one position (its argmax moves)
    d2[:, :4] = logits[:, 2:6]
    labels = torch.randint(0, V, (B, T))
    labels[1, 5] = -100
    seg = torch.tensor([[1] * 6 + [2] * 4, [1] * 10])
    got = mtp_acceptance(ModelOutput(logits=logits, mtp_logits=[d1, d2]), labels, seg)
    want = _acceptance_by_hand(logits, [d1, d2], labels, seg)
    assert set(got) == {"mtp_acceptance", "mtp_acceptance_2"}
    assert abs(got["mtp_acceptance"] - want[0]) < 1e-6 and 0.8 < want[0] < 1.0
    assert abs(got["mtp_acceptance_2"] - want[1]) < 1e-6
    assert mtp_acceptance(ModelOutput(logits=logits), labels) == {}  # no MTP outputs
    # nothing to count (e.g. every completion of this rank masked as truncated): the same keys, NaN, so that ranks
    # averaging their metrics key by key still agree on the keys
    none = mtp_acceptance(ModelOutput(logits=logits, mtp_logits=[d1, d2]), torch.full((B, T), -100))
    assert list(none) == ["mtp_acceptance", "mtp_acceptance_2"] and all(math.isnan(v) for v in none.values())
    short = mtp_acceptance(ModelOutput(logits=logits[:, :2], mtp_logits=[d1[:, :2], d2[:, :2]]), labels[:, :2])
    assert list(short) == ["mtp_acceptance", "mtp_acceptance_2"] and math.isnan(short["mtp_acceptance_2"])


def test_mtp_acceptance_fused_matches_logits_and_is_logged():
    """The fused path (head inputs + head weight) gives the logits path's rate; the SFT loss logs it; the position
    cap samples evenly (a rate over the cap's positions, no RNG drawn)."""
    from dsalign.alignment.trainer.step import lm_loss_fn

    cfg = tiny()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        full = model(x, compute_mtp=True)
        fused = model(x, compute_mtp=True, return_logits=False)
    want = _acceptance_by_hand(full.logits, full.mtp_logits, x)[0]
    assert abs(mtp_acceptance(full, x)["mtp_acceptance"] - want) < 1e-6
    assert abs(mtp_acceptance(fused, x, head_weight=model.lm_head.weight)["mtp_acceptance"] - want) < 1e-6
    state = torch.get_rng_state()
    capped = mtp_acceptance(full, x, max_positions=5)["mtp_acceptance"]
    assert torch.equal(state, torch.get_rng_state()) and capped * 5 == round(capped * 5)
    _, metrics = lm_loss_fn(mtp_lambda=0.1)(model.train(), {"input_ids": x, "labels": x})
    assert 0.0 <= metrics["mtp_acceptance"] <= 1.0
    _, metrics = lm_loss_fn(mtp_lambda=0.0)(model, {"input_ids": x, "labels": x})
    assert "mtp_acceptance" not in metrics
