"""Acceptance 2: incremental decoding with the absorbed latent cache reproduces the full forward (fp32, 1e-4)."""

from __future__ import annotations

import torch
from dsalign.model import LatentCache, ModelConfig, Transformer

from .conftest import YARN, tiny

TOL = 1e-4


def test_cache_holds_latent_plus_rope_per_token_per_layer():
    cfg = tiny()
    cache = LatentCache(cfg, batch_size=2, max_len=8)
    assert cache.values_per_token_per_layer() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.data.shape == (cfg.num_hidden_layers, 2, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    big = ModelConfig.preset("v3-671b")
    meta = LatentCache(big, batch_size=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert meta.values_per_token_per_layer() == 576
    assert meta.bytes_per_token() == 70_272  # 576 values x 2 bytes x 61 layers (docs/SPEC.md section 2)


def _ragged_decode(model, x, prompt_lens, absorbed_prefill):
    """Prefill right-padded prompts, then feed each sequence's next tokens one at a time."""
    B, T = x.shape
    cache = LatentCache(model.cfg, batch_size=B, max_len=T)
    P = max(prompt_lens)
    prompt = x[:, :P].clone()
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        mask[b, :n] = 1
    steps = {}
    out = model(prompt, attention_mask=mask, cache=cache, absorbed=absorbed_prefill)
    for b, n in enumerate(prompt_lens):
        steps[(b, n - 1)] = out.logits[b, n - 1]
    assert cache.lengths.tolist() == list(prompt_lens)
    while int(cache.lengths.min()) < T:
        pos = cache.lengths.clone()
        nxt = x.gather(1, pos.clamp(max=T - 1)[:, None])
        live = pos < T
        out = model(nxt, attention_mask=live[:, None].long(), cache=cache)
        for b in range(B):
            if live[b]:
                steps[(b, int(pos[b]))] = out.logits[b, 0]
    return steps


def test_absorbed_decode_matches_full_forward_ragged():
    cfg = tiny(rope_scaling=YARN)
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 14))
    with torch.no_grad():
        full = model(x).logits
        for absorbed_prefill in (False, True):
            steps = _ragged_decode(model, x, [3, 9, 6], absorbed_prefill)
            for (b, t), logits in steps.items():
                assert (logits - full[b, t]).abs().max().item() <= TOL, (b, t, absorbed_prefill)
            assert len(steps) == sum(14 - n + 1 for n in (3, 9, 6))


def test_absorbed_equals_naive_without_q_lora():
    cfg = tiny(q_lora_rank=None, rope_interleave=False)
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(cfg, batch_size=2, max_len=10)
        chunked = [model(x[:, :4], cache=cache).logits, model(x[:, 4:7], cache=cache).logits]
        chunked.append(model(x[:, 7:], cache=cache).logits)
    assert (torch.cat(chunked, dim=1) - full).abs().max().item() <= TOL


def test_cache_rejects_positions_past_its_end():
    cfg = tiny()
    model = Transformer(cfg).eval()
    cache = LatentCache(cfg, batch_size=1, max_len=4)
    try:
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    except ValueError as e:
        assert "max_len=4" in str(e)
    else:
        raise AssertionError("writing 5 tokens into a 4-token cache must fail")


def test_left_padded_prefill_then_decode_matches_each_row_alone():
    """Without position_ids, a cached forward places each row's real tokens right after what it has cached, wherever
    the padding sits: arange positions put a left-padded row's tokens past its cached length, and the next decode
    step overwrote one of them and attended to slots never written."""
    torch.manual_seed(0)
    cfg = tiny(rope_scaling=YARN)
    model = Transformer(cfg).eval()
    lens, width = [6, 3], 6
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.zeros(2, width, dtype=torch.long)
    prompt = torch.zeros(2, width, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, width - n :], prompt[b, width - n :] = 1, x[b, :n]
    with torch.no_grad():
        alone = [model(x[b : b + 1, : lens[b] + 2]).logits[0] for b in range(2)]
        cache = LatentCache(cfg, 2, 16)
        out = model(prompt, attention_mask=mask, cache=cache)
        step = model(torch.stack([x[b, lens[b]] for b in range(2)])[:, None], cache=cache)
    assert cache.lengths.tolist() == [n + 1 for n in lens]
    for b, n in enumerate(lens):
        torch.testing.assert_close(out.logits[b, -1], alone[b][n - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.logits[b, 0], alone[b][n], atol=1e-5, rtol=1e-5)


def test_cache_write_slots_are_found_once_per_forward(monkeypatch):
    """Every layer writes the same tokens: the slots (a ``nonzero`` and a bounds check, two host syncs on CUDA) are
    computed once per forward, not once per layer, for both cache layouts (the decode tests above check the
    results)."""
    from dsalign.model import FP8LatentCache

    cfg = tiny()
    assert cfg.num_hidden_layers > 1
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    calls = []
    original = LatentCache._compute_slots
    monkeypatch.setattr(LatentCache, "_compute_slots", lambda self, *a: calls.append(1) or original(self, *a))
    x = torch.randint(0, cfg.vocab_size, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    for kind in (LatentCache, FP8LatentCache):
        cache = kind(cfg, batch_size=2, max_len=16)
        with torch.no_grad():
            model(x, attention_mask=mask, cache=cache)
            assert len(calls) == 1
            model(x[:, -1:], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)
        assert len(calls) == 2
        calls.clear()


def test_fp8_cache_keeps_pow2_quantized_latents_exact():
    """An FP8 model with power-of-two scales caches its latents quantized that way (as kv_b_proj sees them): the
    FP8 cache re-quantizes them with the same rule, exactly (amax/448 scales rounded them a second time)."""
    from dsalign.kernels.quant import dequantize_ref, quantize_act
    from dsalign.model import FP8LatentCache

    cfg = tiny(fp8=True, fp8_pow2_scales=True)
    torch.manual_seed(0)
    c = torch.randn(2, 5, cfg.kv_lora_rank)
    q, s = quantize_act(c.reshape(-1, cfg.kv_lora_rank), pow2=True)
    c_qdq = dequantize_ref(q, s, 1).view(c.shape)
    cache = FP8LatentCache(cfg, batch_size=2, max_len=8)
    cache.write(0, c_qdq, torch.zeros(2, 5, cfg.qk_rope_head_dim), torch.arange(5).expand(2, 5))
    got, _ = cache.read(0, 5)
    assert torch.equal(got.float(), c_qdq)
