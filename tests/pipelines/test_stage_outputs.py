"""What stages leave behind and read back: metrics across resumes, a fresh run's stage directory, rollout context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


def test_report_names_failed_reward_calls_and_all_truncated_steps(tmp_path):
    """A reward that raised (its samples scored by the error policy) and steps whose completions were all cut at
    max_new_tokens are listed: the curves alone do not show them. A clean stage adds no section."""
    grpo, clean = tmp_path / "grpo", tmp_path / "clean"
    log = MetricsLogger(grpo, "grpo", tensorboard=False)
    for step, (errors, cut, unscored) in enumerate([(4.0, 1.0, 0.0), (0.0, 0.5, 1.0), (3.0, 1.0, 0.5)], start=1):
        log.log(step, {"reward": 0.5, "reward_errors": errors, "truncated_frac": cut, "unscorable_frac": unscored})
    ok = {"reward": 0.5, "reward_errors": 0.0, "truncated_frac": 0.2}
    MetricsLogger(clean, "clean", tensorboard=False).log(1, ok)
    text = write_report(tmp_path / "out", {"grpo": grpo, "clean": clean}, [], "t").read_text()
    assert "## Rollout warnings" in text and "| grpo | 7 | 2 of 3 | 1 of 3 |" in text and "| clean |" not in text
    assert "## Rollout warnings" not in write_report(tmp_path / "out2", {"clean": clean}, [], "t").read_text()


def test_malformed_metrics_line_is_skipped_and_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n{not json\n" + json.dumps({"step": 2}) + "\n")
    problems = []
    assert [r["step"] for r in read_metrics(path, problems)] == [1, 2]
    assert len(problems) == 1 and "metrics.jsonl:2: skipped a malformed metrics line" in problems[0]


def test_a_torn_last_line_is_cut_before_a_resumed_run_appends(tmp_path):
    """A run killed mid-write leaves a line without its newline; the resumed logger must not glue its first row to
    it (the report at the end of the run read the glued line as malformed and failed)."""
    stage = tmp_path / "grpo"
    stage.mkdir()
    (stage / "metrics.jsonl").write_text(json.dumps({"stage": "grpo", "step": 1, "loss": 1.0}) + '\n{"stage": "gr')
    resumed = MetricsLogger(stage, "grpo", tensorboard=False, resumed_at=1)
    resumed.log(2, {"loss": 0.5})
    problems = []
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl", problems)] == [1, 2] and not problems
    report = write_report(tmp_path, {"grpo": stage}, [], "t")
    assert "skipped" not in report.read_text()


def test_a_stage_with_one_logged_step_is_plotted(tmp_path):
    import matplotlib.image

    stage = tmp_path / "sft"
    MetricsLogger(stage, "sft", tensorboard=False).log(1, {"loss": 2.0})
    write_report(tmp_path, {"sft": stage}, [], "t")
    pixels = matplotlib.image.imread(tmp_path / "loss.png")[..., :3]
    blue = ((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)).sum()  # matplotlib's first colour, C0
    assert blue > 100, f"the lone point is not drawn ({blue} blue pixels, the legend alone has ~50)"


def test_fresh_start_clears_only_resumable_state(tmp_path, capsys):
    stage = tmp_path / "grpo"
    (stage / "checkpoints" / "step_00000040").mkdir(parents=True)
    (stage / "tensorboard").mkdir()
    (stage / "metrics.jsonl").write_text('{"step": 40}\n')
    (stage / "data.json").write_text('{"rows": 3}\n')
    (stage / "final").mkdir()
    (stage / "final" / "config.json").write_text("{}")
    assert clear_stage_state(stage) == ["checkpoints", "metrics.jsonl", "tensorboard", "data.json"]
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


def _prompt_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_files_carry_the_length_budget_like_synthetic_prompts(tmp_path, capsys):
    from dsalign.pipelines.config import DataSource
    from dsalign.pipelines.demo_task import LENGTH_INSTRUCTION
    from dsalign.pipelines.stages import prompt_file_rows, sft_conversations

    rows = [{"prompt": "What is 2+3?", "answer": "5"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
             "answer": "2"}]  # fmt: skip
    path = _prompt_file(tmp_path / "p.jsonl", rows)
    plain = prompt_file_rows(path, 0)
    assert [r["prompt"][0]["role"] for r in plain] == ["user", "system"] and "length_target" not in plain[0]
    budget = prompt_file_rows(path, 1, budget=40)
    assert "p.jsonl: using the first 1 of 2 rows (num_rows)" in capsys.readouterr().out
    from dsalign.pipelines.stages import stage_file_rows

    rows, _ = stage_file_rows(DataSource(path=path, num_rows=5), "prompt")
    assert len(rows) == 2  # a stage asking for more rows than its file has: all of them, and said
    assert "p.jsonl: num_rows is 5 but the file has 2 usable rows; using all 2" in capsys.readouterr().out
    assert len(budget) == 1 and budget[0]["length_target"] == 40 and budget[0]["answer"] == "5"
    assert budget[0]["prompt"][0] == {"role": "system", "content": LENGTH_INSTRUCTION.format(budget=40),
                                      "reasoning_content": None}  # fmt: skip
    both = prompt_file_rows(path, 0, budget=40)[1]["prompt"][0]["content"]
    assert both == "Be brief.\n\n" + LENGTH_INSTRUCTION.format(budget=40)  # appended to the existing system turn
    convo = [{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}]
    data = DataSource(path=_prompt_file(tmp_path / "c.jsonl", convo), length_target=25)
    (row,) = sft_conversations(None, data)
    assert row["messages"][0]["content"] == LENGTH_INSTRUCTION.format(budget=25) and row["length_target"] == 25


def test_grpo_on_user_files_with_held_out_file_and_budget(tmp_path, local_ray):
    """A run on the user's own prompt files: GRPO trains on data.path with a length budget, and every evaluation
    reads eval.path (budget prompts included) instead of the synthetic task."""

    import yaml
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.demo_task import AdditionTask, make_prompts
    from dsalign.pipelines.runner import run

    task = AdditionTask()
    user = lambda rows: [{"prompt": r["prompt"][-1]["content"], "answer": r["answer"]} for r in rows]  # noqa: E731
    train = _prompt_file(tmp_path / "train.jsonl", user(make_prompts(task, 32, seed=5)))
    held = _prompt_file(tmp_path / "held.jsonl", user(make_prompts(task, 6, seed=6)))
    tiny = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    grpo = tiny["stages"][1]
    grpo.update(model={"preset": "tiny"}, data={"path": train, "length_target": 12}, checkpoint_every=100)
    grpo["grpo"].update(iterations=2)
    grpo["rewards"].append({"fn": "target_length", "weight": 0.1})
    data = {**tiny, "stages": [grpo], "output_dir": str(tmp_path / "out"),
            "eval": {**tiny["eval"], "path": held, "num_prompts": 4, "samples_per_prompt": 2}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    state = run(load_config(tmp_path / "run.yaml"))
    assert [e["stage"] for e in state.evals] == ["untrained", "grpo", "grpo (budget prompts)"]
    assert all(len(per) == 4 for per in state.per_prompt.values())  # the file's first 4 rows, not 200 synthetic
    assert state.evals[-1]["length_target"] == 12.0
    rows = [json.loads(line) for line in (tmp_path / "out" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward" in r for r in rows)


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from dsalign.pipelines.demo_task import AdditionTask, corpus_for_tokenizer
    from dsalign.pipelines.demo_tokenizer import train_tokenizer
    from dsalign.pipelines.stages import load_tokenizer

    tok = train_tokenizer(corpus_for_tokenizer(AdditionTask()))
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_resume_reports_what_changed_in_the_config():
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.runner import config_changes
    from dsalign.pipelines.schema import to_dict

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    before = to_dict(load_config(tiny))
    after = to_dict(load_config(tiny, ["stages.grpo.grpo.iterations=5", "eval.path=held.jsonl"]))
    assert config_changes(before, after) == ["stages[1].grpo.iterations: 2 -> 5", "eval.path: None -> 'held.jsonl'"]
    assert config_changes(before, before) == []
    fewer = {**after, "stages": after["stages"][1:]}  # sft removed: stages are matched by name, not position
    assert config_changes(before, fewer) == ["stages[0].grpo.iterations: 2 -> 5", "stages: stage 'sft' removed",
                                             "eval.path: None -> 'held.jsonl'"]  # fmt: skip
    assert config_changes(fewer, after) == ["stages[0]: new stage 'sft'"]


def test_stage_device_and_batches_follow_the_model():
    from dsalign.alignment.packing import pack_examples
    from dsalign.alignment.trainer.step import to_device
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.stages import stage_device

    tiny = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert stage_device(tiny.stages[0]) == torch.device("cpu")
    tiny.stages[0].resources.gpus_per_worker = 1.0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="reserves gpus_per_worker=1.0 but torch sees no CUDA device"):
            stage_device(tiny.stages[0])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is not changed
    packed = pack_examples([{"input_ids": [1, 2], "labels": [1, 2]}], max_length=4)
    assert to_device(packed, torch.device("meta")).input_ids.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sft_stage_trains_on_the_workers_gpu(tmp_path, local_ray):
    """gpus_per_worker > 0: the stage's model, batches and evaluation live on the worker's GPU."""
    import yaml
    from dsalign.model import load_checkpoint
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.runner import run

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    data["stages"] = data["stages"][:1]
    data["stages"][0]["resources"] = {"gpus_per_worker": 1.0}
    data["output_dir"] = str(tmp_path / "gpu")
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(data))
    state = run(load_config(tmp_path / "gpu.yaml"))
    rows = [json.loads(line) for line in (tmp_path / "gpu" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert load_checkpoint(state.finished["sft"]) is not None


def test_evaluation_scores_with_the_configured_reward(tmp_path, capsys):
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.demo_task import corpus_for_tokenizer
    from dsalign.pipelines.demo_tokenizer import train_tokenizer
    from dsalign.pipelines.preflight import preflight
    from dsalign.pipelines.stages import evaluate, held_out_prompts, load_source

    held = _prompt_file(tmp_path / "held.jsonl", [{"prompt": f"What is {i}+1?", "id": f"q{i}"} for i in range(3)])
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    custom = tmp_path / "my_reward.py"
    custom.write_text("def one_per_token(completions, completion_ids, **kw):\n"
                      "    return [float(len(ids)) for ids in completion_ids]\n")  # fmt: skip
    base = [f"output_dir={tmp_path / 'out'}", f"eval.path={held}", "eval.samples_per_prompt=2"]
    run = load_config(tiny, [*base, f"eval.reward.fn={custom}:one_per_token"])
    preflight(run)  # no 'answer' needed: the reward does not read one
    tok = train_tokenizer(corpus_for_tokenizer(run.task))
    torch.manual_seed(0)
    out = evaluate(load_source({"preset": "tiny"}, tok).eval(), tok, run, held_out_prompts(run))
    assert out["accuracy"] == out["mean_length"] > 0 and len(out["per_prompt"]) == 3
    # a failed sample counts as 0 and is reported; a reward that fails on every sample is an error, not accuracy 0
    custom.write_text(custom.read_text() + "def picky(prompts, completions, **kw):\n"
                      "    if any('0+1' in str(p) for p in prompts):\n        raise ValueError('no zeros')\n"
                      "    return [1.0] * len(completions)\n"
                      "def broken(prompts, completions, **kw):\n    raise KeyError('answer')\n"
                      "def some_none(prompts, completions, **kw):\n"
                      "    return [None if '1+1' in str(p) else 1.0 for p in prompts]\n"
                      "def all_none(prompts, completions, **kw):\n    return [None] * len(prompts)\n")  # fmt: skip
    model = load_source({"preset": "tiny"}, tok).eval()
    out = evaluate(model, tok, load_config(tiny, [*base, f"eval.reward.fn={custom}:picky"]), held_out_prompts(run))
    assert out["per_prompt"] == [0.0, 1.0, 1.0]
    assert "picky' failed on 2 of 6 samples (counted as 0); first: " in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"eval reward '.*:broken' scored none of the 6 samples.*KeyError"):
        evaluate(model, tok, load_config(tiny, [*base, f"eval.reward.fn={custom}:broken"]), held_out_prompts(run))
    # "not applicable" (None) also counts as 0, said so; None on every sample is an error like failing on every one
    out = evaluate(model, tok, load_config(tiny, [*base, f"eval.reward.fn={custom}:some_none"]), held_out_prompts(run))
    assert out["per_prompt"] == [1.0, 0.0, 1.0]
    assert "some_none' returned None (not applicable) on 2 of 6 samples (counted as 0)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"all_none' scored none of the 6 samples.*returned None .* on every one"):
        evaluate(model, tok, load_config(tiny, [*base, f"eval.reward.fn={custom}:all_none"]), held_out_prompts(run))
    with pytest.raises(Exception, match="eval.reward.fn 'nope_pkg:fn': RewardLoadError: .*No module named 'nope_pkg'"):
        preflight(load_config(tiny, [*base, "eval.reward.fn=nope_pkg:fn"]))


def test_conversation_without_assistant_tokens_inside_max_length(tmp_path):
    """A conversation whose prompt alone fills sft.max_length has nothing to learn from: without skip_invalid the
    stage fails with a data error naming the row (not retried: the same row fails again); with it, the row is
    dropped and counted in data.json (it failed the stage either way)."""
    from dsalign.alignment.data import DataError
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.demo_tokenizer import task_tokenizer
    from dsalign.pipelines.stages import StageEnv, run_sft

    short = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    long = [{"role": "user", "content": " ".join(["1+1+1"] * 60)}, {"role": "assistant", "content": "4"}]
    data = _prompt_file(tmp_path / "sft.jsonl", [{"messages": short}, {"messages": long}, {"messages": short}])
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    for skip in (False, True):
        out = tmp_path / f"out{skip}"
        run = load_config(tiny, [f"output_dir={out}", f"stages.sft.data={{path: {data}, skip_invalid: {skip}}}",
                                 "stages.sft.sft.steps=1", "stages.sft.sft.batch_size=2",
                                 "stages.sft.sft.max_length=40"])  # fmt: skip
        env = StageEnv(run=run, stage=run.stages[0], out_dir=out / "sft", tokenizer=task_tokenizer(run.task),
                       sources={"model": {"preset": "tiny"}}, resume=False)  # fmt: skip
        env.out_dir.mkdir(parents=True)
        if not skip:
            with pytest.raises(DataError, match=r"sft\.jsonl: row 2 .*no assistant token left after truncation to 40 "
                                                r"tokens; set the stage's data.skip_invalid"):
                run_sft(env)
            continue
        run_sft(env)
        summary = json.loads((env.out_dir / "data.json").read_text())
        assert summary["rows"] == 2 and summary["skipped_invalid"] == 1
        assert "1 conversations with no assistant token within sft.max_length=40" in summary["problems"][-1]


def test_skipped_rows_are_counted_in_the_stage_and_the_report(tmp_path):
    """``data.skip_invalid: true`` drops malformed rows; the stage writes how many (and the first problems) to its
    ``data.json`` and the run's report lists them, so a dropped row is never silent."""
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.demo_tokenizer import task_tokenizer
    from dsalign.pipelines.stages import StageEnv, run_sft

    convo = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    data = _prompt_file(tmp_path / "sft.jsonl", [{"messages": convo}, {"messages": []}, {"messages": convo},
                                                 {"text": "no messages"}])  # fmt: skip
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    run = load_config(tiny, [f"output_dir={tmp_path / 'out'}", f"stages.sft.data={{path: {data}, skip_invalid: true}}",
                             "stages.sft.sft.steps=1", "stages.sft.sft.batch_size=2"])  # fmt: skip
    stage = run.stages[0]
    env = StageEnv(run=run, stage=stage, out_dir=tmp_path / "out" / "sft", tokenizer=task_tokenizer(run.task),
                   sources={"model": {"preset": "tiny"}}, resume=False)  # fmt: skip
    env.out_dir.mkdir(parents=True)
    run_sft(env)
    summary = json.loads((env.out_dir / "data.json").read_text())
    assert summary["source"] == data and summary["rows"] == 2 and summary["skipped_invalid"] == 2
    assert "sft.jsonl: line 2: field 'messages'" in summary["problems"][0]
    text = write_report(tmp_path / "out", {"sft": env.out_dir}, [], "t").read_text()
    assert f"| sft | {data} | 2 | 2 |" in text and "- sft: " in text


def test_a_stage_output_keeps_its_sources_end_of_turn_stop_and_texts_drop_it(tmp_path):
    """A model loaded from a checkpoint whose generation_config.json lists an end-of-turn id besides EOS stops at it
    (``load_checkpoint``); the stage's export wrote the tokenizer's EOS alone, so the next stage, the evaluation and
    transformers ran past it again. Completion texts drop whichever stop token ended a sample."""
    from types import SimpleNamespace

    from dsalign.alignment.trainer import LocalRunner, TrainerConfig
    from dsalign.model import ModelConfig, Transformer, load_checkpoint
    from dsalign.pipelines.demo_task import AdditionTask, corpus_for_tokenizer
    from dsalign.pipelines.demo_tokenizer import train_tokenizer
    from dsalign.pipelines.stages import completion_texts, padded_vocab, save_hf

    tok = train_tokenizer(corpus_for_tokenizer(AdditionTask()))
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=padded_vocab(tok), eos_token_id=tok.eos_token_id))
    turn_end = tok.convert_tokens_to_ids("</think>")
    model.generation_eos_token_ids = frozenset({tok.eos_token_id, turn_end})
    save_hf(LocalRunner(model, TrainerConfig()), tmp_path / "final", tok)
    gen = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, turn_end]
    assert load_checkpoint(tmp_path / "final").generation_eos_token_ids == {tok.eos_token_id, turn_end}
    ids = tok.encode("12", add_special_tokens=False)
    ended = [SimpleNamespace(token_ids=[*ids, turn_end], finish_reason="stop", stop_reason=turn_end),
             SimpleNamespace(token_ids=[*ids, turn_end], finish_reason="length", stop_reason=None)]  # fmt: skip
    texts = completion_texts(tok, ended)
    assert texts[0] == tok.decode(ids) and texts[1].endswith("</think>")
