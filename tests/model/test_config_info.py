"""Config round trip and validation; acceptance 6: ``dsalign model info`` on v3-671b; streaming load memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from dsalign.model import ModelConfig
from dsalign.model.info import summarize, totals

OFFICIAL_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_official_config_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_V3_CONFIG))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_scaling["factor"] == 40 and cfg.quantization_config["weight_block_size"] == [128, 128]
    assert cfg.softmax_scale == pytest.approx(0.1352338, rel=1e-6)  # docs/SPEC.md: 192^-0.5 * (0.1 ln 40 + 1)^2
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg
    hf = cfg.to_hf()
    for key in ("rope_scaling", "quantization_config", "num_nextn_predict_layers", "q_lora_rank"):
        assert hf[key] == OFFICIAL_V3_CONFIG[key]


def test_v5_rope_parameters_and_null_q_lora():
    raw = dict(OFFICIAL_V3_CONFIG, q_lora_rank=None)
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        **{k: v for k, v in scaling.items() if k != "type"},
    }
    cfg = ModelConfig.from_hf(raw)
    assert cfg.q_lora_rank is None and cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.to_hf()["q_lora_rank"] is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_group": 7}, "divisible by n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"qk_rope_head_dim": 63}, "even"),
        ({"rope_scaling": {"type": "yarn"}}, "factor"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
    ],
)
def test_inconsistent_values_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(dict(OFFICIAL_V3_CONFIG, **change))


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(OFFICIAL_V3_CONFIG, hiden_size=12)))
    with pytest.raises(ValueError, match=r"config.json: unknown config keys \['hiden_size'\]"):
        ModelConfig.from_hf(tmp_path)


def test_presets_exist_and_bench_is_exact():
    bench = ModelConfig.preset("bench")
    assert (bench.vocab_size, bench.hidden_size, bench.intermediate_size, bench.moe_intermediate_size) == (
        32000,
        512,
        1536,
        256,
    )
    assert (bench.num_hidden_layers, bench.first_k_dense_replace, bench.n_routed_experts, bench.n_shared_experts) == (
        8,
        1,
        32,
        1,
    )
    assert (bench.num_experts_per_tok, bench.n_group, bench.topk_group, bench.num_attention_heads) == (4, 4, 2, 8)
    assert (bench.q_lora_rank, bench.kv_lora_rank, bench.qk_rope_head_dim, bench.qk_nope_head_dim) == (192, 128, 32, 64)
    assert (bench.v_head_dim, bench.tie_word_embeddings, bench.num_nextn_predict_layers) == (64, False, 1)
    small_total, _ = totals(summarize(ModelConfig.preset("small")))
    assert 1e6 < small_total < 1e7  # "a few million parameters"


def test_model_info_cli_reports_671b_and_37b():
    out = subprocess.run(
        [sys.executable, "-m", "dsalign.pipelines.cli", "model", "info", "--preset", "v3-671b"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    total, active = (float(v) for v in re.search(r"main model total\s+([\d.]+)B\s+([\d.]+)B", out).groups())
    assert abs(total - 671.0) / 671.0 <= 0.005
    assert abs(active - 37.0) / 37.0 <= 0.02
    mtp_total = float(re.search(r"MTP modules total\s+([\d.]+)B", out).group(1))
    assert 11.0 < mtp_total < 12.0  # 11.5B unique MTP parameters per the report


def test_model_info_counts_the_mtp_a_checkpoint_has(tmp_path, capsys, caplog):
    """transformers' save_pretrained keeps num_nextn_predict_layers in config.json but drops the MTP weights:
    `model info` counts what load_checkpoint builds (no MTP) and says why, instead of MTP parameters that are not
    there; a config.json alone is still read as declared."""
    import shutil

    from dsalign.pipelines.cli import main

    from .conftest import hf_reference, tiny

    hf_reference(tiny()).save_pretrained(tmp_path / "hf")
    assert main(["model", "info", "--checkpoint", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "declares 1 MTP layer(s) but the weights have none" in out and "MTP modules: none" in out
    assert "MTP" not in caplog.text  # said once, in the title (the loader's own warning is not repeated)
    (tmp_path / "cfg").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "cfg")
    assert main(["model", "info", "--checkpoint", str(tmp_path / "cfg")]) == 0
    assert "MTP modules total" in capsys.readouterr().out


def test_streaming_load_peak_memory_is_about_one_model(tmp_path):
    """Load in a fresh process and compare peak RSS growth with the model's size: two copies would be >= 2x."""
    script = textwrap.dedent(
        f"""
        import gc, torch
        from dsalign.model import ModelConfig, Transformer, save_checkpoint, load_checkpoint
        cfg = ModelConfig.preset("bench").replace(num_hidden_layers=3, vocab_size=8000)
        save_checkpoint(Transformer(cfg), {str(tmp_path / "ck")!r}, max_shard_bytes=20_000_000)
        gc.collect()
        def status(key):
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: the peak below is the load's alone
        base = status("VmRSS")
        m = load_checkpoint({str(tmp_path / "ck")!r})
        nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
        print(nbytes, base, status("VmHWM"))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    nbytes, base, peak = (int(v) for v in out.stdout.split()[-3:])
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork (the pytest process is often
    # over 1 GB by now), which once failed this test with a "peak" of 1.4 GB for a 212 MB load.
    assert peak - base < 1.75 * nbytes, (nbytes, base, peak)
