"""Run configs: strict schema, overrides, and preflight failures before any actor starts (issue 8, acceptance 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dsalign.pipelines.config import load_config
from dsalign.pipelines.preflight import PreflightError, preflight
from dsalign.pipelines.schema import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path) -> dict:
    data = yaml.safe_load(DEMO.read_text())
    data["output_dir"] = str(tmp_path / "out")
    return data


def test_demo_config_loads_and_overrides_apply(tmp_path):
    cfg = load_config(DEMO, ["stages.grpo.grpo.iterations=3", "stages.0.sft.optim.lr=0.01", "eval.num_prompts=7",
                             "stages.grpo.grpo.optim.lr=2e-5"])  # fmt: skip
    assert [s.kind for s in cfg.stages] == ["sft", "grpo", "distill", "grpo"]
    assert cfg.stages[1].grpo.iterations == 3 and cfg.stages[0].sft.optim.lr == 0.01 and cfg.eval.num_prompts == 7
    assert cfg.stages[1].grpo.optim.lr == 2e-5
    assert cfg.stages[2].distill.teacher.from_stage == "grpo"


def test_typo_key_names_path_and_valid_keys(tmp_path):
    data = _base(tmp_path)
    data["stages"][1]["grpo"]["itertions"] = 5
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grpo: unknown key 'itertions' in GRPOParams; valid keys: \["):
        load_config(_write(tmp_path, data))


def test_wrong_type_names_path(tmp_path):
    data = _base(tmp_path)
    data["stages"][0]["sft"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"stages\[0\]\.sft\.steps: expected an integer, got str 'many'"):
        load_config(_write(tmp_path, data))


def test_from_stage_must_be_earlier(tmp_path):
    data = _base(tmp_path)
    data["stages"][0]["model"] = {"from_stage": "grpo"}
    with pytest.raises(ConfigError, match="from_stage 'grpo' is not an earlier stage"):
        load_config(_write(tmp_path, data))


def test_preflight_reports_missing_data_and_unimportable_reward(tmp_path):
    data = _base(tmp_path)
    data["stages"][1]["data"] = {"path": str(tmp_path / "nope.jsonl")}
    data["stages"][1]["rewards"].append({"fn": "no_such_pkg.mod:fn"})
    (tmp_path / "bad_reward.py").write_text("raise RuntimeError('broken at import')\n")
    data["stages"][3]["rewards"].append({"fn": f"{tmp_path / 'bad_reward.py'}:fn"})
    data["stages"][3]["rewards"].append({"fn": "math_accuracy", "params": {"nonexistent_param": 1}})
    cfg = load_config(_write(tmp_path, data))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    text = str(err.value)
    assert "stages[1] (grpo).data.path" in text and "nope.jsonl does not exist" in text
    assert "stages[1] (grpo).rewards[2].fn 'no_such_pkg.mod:fn'" in text
    assert "broken at import" in text
    assert "nonexistent_param" in text
    assert len(err.value.problems) == 4


def test_preflight_checks_checkpoint_dirs(tmp_path):
    data = _base(tmp_path)
    data["stages"][0]["model"] = {"checkpoint": str(tmp_path / "missing_ckpt")}
    with pytest.raises(PreflightError, match="missing_ckpt has no config.json"):
        preflight(load_config(_write(tmp_path, data)))
    preflight(load_config(DEMO, [f"output_dir={tmp_path / 'ok'}"]))  # the demo itself passes
