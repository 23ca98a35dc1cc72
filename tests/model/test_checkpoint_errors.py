"""Bad checkpoints and configs fail with a ValueError naming the file, the key and what is wrong."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from dsalign.model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from dsalign.model.config import REQUIRED_HF_KEYS
from safetensors import SafetensorError

from .conftest import tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint (3 layers + 1 MTP), written once; tests corrupt copies of it."""
    return save_checkpoint(Transformer(tiny()), tmp_path_factory.mktemp("ck") / "tiny")


_DROP = object()  # a config_changes value: delete the key


def _copy(saved, tmp_path, **config_changes):
    """A copy of checkpoint ``saved`` with its config.json keys changed (or dropped)."""
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    cfg = json.loads((ck / "config.json").read_text())
    for key, value in config_changes.items():
        if value is _DROP:
            del cfg[key]
        else:
            cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


# ---------------------------------------------------------------------------------------------------- field types
def test_wrong_type_in_config_json_names_file_key_type_and_value(saved, tmp_path):
    ck = _copy(saved, tmp_path, num_hidden_layers="2")
    want = r"ck/config.json: invalid ModelConfig: num_hidden_layers must be int, got str '2'"
    with pytest.raises(ValueError, match=want):
        ModelConfig.from_hf(ck)
    with pytest.raises(ValueError, match=want):
        load_checkpoint(ck)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": "two"}, "num_hidden_layers must be int, got str 'two'"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be int, got bool True"),  # bools are not ints
        ({"vocab_size": 256.0}, "vocab_size must be int, got float 256.0"),
        ({"routed_scaling_factor": "2.5"}, r"routed_scaling_factor must be float \(or int\), got str '2.5'"),
        ({"q_lora_rank": "32"}, "q_lora_rank must be int or None, got str '32'"),
        ({"rope_scaling": "yarn"}, "rope_scaling must be dict or None, got str 'yarn'"),
        ({"eos_token_id": ["1"]}, r"eos_token_id must be int or list of int or None, got list \['1'\]"),
        ({"norm_topk_prob": 1}, "norm_topk_prob must be bool, got int 1"),
        ({"n_group": 0}, "n_group must be > 0"),  # was a ZeroDivisionError
    ],
)
def test_wrong_type_in_overrides_names_key_type_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny").replace(**change)


def test_right_types_still_accepted():
    cfg = tiny(rope_theta=10000, q_lora_rank=None, eos_token_id=[1, 2], rope_scaling=None, routed_scaling_factor=2)
    assert cfg.rope_theta == 10000 and cfg.q_lora_rank is None and cfg.eos_token_id == [1, 2]
    assert ModelConfig().num_hidden_layers == 61  # the 671B defaults stay, in Python


# ---------------------------------------------------------------------------------------------------- required keys
def test_empty_config_json_is_refused_naming_the_missing_keys(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json: missing required keys \['vocab_size', 'hidden_size'") as e:
        ModelConfig.from_hf(tmp_path)
    for key in REQUIRED_HF_KEYS:
        assert repr(key) in str(e.value)


def test_checkpoint_config_without_a_size_is_refused(saved, tmp_path):
    ck = _copy(saved, tmp_path, hidden_size=_DROP)
    with pytest.raises(ValueError, match=r"ck/config.json: missing required keys \['hidden_size'\]"):
        load_checkpoint(ck)


def test_num_key_value_heads_defaults_to_the_attention_heads(saved, tmp_path):
    """As in transformers: MLA has as many key/value heads as query heads, so the key may be left out."""
    ck = _copy(saved, tmp_path, num_key_value_heads=_DROP)
    assert ModelConfig.from_hf(ck).num_key_value_heads == tiny().num_attention_heads


# ---------------------------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize(
    "keep, problem",
    [(4, "header too small"), (None, "incomplete metadata")],  # None: cut the file in half
)
def test_truncated_safetensors_names_the_file(saved, tmp_path, keep, problem):
    ck = _copy(saved, tmp_path)
    shard = ck / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: keep or len(data) // 2])
    with pytest.raises(ValueError, match=rf"ck/model\.safetensors: not a readable safetensors file \(.*{problem}") as e:
        load_checkpoint(ck)
    assert isinstance(e.value.__cause__, SafetensorError)


def test_truncated_shard_of_an_indexed_checkpoint_names_the_shard(tmp_path):
    ck = save_checkpoint(Transformer(tiny()), tmp_path / "ck", max_shard_bytes=100_000)
    shard = sorted(ck.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file") as e:
        load_checkpoint(ck)
    assert isinstance(e.value.__cause__, SafetensorError)


# ---------------------------------------------------------------------------------------------------- key mismatch
@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """Weights with 4 main layers (0-3) and an MTP layer (4)."""
    return save_checkpoint(Transformer(tiny(num_hidden_layers=4)), tmp_path_factory.mktemp("ck4") / "four")


def test_fewer_layers_in_config_says_so_and_lists_both_sides(four_layers, tmp_path):
    ck = _copy(four_layers, tmp_path, num_hidden_layers=2)
    with pytest.raises(ValueError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert "config.json says num_hidden_layers=2 (+1 MTP) but the weights hold layers 0-4 (4 main: 0-3; MTP: 4)" in msg
    assert "4 model parameters missing from the checkpoint, e.g. ['mtp.0.enorm.weight (0/1 pieces)'" in msg
    assert re.search(r"\d+ checkpoint tensors unexpected, e\.g\. \['model\.layers\.3\.", msg), msg


def test_fewer_layers_in_config_without_mtp_is_not_loaded_silently(four_layers, tmp_path):
    """Nothing is missing here: the weights' layers 2-3 used to be dropped with a warning, truncating the model."""
    ck = _copy(four_layers, tmp_path, num_hidden_layers=2, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match=r"num_hidden_layers=2 \(\+0 MTP\) but the weights hold layers 0-4"):
        load_checkpoint(ck)


def test_more_layers_in_config_says_so(four_layers, tmp_path):
    ck = _copy(four_layers, tmp_path, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"num_hidden_layers=6 \(\+1 MTP\) but the weights hold layers 0-4") as e:
        load_checkpoint(ck)
    assert "missing from the checkpoint, e.g. ['layers.5." in str(e.value)  # layer 4's block came from the MTP layer


def test_missing_tensor_alone_is_named_without_a_layer_complaint(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = _copy(saved, tmp_path)
    state = load_file(str(ck / "model.safetensors"))
    del state["model.layers.1.self_attn.o_proj.weight"]
    state["model.layers.1.self_attn.o_proj.bias"] = state["model.norm.weight"].clone()
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert "1 model parameters missing from the checkpoint, e.g. ['layers.1.self_attn.o_proj.weight" in msg
    assert "1 checkpoint tensors unexpected, e.g. ['model.layers.1.self_attn.o_proj.bias']" in msg
    assert "config.json says" not in msg


def test_tied_head_survives_a_round_trip(tmp_path):
    """to_empty gives each module its own storage; the loader ties the head to the embedding again (it was left as
    uninitialized memory: logits off by ~10)."""
    import torch

    model = Transformer(tiny(tie_word_embeddings=True)).eval()
    back = load_checkpoint(save_checkpoint(model, tmp_path / "tied")).eval()
    assert back.lm_head.weight is back.embed_tokens.weight
    x = torch.randint(0, model.cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, model(x).logits, atol=1e-6)


def test_failed_swap_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    import os

    import dsalign.model.checkpoint as ck

    path = tmp_path / "ck"
    shutil.copytree(saved, path)
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the temp dir into place, after the old one moved aside
            raise OSError("simulated failure")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(Transformer(tiny()), path)
    monkeypatch.setattr(ck.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    load_checkpoint(path)


def test_plain_save_of_an_fp8_loaded_model_drops_quantization_config(tmp_path):
    fp8 = save_checkpoint(Transformer(tiny()), tmp_path / "fp8", fp8=True)
    model = load_checkpoint(fp8)
    assert model.cfg.quantization_config is not None
    plain = save_checkpoint(model, tmp_path / "plain")
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())


def test_more_experts_in_weights_than_config_names_the_key(saved, tmp_path):
    e = ModelConfig.from_hf(saved).n_routed_experts
    ck = _copy(saved, tmp_path, n_routed_experts=e // 2, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match=r"is routed expert \d+, but config.json says n_routed_experts"):
        load_checkpoint(ck)


def test_index_is_checked_against_its_shards(tmp_path):
    ck = save_checkpoint(Transformer(tiny()), tmp_path / "sharded", max_shard_bytes=20_000)
    index = ck / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    data["weight_map"]["model.norm.weight"] = next(s for s in shards if s != data["weight_map"]["model.norm.weight"])
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tensors it assigns to .* are not in that file.*model\.norm\.weight"):
        load_checkpoint(ck)
    data["weight_map"] = list(data["weight_map"])
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to shard files, got a list"):
        load_checkpoint(ck)


def test_missing_mtp_value_is_checked(saved):
    with pytest.raises(ValueError, match="missing_mtp must be one of"):
        load_checkpoint(saved, missing_mtp="Error")


def test_to_hf_and_replace_do_not_share_rope_scaling():
    from .conftest import YARN

    cfg = tiny(rope_scaling=dict(YARN))
    cfg.to_hf()["rope_scaling"]["rope_theta"] = 1.0
    cfg.replace(hidden_size=cfg.hidden_size)
    assert "rope_theta" not in cfg.rope_scaling
    other = cfg.replace(rope_theta=5.0)
    other.rope_scaling["factor"] = 99.0
    assert cfg.rope_scaling["factor"] == YARN["factor"]


def test_a_stray_shard_holding_a_tensor_again_is_an_error(saved, tmp_path):
    """Without an index every *.safetensors file is read: a second copy of a tensor used to win by file name order,
    silently (transformers reads model.safetensors only)."""
    import torch
    from safetensors.torch import save_file

    ck = _copy(saved, tmp_path)
    save_file({"model.norm.weight": torch.full((tiny().hidden_size,), 7.0)}, str(ck / "zz.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' is in both model.safetensors and "
                                         r"zz.safetensors and no model.safetensors.index.json says which"):  # fmt: skip
        load_checkpoint(ck)


def test_saving_a_model_with_unmerged_lora_adapters_is_refused(tmp_path):
    """Its adapter keys (``base_layer``, ``lora_A``) are not the official layout: load_checkpoint refused the result
    and transformers initialized those weights randomly. ``export_merged`` is the way."""
    from dsalign.alignment.trainer.lora import apply_lora, export_merged

    lora = apply_lora(Transformer(tiny()))
    with pytest.raises(ValueError, match=r"unmerged LoRA adapters \(\d+ parameters, e.g. .*\); save it with "
                                         r"dsalign.alignment.trainer.lora.export_merged"):  # fmt: skip
        save_checkpoint(lora, tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not list(tmp_path.iterdir())
    load_checkpoint(export_merged(lora, tmp_path / "merged"))


def test_check_checkpoint_compares_tensor_shapes_with_config_json(saved, tmp_path):
    """Shapes are in the shard headers: preflight (check_checkpoint) catches a config.json the weights do not fit,
    which only the load in a worker caught before."""
    from dsalign.model import check_checkpoint

    ck = _copy(saved, tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match=r"tensors do not fit config.json: .*model.embed_tokens.weight has shape "
                                         r"\(256, 64\), expected \(300, 64\) for embed_tokens.weight"):  # fmt: skip
        check_checkpoint(ck)
    ck2 = _copy(saved, tmp_path / "b", moe_intermediate_size=tiny().moe_intermediate_size * 2)
    with pytest.raises(ValueError, match=r"mlp.experts.0.gate_proj.weight has shape \(\d+, 64\), expected"):
        check_checkpoint(ck2)


def test_saving_over_a_checkpoint_keeps_its_other_files_and_clears_dead_temp_dirs(tmp_path, caplog):
    """save_checkpoint(load_checkpoint(d), d) deleted the tokenizer and generation config beside the weights (the
    directory was swapped whole); a killed save's temp directory stayed forever."""
    import os
    import subprocess
    import sys

    from dsalign.model.checkpoint import _HOST

    ck = save_checkpoint(Transformer(tiny()), tmp_path / "ck")
    (ck / "tokenizer.json").write_text("{}")
    (ck / "generation_config.json").write_text('{"eos_token_id": 1}')
    (ck / "extra").mkdir()
    (ck / "extra" / "notes.txt").write_text("kept")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ck.tmp-{_HOST}-{dead.pid}-0badc0de"
    alive = tmp_path / f".ck.tmp-{_HOST}-{os.getppid()}-0badc0de"  # a live process's save: left alone
    stale.mkdir()
    alive.mkdir()
    save_checkpoint(load_checkpoint(ck), ck, max_shard_bytes=20_000)  # sharded this time: the old single file goes
    assert {p.name for p in ck.iterdir()} >= {"tokenizer.json", "generation_config.json", "extra", "config.json",
                                              "model.safetensors.index.json"}  # fmt: skip
    assert not (ck / "model.safetensors").exists() and (ck / "extra" / "notes.txt").read_text() == "kept"
    assert not stale.exists() and alive.exists()
    load_checkpoint(ck)
    caplog.clear()
    save_checkpoint(Transformer(tiny(moe_layer_freq=2)), tmp_path / "freq")
    assert "moe_layer_freq=2: dsalign reads it back, transformers' DeepseekV3 ignores it" in caplog.text
