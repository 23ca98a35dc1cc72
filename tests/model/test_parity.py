"""Acceptance 1: logits parity with transformers' DeepseekV3ForCausalLM through files, both directions (fp32)."""

from __future__ import annotations

import pytest
import torch
from dsalign.model import load_checkpoint, save_checkpoint

from .conftest import YARN, hf_reference, tiny

TOL = 1e-4

CASES = {
    "yarn-interleave": dict(rope_scaling=YARN, rope_interleave=True),
    "yarn-half-split": dict(rope_scaling=YARN, rope_interleave=False),
    "no-q-lora": dict(q_lora_rank=None, rope_interleave=True),
    "plain-rope-half-split": dict(rope_interleave=False),
    # the latent norms keep eps 1e-6 whatever rms_norm_eps is (as transformers and DeepSeek's code build them)
    "rms-eps-1e-2": dict(rms_norm_eps=1e-2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, case):
    cfg = tiny(**CASES[case])
    ref = hf_reference(cfg)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = ref(x).logits, ours(x).logits
    assert (want - got).abs().max().item() <= TOL


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_matches_transformers(tmp_path, padding_side):
    cfg = tiny(rope_scaling=YARN)
    ref = hf_reference(cfg, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval()
    lengths = [20, 13, 7]
    T = max(lengths)
    x = torch.randint(0, cfg.vocab_size, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding_side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n :] = 1
    # Positions count real tokens only, so each row is the same sequence whatever its padding.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask, position_ids=pos).logits
        alone = [ours(x[b : b + 1, mask[b].bool()]).logits[0] for b in range(len(lengths))]
    valid = mask.bool()
    assert (want[valid] - got[valid]).abs().max().item() <= TOL
    for b in range(len(lengths)):  # padding changes nothing for the real tokens
        assert (got[b][valid[b]] - alone[b]).abs().max().item() <= TOL


def test_dsalign_checkpoint_loads_in_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny(rope_scaling=YARN)
    ref = hf_reference(cfg, seed=5)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf", missing_mtp="init").eval()
    save_checkpoint(ours, tmp_path / "ours", max_shard_bytes=200_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()  # sharded
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a, b, c = ours(x).logits, back(x).logits, ref(x).logits
    assert (a - b).abs().max().item() <= TOL
    assert (a - c).abs().max().item() <= TOL


def test_fused_v5_expert_keys_load(tmp_path):
    """A checkpoint whose experts are stored fused ([E, 2I, H] / [E, H, I]) loads like the per-expert one."""
    from safetensors.torch import load_file, save_file

    cfg = tiny()
    ref = hf_reference(cfg, seed=7)
    ref.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    fused = {}
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(cfg.n_routed_experts):
            gate_up.append(torch.cat([state.pop(f"{p}.{e}.gate_proj.weight"), state.pop(f"{p}.{e}.up_proj.weight")]))
            down.append(state.pop(f"{p}.{e}.down_proj.weight"))
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{p}.down_proj"] = torch.stack(down)
    save_file({**state, **fused}, str(tmp_path / "hf" / "model.safetensors"))
    ours = load_checkpoint(tmp_path / "hf").eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ref(x).logits - ours(x).logits).abs().max().item() <= TOL
