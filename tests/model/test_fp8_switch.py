"""The ``ModelConfig.fp8`` switch: projections and routed experts run FP8 GEMMs; embedding, head, gate stay put."""

from __future__ import annotations

import torch
from dsalign.kernels.fp8_gemm import FP8Linear
from dsalign.model import Transformer, causal_lm_loss
from torch import nn

from .conftest import tiny


def test_fp8_switch_swaps_exactly_the_quantizable_projections():
    model = Transformer(tiny(fp8=True))
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    plain = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)}
    assert plain == {"lm_head"}  # the output head stays in high precision
    assert "layers.0.self_attn.kv_b_proj" in fp8_names and "mtp.0.eh_proj" in fp8_names
    assert all(e.fp8 for e in (model.layers[1].mlp.experts, model.layers[2].mlp.experts))
    assert not isinstance(model.layers[1].mlp.gate, nn.Linear)  # the router is its own fp32 module
    assert set(model.state_dict()) == set(Transformer(tiny()).state_dict())  # checkpoints do not change


def test_fp8_model_tracks_high_precision_and_trains():
    cfg = tiny(first_k_dense_replace=3)  # dense: no top-k flips, so the comparison measures GEMM error only
    ref = Transformer(cfg).eval()
    fp8 = Transformer(cfg.replace(fp8=True)).eval()
    fp8.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = ref(x).logits, fp8(x).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.1, rel  # e4m3 activations and weights: a few percent
    moe = Transformer(tiny(fp8=True)).train()
    loss, _ = causal_lm_loss(moe(x), x, mtp_lambda=0.3)
    loss.backward()
    assert moe.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert moe.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0
