"""``distill.mode: on_policy`` as a stage: the student samples, the teacher scores its tokens, the student updates.

That the losses pull the student toward the teacher is tested on fixed batches in
``tests/alignment/test_distill_length.py``; at the demo's scale (docs/ALGORITHMS.md) it takes the SFT model to the
GRPO teacher's accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dsalign.model import load_checkpoint, save_checkpoint
from dsalign.pipelines.config import load_config
from dsalign.pipelines.demo_tokenizer import task_tokenizer
from dsalign.pipelines.stages import StageEnv, load_source, run_distill

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A ``tiny`` teacher with a sharp next-token distribution (its head scaled up), far from the student's."""
    tok = task_tokenizer(load_config(TINY).task)
    model = load_source({"preset": "tiny"}, tok, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("teacher") / "t")), tok


def _run_distill_stage(tmp_path: Path, run, tok, teacher_path: str):
    """configs/tiny.yaml's distill stage in-process: a 2-layer ``tiny`` student, the given teacher checkpoint."""
    stage = next(s for s in run.stages if s.name == "distill")
    env = StageEnv(run=run, stage=stage, out_dir=tmp_path / "distill", tokenizer=tok, resume=False,
                   sources={"model": {"preset": "tiny", "overrides": {"num_hidden_layers": 2}},
                            "teacher": {"checkpoint": teacher_path}})  # fmt: skip
    env.out_dir.mkdir(parents=True)
    return run_distill(env), env


@pytest.mark.parametrize("loss, temperature", [
    ("sampled_reverse_kl", 1.0), ("topk_reverse_kl", 1.0),
    ("sampled_reverse_kl", 0.7),  # the update scores at the sampling temperature, so the ratio stays 1
])  # fmt: skip
def test_on_policy_distillation_stage(tmp_path, teacher, loss, temperature):
    path, tok = teacher
    d = "stages.distill.distill"
    run = load_config(TINY, [f"output_dir={tmp_path}", f"{d}.mode=on_policy", f"{d}.on_policy.steps=3",
                             f"{d}.on_policy.prompts_per_step=4", f"{d}.on_policy.max_new_tokens=12",
                             f"{d}.on_policy.loss={loss}", f"{d}.on_policy.top_k=8", f"{d}.on_policy.optim.lr=0.01",
                             f"{d}.on_policy.optim.warmup_steps=0",
                             f"{d}.on_policy.temperature={temperature}"])  # fmt: skip
    final, env = _run_distill_stage(tmp_path, run, tok, path)
    log = [json.loads(line) for line in (env.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # the estimate of KL(student || teacher) on the student's samples: far apart (the teacher is sharp)
    assert all(r["reverse_kl"] > 1.0 for r in log)
    if loss == "sampled_reverse_kl":  # the update scores the rollout's own tokens: on-policy ratio 1
        assert all(abs(r["ratio_mean"] - 1.0) < 1e-5 for r in log)
    else:
        assert all(r["distill_kl"] > 0 for r in log)
    assert all(0 <= r["reward/think_format"] <= 1 for r in log)  # the stage's rewards, on the student's samples
    assert not (env.out_dir / "distill_sft.jsonl").exists()  # no teacher traces in this mode
    student = load_checkpoint(final)
    initial = load_source({"preset": "tiny", "overrides": {"num_hidden_layers": 2}}, tok, run.seed)
    assert student.cfg.num_hidden_layers == 2
    assert not torch.equal(student.lm_head.weight, initial.lm_head.weight)  # the student trained


def test_trace_distillation_on_a_prompt_file_without_answers(tmp_path, teacher):
    """``distill.mode: traces`` on the user's own prompt file: rewards that need no gold answer (``think_format``)
    filter the teacher's traces; the file needs no ``answer`` column (the trace rows carry None)."""
    path, tok = teacher
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in ("rivers", "stones", "clouds", "owls")))  # fmt: skip
    d = "stages.distill"
    run = load_config(TINY, [f"output_dir={tmp_path}", f"{d}.data={{path: {prompts}}}", f"{d}.distill.sft.steps=1"])
    final, env = _run_distill_stage(tmp_path, run, tok, path)
    rows = [json.loads(line) for line in (env.out_dir / "distill_sft.jsonl").read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in rows) == [f"prompts.jsonl:{i}" for i in range(1, 5)]  # one trace each
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert load_checkpoint(final).cfg.num_hidden_layers == 2
