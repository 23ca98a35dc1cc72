"""The driver's bookkeeping across runs and resumes, with Ray and the stage actors replaced by stand-ins: which
checkpoints a stage resumes from, which model each evaluation row measures, and what ``--resume`` keeps."""

import json

import pytest
from dsalign.alignment.trainer import latest_checkpoint
from dsalign.pipelines import actors, runner
from dsalign.pipelines.config import config_from_data
from dsalign.pipelines.errors import StageFailed


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def options(self, **kwargs):
        return self


class _FakeRay:
    import ray.exceptions as exceptions

    @staticmethod
    def get(x):
        return x


@pytest.fixture
def driver(monkeypatch):
    """Stages 'train' instantly (writing a checkpoint tagged with the run that wrote it, resuming from the latest
    one like the real stage loop); an evaluation's accuracy is a function of the source it measured."""
    calls = {"stages": [], "evals": [], "tag": None, "crash_in": None, "eval_error": None, "reports": []}

    def run_stage(cfg, stage, sources, tokenizer_dir, resume, attempt):
        root = cfg.stage_dir(stage) / "checkpoints"
        start = latest_checkpoint(root) if resume else None
        origin = json.loads((start / "trainer_state.json").read_text())["written_by"] if start else None
        calls["stages"].append((stage.name, resume, origin))
        if stage.name == calls["crash_in"]:
            raise StageFailed("interrupted")
        ckpt = root / "step_00000004"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "written_by": calls["tag"]}))
        (cfg.stage_dir(stage) / "final").mkdir(exist_ok=True)
        return str(cfg.stage_dir(stage) / "final")

    def evaluate_source(run_cfg, source, tokenizer_dir, length_target=None):
        key = json.dumps(source, sort_keys=True)
        calls["evals"].append(key)
        if calls["eval_error"] is not None and calls.get("eval_fail_on", "") in key:
            raise calls["eval_error"]
        acc = (sum(map(ord, key)) % 997) / 997
        return {"accuracy": acc, "format": 1.0, "mean_length": 10.0, "per_prompt": [acc] * 4}

    monkeypatch.setattr(runner, "preflight", lambda cfg, finished=None: None)
    monkeypatch.setattr(runner, "init_ray", lambda cfg: _FakeRay)
    monkeypatch.setattr(runner, "write_report", lambda out, dirs, rows, title: calls["reports"].append(title) or (
        out / "report.md"))  # fmt: skip
    monkeypatch.setattr(actors, "prepare_tokenizer", _Remote(lambda cfg: "tok"))
    monkeypatch.setattr(actors, "evaluate_source", _Remote(evaluate_source))
    monkeypatch.setattr(actors, "run_stage", run_stage)
    return calls


def _stage(name, model, kind="sft", **extra):
    return {"name": name, "kind": kind, "model": model, "retries": 0,
            "data": {"synthetic": "addition", "num_rows": 8}, **extra}  # fmt: skip


def test_resume_never_continues_a_stage_from_an_earlier_runs_checkpoints(driver, tmp_path):
    """Run A finishes; run B (same output_dir) is interrupted in its first stage; B's --resume must start B's
    second stage afresh, not from the checkpoint run A left in that stage's directory."""
    stages = [_stage("one", {"preset": "tiny"}), _stage("two", {"from_stage": "one"})]
    cfg = config_from_data({"name": "r", "output_dir": str(tmp_path), "eval": {"enabled": False}, "stages": stages})
    driver["tag"] = "A"
    runner.run(cfg, progress=False)
    driver.update(tag="B", crash_in="one", stages=[])
    with pytest.raises(StageFailed):
        runner.run(cfg, progress=False)
    driver.update(crash_in=None, stages=[])
    runner.run(cfg, resume=True, progress=False)
    # stage one resumes (B started it); stage two starts from nothing, A's checkpoint was cleared
    assert driver["stages"] == [("one", True, None), ("two", False, None)]
    assert json.loads((tmp_path / "run_state.json").read_text())["started"] == ["one", "two"]


def test_two_sources_sharing_a_name_get_their_own_evaluation_rows(driver, tmp_path):
    grpo = {"kind": "grpo", "rewards": [{"fn": "math_accuracy"}]}
    stages = [
        _stage("sft", {"preset": "tiny"}),
        _stage("small", {"preset": "tiny", "overrides": {"num_hidden_layers": 1}}, **grpo),
        _stage("big", {"preset": "tiny", "overrides": {"num_hidden_layers": 3}}, **grpo),
    ]
    state = runner.run(config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages}),
                       progress=False)  # fmt: skip
    assert list(state.per_prompt) == ["untrained", "sft", "start (tiny)", "small", "start (tiny) #2", "big"]
    assert sum('"num_hidden_layers": 3' in key for key in driver["evals"]) == 1  # big's start was evaluated
    rows = {row["stage"]: row for row in state.evals}
    assert rows["big"]["vs"].endswith("vs start (tiny) #2")


def test_resume_drops_only_the_rerun_stages_own_rows_and_says_what_it_skips(driver, tmp_path, capsys):
    stages = [_stage("s", {"preset": "small"}), _stage("grpo", {"from_stage": "s"}),
              _stage("grpo2", {"from_stage": "grpo"})]  # fmt: skip
    cfg = config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages})
    runner.run(cfg, progress=False)
    (tmp_path / "s" / "final").rmdir()  # its output is gone: it runs (and is evaluated) again
    changed = config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages})
    changed.stages[1].data.num_rows = 16
    capsys.readouterr()
    state = runner.run(changed, resume=True, progress=False)
    assert sorted(state.per_prompt) == ["grpo", "grpo2", "s", "untrained"]  # "grpo2" kept, though it starts with "s"
    out = capsys.readouterr().out
    assert "stage grpo: finished earlier" in out and "stages[1].data.num_rows: 8 -> 16" in out
    resolved = json.loads((tmp_path / "config.resolved.json").read_text())
    assert resolved["stages"][1]["data"]["num_rows"] == 8  # what the finished stage ran with, not the ignored 16
    capsys.readouterr()
    runner.run(cfg, resume=True, progress=False)  # the original config again: nothing reads as changed
    assert "changed config" not in capsys.readouterr().out


def test_resume_keeps_the_runs_eval_settings_and_says_so(driver, tmp_path, capsys):
    """A finished run's table was made with its eval settings; resuming with other eval keys used to print the new
    settings above the old rows (and would have mixed the two in one table): the earlier settings stay, named."""
    stages = [_stage("one", {"preset": "tiny"}), _stage("two", {"from_stage": "one"})]
    data = {"name": "r", "output_dir": str(tmp_path), "eval": {"samples_per_prompt": 2}, "stages": stages}
    driver["crash_in"] = "two"
    with pytest.raises(StageFailed):
        runner.run(config_from_data(data), progress=False)
    driver["crash_in"] = None
    capsys.readouterr()
    state = runner.run(config_from_data({**data, "eval": {"samples_per_prompt": 3}}), resume=True, progress=False)
    out = capsys.readouterr().out
    assert "eval.samples_per_prompt: 2 -> 3 do not apply" in out
    assert "x 2 samples" in out and "x 3 samples" not in out  # the table's header
    assert [row["stage"] for row in state.evals] == ["untrained", "one", "two"]
    assert json.loads((tmp_path / "config.resolved.json").read_text())["eval"]["samples_per_prompt"] == 2


def test_resume_of_a_run_that_never_ran_says_it_starts_afresh(driver, tmp_path, capsys):
    stages = [_stage("one", {"preset": "tiny"})]
    cfg = config_from_data({"name": "r", "output_dir": str(tmp_path / "new"), "eval": {"enabled": False},
                            "stages": stages})  # fmt: skip
    runner.run(cfg, resume=True, progress=False)
    assert "holds no earlier run of this config (no run_state.json); starting afresh" in capsys.readouterr().out


def test_a_hand_damaged_run_state_is_named(tmp_path):
    path = tmp_path / "run_state.json"
    path.write_text("")
    with pytest.raises(ValueError, match=r"run_state.json: cannot resume from this run state"):
        runner.RunState.load(path)


def test_the_demo_tokenizer_is_retrained_when_the_task_changes(tmp_path):
    from dsalign.pipelines.demo_tokenizer import task_tokenizer
    from dsalign.pipelines.schema import to_dict
    from dsalign.pipelines.stages import load_tokenizer

    stages = [_stage("one", {"preset": "tiny"})]
    cfg = config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages,
                            "task": {"min_terms": 3, "max_terms": 3, "max_value": 9, "slip_rate": 0.1}})  # fmt: skip
    first = actors.demo_tokenizer_dir(to_dict(cfg))
    mtime = (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert actors.demo_tokenizer_dir(to_dict(cfg)) == first  # same task: reused as is
    assert (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == mtime
    before = task_tokenizer(cfg.task).get_vocab()
    cfg.task.max_value, cfg.task.max_terms = 99, 4
    assert task_tokenizer(cfg.task).get_vocab() != before  # the task decides the vocabulary
    assert actors.demo_tokenizer_dir(to_dict(cfg)) == first
    assert load_tokenizer(first).get_vocab() == task_tokenizer(cfg.task).get_vocab()  # what preflight checks against
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_a_failed_evaluation_stops_the_run_with_a_report(driver, tmp_path):
    """An evaluation that raised (e.g. eval.reward needs a column the prompts lack) used to end the run with Ray's
    raw traceback and no report; now it is a StageFailed naming the evaluation and the error, with a partial
    report, like a failed stage."""
    import ray.exceptions

    stages = [_stage("one", {"preset": "tiny"})]
    driver["eval_error"] = ray.exceptions.RayTaskError("evaluate_source", "Traceback ...", KeyError("difficulty"))
    with pytest.raises(StageFailed, match=r"evaluation of 'untrained' failed: KeyError: 'difficulty'"):
        runner.run(config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages}), progress=False)
    assert driver["reports"] == ["dsalign run r (stopped: evaluation of 'untrained' failed: KeyError: 'difficulty')"]


def test_an_evaluation_that_failed_after_its_stage_runs_on_resume(driver, tmp_path):
    """The stage finished, its evaluation failed (or was killed): --resume skips the finished stage, and used to
    skip its evaluation too, so its row was missing from the table for good. Ray's crash errors (a killed worker,
    out of memory) stop the run with a report as a raised error does."""
    import ray.exceptions

    stages = [_stage("one", {"preset": "tiny"}), _stage("two", {"from_stage": "one"})]
    cfg = config_from_data({"name": "r", "output_dir": str(tmp_path), "stages": stages})
    driver.update(eval_error=ray.exceptions.WorkerCrashedError(), eval_fail_on="one/final")
    with pytest.raises(StageFailed, match=r"evaluation of 'one' failed: "):
        runner.run(cfg, progress=False)
    assert driver["reports"][-1].startswith("dsalign run r (stopped: evaluation of 'one' failed")
    driver.update(eval_error=None)
    state = runner.run(cfg, resume=True, progress=False)
    assert [row["stage"] for row in state.evals] == ["untrained", "one", "two"]
    assert [s for s, *_ in driver["stages"]] == ["one", "two"]  # stage one was not trained again
