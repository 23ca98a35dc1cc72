"""What stages leave behind and read back: metrics across resumes, a fresh run's stage directory, rollout context."""

from __future__ import annotations

import json

import pytest
from dsalign.pipelines.report import MetricsLogger, latest_per_step, read_metrics, write_report
from dsalign.pipelines.runner import clear_stage_state


def test_resumed_steps_plot_the_run_that_went_on(tmp_path):
    stage = tmp_path / "sft"
    first = MetricsLogger(stage, "sft", tensorboard=False)
    for step in (1, 2, 3, 4):  # checkpoint at 2, crash after 4
        first.log(step, {"loss": 10.0 - step})
    resumed = MetricsLogger(stage, "sft", tensorboard=False, resumed_at=2)
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 100.0 + step})
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4, 5]  # the file keeps everything that happened
    kept = latest_per_step(rows)
    assert [(r["step"], r["loss"]) for r in kept] == [(1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    report = write_report(tmp_path, {"sft": stage}, [], "t")
    assert (tmp_path / "loss.png").is_file() and "loss" in report.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_fresh_start_clears_only_resumable_state(tmp_path, capsys):
    stage = tmp_path / "grpo"
    (stage / "checkpoints" / "step_00000040").mkdir(parents=True)
    (stage / "tensorboard").mkdir()
    (stage / "metrics.jsonl").write_text('{"step": 40}\n')
    (stage / "final").mkdir()
    (stage / "final" / "config.json").write_text("{}")
    assert clear_stage_state(stage) == ["checkpoints", "metrics.jsonl", "tensorboard"]
    assert sorted(p.name for p in stage.iterdir()) == ["final"]  # the exported model stays until replaced
    assert "fresh start, removed checkpoints, metrics.jsonl, tensorboard" in capsys.readouterr().out
    assert clear_stage_state(stage) == [] and clear_stage_state(tmp_path / "missing") == []


def test_stage_rollouts_reach_the_model_context():
    """The stages' engines decode up to the model's whole context; they used to stop every completion at 256 tokens
    of prompt + completion whatever ``max_new_tokens`` asked for (finish reason 'length', silently)."""
    import torch
    from dsalign.alignment.sampling_params import SamplingParams
    from dsalign.model import ModelConfig, Transformer
    from dsalign.pipelines.stages import rollout_engine

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    engine = rollout_engine(model, None, slots=2)
    assert engine.max_len == model.cfg.max_position_embeddings
    prompt = list(range(3, 43))  # 40 tokens
    (long,) = engine.generate([prompt], [SamplingParams(max_new_tokens=300, ignore_eos=True, seed=0)])
    assert len(long.token_ids) == 300 and long.finish_reason == "length"
    near = model.cfg.max_position_embeddings - len(prompt)
    (capped,) = engine.generate([prompt], [SamplingParams(max_new_tokens=near + 50, ignore_eos=True, seed=0)])
    assert len(capped.token_ids) == near  # the context, not a fixed cap, is the limit
