"""Acceptance 5: LoRA trains only adapters; the merged export loads in transformers with base + adapter logits."""

import pytest
import torch
from dsalign.alignment.trainer import LocalRunner, TrainerConfig, lm_loss_fn, prepare_model, train_step
from dsalign.alignment.trainer.lora import LoraSettings, apply_lora, export_merged, lora_state_dict
from dsalign.model import ModelConfig, Transformer


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "attention+experts"])
def test_lora_trains_adapters_only_and_merged_export_matches(tmp_path, experts):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = TrainerConfig(lr=5e-3, total_steps=4, bias_update_gamma=0.01)
    model = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
    lora = apply_lora(model, LoraSettings(r=4, alpha=8, experts=experts))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters0 = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert any("experts" in k for k in adapters0) == experts

    runner = LocalRunner(model, cfg)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = [train_step(runner, [{"input_ids": ids, "labels": ids}], lm_loss_fn(0.1), cfg)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    moved = [k for k, v in lora_state_dict(model).items() if not torch.equal(v, adapters0[k])]
    assert any("lora_B" in k for k in moved) and (not experts or any("experts" in k for k in moved))
    # base + lora_state_dict is the trained model (the router biases moved too: gamma > 0)
    assert any(k.endswith("e_score_correction_bias") for k in moved)
    torch.manual_seed(0)  # the same base weights as ``model``
    restored = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
    apply_lora(restored, LoraSettings(r=4, alpha=8, experts=experts))
    restored.load_state_dict(lora_state_dict(model), strict=False)
    probe = torch.randint(0, model.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(probe).logits, model.eval()(probe).logits, atol=1e-6, rtol=0)
    model.train()

    model.eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x).logits  # base + adapter, unmerged
        lora.disable_adapter_layers()
        base_logits = model(x).logits  # same base weights and router biases, adapters off
        lora.enable_adapter_layers()
    assert (base_logits - want).abs().max() > 1e-3  # the adapters did change the model
    export_merged(lora, tmp_path / "merged")  # merges in place: ``model`` is now the merged network
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "attention+experts"])
def test_absorbed_decode_sees_the_adapters(experts):
    """Generation (prefill + one token at a time through the latent cache, whose absorbed attention reads
    ``kv_b_proj``'s weight instead of calling it) computes the same logits as the training forward of the adapted,
    unmerged model (fp32, 1e-4): rollouts of a LoRA policy sample from the policy the update trains."""
    from dsalign.model import LatentCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    lora = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("kv_b_proj", "o_proj"), experts=experts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # peft starts B at zero; make the adapters change the network
    B, T = 2, 12
    x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(model.cfg, batch_size=B, max_len=T)
        steps = [model(x[:, :5], cache=cache, absorbed=True).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(5, T)]
        lora.disable_adapter_layers()
        base = model(x).logits
    assert (base - full).abs().max() > 1e-2  # the adapters matter, so the comparison below can fail
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "attention+experts"])
def test_merged_state_dict_without_a_model_copy(experts):
    """``merged_state_dict`` (what split-mode LoRA GRPO broadcasts) equals peft's merge of a copy, bitwise, with the
    plain model's keys; tensors without an adapter are the model's own (no copy); the model is left unmerged."""
    import copy

    from dsalign.alignment.trainer.lora import merged_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    plain_keys = set(model.state_dict())
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("kv_b_proj", "o_proj"), experts=experts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    want = {k.replace(".base_layer", ""): v for k, v in reference.state_dict().items() if "lora_" not in k}

    got = merged_state_dict(model)
    assert set(got) == set(want) == plain_keys
    model_key = {k.replace(".base_layer", ""): k for k in before if "lora_" not in k}
    changed = {k for k in got if not torch.equal(got[k], before[model_key[k]])}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    own = {v.data_ptr() for v in model.state_dict().values()}
    adapted = {k for k in got if got[k].data_ptr() not in own}
    targets = ("kv_b_proj.weight", "o_proj.weight") + (("gate_up_proj", "down_proj") if experts else ())
    assert adapted and all(k.endswith(targets) for k in adapted), sorted(adapted)
    assert changed == adapted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself is untouched


def test_merge_under_fp8_refreshes_the_quantized_weights():
    """peft merges through ``.data`` (no version bump, same storage): the FP8 copies quantized from the base weights
    must not keep serving the merged model's forwards."""
    from dsalign.alignment.trainer.lora import merge_lora

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(fp8=True)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    lora = apply_lora(model, LoraSettings(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as after training
        model(ids)  # fills the FP8 caches from the base weights
    merged = merge_lora(lora).eval()
    fresh = Transformer(cfg).eval()
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        got, want = merged(ids).logits, fresh(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
