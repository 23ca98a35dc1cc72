"""Acceptance 1 and 4: exact resume after a real kill; an interrupted checkpoint write leaves the previous one."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from dsalign.alignment.trainer import (
    LocalRunner,
    TrainerConfig,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    prepare_model,
    save_training_checkpoint,
)
from dsalign.alignment.trainer import checkpoint as ckpt_mod
from dsalign.model import ModelConfig, Transformer

WORKER = os.path.join(os.path.dirname(__file__), "_resume_worker.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=300)


def _losses(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    straight = _run(str(tmp_path), str(tmp_path / "ck_a"), "10", "--tag", "straight")
    assert straight.returncode == 0, straight.stderr
    killed = _run(str(tmp_path), str(tmp_path / "ck_b"), "10", "--kill-after", "5", "--tag", "split")
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # really died after step 5
    assert not (tmp_path / "params_split.pt").exists()
    resumed = _run(str(tmp_path), str(tmp_path / "ck_b"), "10", "--resume", "--tag", "split")
    assert resumed.returncode == 0, resumed.stderr

    a, b = _losses(tmp_path / "losses_straight.jsonl"), _losses(tmp_path / "losses_split.jsonl")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise: floats compared exactly
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    pa, pb = torch.load(tmp_path / "params_straight.pt"), torch.load(tmp_path / "params_split.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert any("e_score_correction_bias" in k and pa[k].abs().sum() > 0 for k in pa)  # biases moved and matched
    assert [s for s, _ in list_checkpoints(tmp_path / "ck_b")] == [5, 10]


def _small_runner(seed: int) -> LocalRunner:
    torch.manual_seed(seed)
    cfg = TrainerConfig(lr=1e-3, total_steps=4)
    return LocalRunner(prepare_model(Transformer(ModelConfig.preset("tiny")), cfg), cfg)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    runner = _small_runner(0)
    good = save_training_checkpoint(tmp_path, 1, runner, {"cursor": 11})
    want = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with torch.no_grad():
        for p in runner.model.parameters():
            p.add_(1.0)

    real_write = ckpt_mod._write_file

    def dying_write(path, payload):
        real_write(path, payload)  # the rank file lands, then the process "dies" before the commit
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(ckpt_mod, "_write_file", dying_write)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 2, runner, {"cursor": 22})
    monkeypatch.undo()
    # a hard kill would also leave the temp dir behind: fake one, with files, and make sure resume ignores it
    partial = tmp_path / ".tmp-step_00000003-deadbeef"
    partial.mkdir()
    (partial / "rank00000.pt").write_bytes(b"truncated")

    assert latest_checkpoint(tmp_path) == good
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    fresh = _small_runner(1)
    step, data_state = load_training_checkpoint(tmp_path, fresh)
    assert (step, data_state) == (1, {"cursor": 11})
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    save_training_checkpoint(tmp_path, 3, fresh, {"cursor": 33}, keep_last=1)  # next save cleans the debris
    assert not partial.exists() and [s for s, _ in list_checkpoints(tmp_path)] == [3]


def test_a_rewound_run_drops_the_abandoned_future(tmp_path):
    """Resumed from step 20 while 30 exists (an earlier run went on): saving 25 removes 30, which auto-resume would
    otherwise pick up, and keep-last then counts the steps of this run's past only. Re-saving an existing step keeps
    a complete copy at every moment (the old one moves aside until the new one is in place)."""
    runner = _small_runner(0)
    for step in (10, 20, 30):
        save_training_checkpoint(tmp_path, step, runner, {"cursor": step}, keep_last=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20, 30]
    assert load_training_checkpoint(tmp_path / "step_00000020", runner)[0] == 20
    save_training_checkpoint(tmp_path, 25, runner, {"cursor": 25}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 25]
    assert latest_checkpoint(tmp_path).name == "step_00000025"
    save_training_checkpoint(tmp_path, 25, runner, {"cursor": 26}, keep_last=2)  # the same step again
    assert load_training_checkpoint(tmp_path, _small_runner(1)) == (25, {"cursor": 26})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000025"]


def test_resume_with_another_ep_size_is_refused(tmp_path):
    runner = _small_runner(0)
    save_training_checkpoint(tmp_path, 1, runner, {})
    other = _small_runner(1)
    other.cfg.ep_size = 2  # as a run with experts sharded two ways would be
    with pytest.raises(ValueError, match=r"written with ep_size 1 \(its expert shards\), this run uses ep_size 2"):
        load_training_checkpoint(tmp_path, other)


def test_a_crash_between_the_renames_of_a_resave_keeps_that_step(tmp_path, monkeypatch):
    """Re-saving step X moves step_X aside, then renames the new copy in; dying between the two must leave step X
    resumable (from the aside copy) and the next save must restore it, not delete it as debris."""
    runner = _small_runner(0)
    save_training_checkpoint(tmp_path, 2, runner, {"cursor": 2})
    save_training_checkpoint(tmp_path, 4, runner, {"cursor": 4})
    real_rename = ckpt_mod.os.rename

    def dying_rename(src, dst):
        real_rename(src, dst)
        if ".old-step_" in str(dst):
            raise KeyboardInterrupt("simulated crash between the renames")

    monkeypatch.setattr(ckpt_mod.os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 4, runner, {"cursor": 4})
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert load_training_checkpoint(tmp_path, _small_runner(1)) == (4, {"cursor": 4})
    save_training_checkpoint(tmp_path, 3, runner, {"cursor": 3})  # a rewound run: step 4 goes, as a future
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    save_training_checkpoint(tmp_path, 4, runner, {"cursor": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]


def test_a_damaged_checkpoint_names_its_file(tmp_path):
    runner = _small_runner(0)
    path = save_training_checkpoint(tmp_path, 1, runner)
    (path / "rank00000.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=r"rank00000\.pt: cannot be read .*delete .*step_00000001 to resume"):
        load_training_checkpoint(tmp_path, _small_runner(1))
    (path / ckpt_mod.STATE_FILE).write_text("")
    with pytest.raises(ValueError, match=rf"{ckpt_mod.STATE_FILE}: damaged"):
        load_training_checkpoint(path, _small_runner(1))
