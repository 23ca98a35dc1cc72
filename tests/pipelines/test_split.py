"""Split-mode GRPO (rollout workers + weight broadcast), reward workers, placement groups (issue 8).

One GRPO stage on the untrained ``tiny`` preset, rewarded by a per-sample reward (the share of even token ids) so
that every group has non-zero advantages and every update really moves the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from dsalign.pipelines.config import load_config
from dsalign.pipelines.runner import run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

REWARDS_PY = """
def even_tokens(prompts, completions, completion_ids=None, **columns):
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def picky(prompts, completions, completion_ids=None, **columns):
    if any("boom" in c for c in completions):
        raise ValueError("boom in a completion")
    return [float(len(c)) for c in completions]
"""


def _grpo_config(tmp: Path, name: str, tokenizer: str = "demo", **resources):
    data = yaml.safe_load(TINY.read_text())
    grpo = data["stages"][1]
    rewards = [{"fn": f"{tmp / 'rewards.py'}:even_tokens"}, {"fn": "think_format", "weight": 0.2}]
    grpo.update(model={"preset": "tiny"}, checkpoint_every=1, resources=resources, rewards=rewards)
    grpo["data"]["num_rows"] = 16
    grpo["grpo"].update(max_new_tokens=12, mask_truncated=False, speculative=True)  # rollouts draft with MTP
    data.update(stages=[grpo], output_dir=str(tmp / name), tokenizer=tokenizer)
    data["eval"].update(num_prompts=1, samples_per_prompt=1, max_new_tokens=4)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]


def _weights(state) -> dict[str, torch.Tensor]:
    from dsalign.model import load_checkpoint

    return load_checkpoint(state.finished["grpo"]).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray):
    """The same GRPO stage colocated, then split (one rollout worker, one reward worker, fractional CPUs so that
    trainer + rollout + reward fit the 2-CPU local Ray); both decode speculatively (``grpo.speculative``)."""
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "rewards.py").write_text(REWARDS_PY)
    colocated = run(_grpo_config(tmp, "colocated"))
    tokenizer = str(tmp / "colocated" / "tokenizer")  # one tokenizer for both runs
    split_cfg = _grpo_config(tmp, "split", tokenizer, mode="split", rollout_workers=1, rollout_cpus_per_worker=0.5,
                             reward_workers=1, reward_cpus_per_worker=0.5)  # fmt: skip
    return {"tmp": tmp, "tokenizer": tokenizer, "colocated": colocated, "split": run(split_cfg)}


def test_split_mode_matches_colocated_and_keeps_rollout_weights_bitwise_in_sync(runs):
    from dsalign.pipelines.stages import load_source, load_tokenizer, weights_digest

    tmp = runs["tmp"]
    split, colocated = _metrics(tmp / "split"), _metrics(tmp / "colocated")
    assert [r["step"] for r in split] == [1, 2]
    for row in split:  # after every broadcast the rollout worker holds exactly the trainer's weights
        assert row["rollout_weights_sha256"] == [row["weights_sha256"]]
    assert split[0]["weights_sha256"] != split[1]["weights_sha256"]  # the update moved the weights
    initial = load_source({"preset": "tiny"}, load_tokenizer(runs["tokenizer"]), seed=0)
    assert split[0]["weights_sha256"] == weights_digest(initial.state_dict())  # iteration 1 decodes the source model
    # Same weights and per-prompt seeds, same engine batch shape, one thread each: the rollout worker samples exactly
    # the colocated completions and log-probs, so rewards, losses and the updated weights agree bit for bit.
    keys = ["reward", "reward/even_tokens", "reward/think_format", "response_length", "loss", "rollout_mtp_acceptance"]
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in colocated]
    assert split[0]["reward/even_tokens"] not in (0.0, 1.0)
    assert all(0.0 <= r["rollout_mtp_acceptance"] <= 1.0 for r in split)  # the rollout worker's own drafts, counted
    a, b = _weights(runs["split"]), _weights(runs["colocated"])
    assert all(torch.equal(a[k], b[k]) for k in a), "split and colocated runs ended with different weights"
    assert (Path(runs["split"].finished["grpo"]) / "tokenizer.json").is_file()  # HF export with its tokenizer


def test_split_mode_resumes_with_fresh_rollout_workers_after_the_trainer_dies(runs, monkeypatch):
    """The trainer exits after iteration 1; the retry starts a new placement group and new rollout workers (built
    from the source model), and the first broadcast hands them the checkpointed weights. Two workers here, each
    sampling half the prompts with the seeds of the prompts' places in the batch."""
    from dsalign.pipelines.stages import weights_digest

    monkeypatch.setenv("DSALIGN_FAULT", "grpo:1")
    cfg = _grpo_config(runs["tmp"], "faulted", runs["tokenizer"], mode="split", rollout_workers=2,
                       rollout_cpus_per_worker=0.5)  # fmt: skip
    state = run(cfg)
    out = runs["tmp"] / "faulted"
    rows, clean = _metrics(out), _metrics(runs["tmp"] / "split")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollout_weights_sha256"] == [row["weights_sha256"]] * 2
    checkpointed = torch.load(out / "grpo" / "checkpoints" / "step_00000001" / "rank00000.pt", weights_only=False)
    assert rows[1]["weights_sha256"] == weights_digest(checkpointed["model"])  # resumed exactly, workers included
    # Per-prompt seeds make the samples independent of the split: same tokens, so the same rewards and lengths. The
    # engines' batches differ (two half-batches vs one), which moves log-probs and loss by float rounding; AdamW's
    # normalized update turns that into weight differences up to ~1e-6 (an update of lr = 2e-4 is the scale a wrong
    # weight or sample would show).
    keys = ["reward", "reward/even_tokens", "reward/think_format", "response_length"]
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in clean]
    assert rows[0]["weights_sha256"] == clean[0]["weights_sha256"]
    # The loss is a near-zero mean of advantage-weighted ratios (here -0.09 and -0.003): the rounding above is ~4e-8
    # absolute, which is 1e-5 relative to the second; a different sample moves it by ~1e-2.
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in clean], rel=1e-5, abs=1e-6)
    a, b = _weights(state), _weights(runs["split"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def test_reward_pool_scores_like_in_process(runs, local_ray):
    """Whole groups per worker, order kept, failures (a reward raising on one sample) at the same sample indices."""
    from dsalign.pipelines.config import RewardEntry
    from dsalign.pipelines.pools import RewardPool, RewardWorker
    from dsalign.pipelines.stages import build_combiner

    entries = [RewardEntry(fn="think_format"), RewardEntry(fn=f"{runs['tmp'] / 'rewards.py'}:picky", weight=0.01),
               RewardEntry(fn="kimi_length", weight=0.5)]  # fmt: skip
    texts = ["<think>a</think>4", "5", "boom", "<think>bb</think>77", "x" * 9, "<think></think>", "", "ok"]
    prompts = [f"q{i // 2}" for i in range(len(texts))]
    ids = [list(range(len(t))) for t in texts]
    columns = {"correct": [i % 3 == 0 for i in range(len(texts))]}
    pool = RewardPool([RewardWorker.options(num_cpus=0.5).remote(entries, 1) for _ in range(3)], group_size=2)
    got, want = pool(prompts, texts, ids, **columns), build_combiner(entries)(prompts, texts, ids, **columns)
    assert got.rewards == want.rewards and got.components == want.components
    assert [(f.reward, f.kind, f.sample_index) for f in got.failures] == [("picky", "exception", 2)]
    assert [(f.reward, f.kind, f.sample_index) for f in want.failures] == [("picky", "exception", 2)]
    assert got.metrics.keys() == want.metrics.keys()
    assert all(math.isclose(got.metrics[k], want.metrics[k], rel_tol=1e-12) or math.isnan(want.metrics[k])
               for k in want.metrics)  # fmt: skip


def test_split_mode_with_lora_ships_the_merged_policy(runs):
    """A LoRA policy in split mode: the trainer ships the merged network (rollout workers hold plain models), so the
    rollout worker samples what the colocated LoRA policy samples (same rewards and lengths; log-probs, losses and
    weights equal up to the merge's rounding)."""
    from dsalign.pipelines.config import LoraConfig
    from dsalign.pipelines.stages import load_source, load_tokenizer, weights_digest

    def config(name: str, **resources):
        cfg = _grpo_config(runs["tmp"], name, runs["tokenizer"], **resources)
        cfg.stages[0].training.lora = LoraConfig(r=4, alpha=8.0, target_modules=["kv_b_proj", "o_proj"])
        cfg.stages[0].grpo.optim.lr = 0.02  # adapters start at zero: move them enough for iteration 2 to differ
        return cfg

    colocated = run(config("lora_colocated"))
    split = run(config("lora_split", mode="split", rollout_workers=1, rollout_cpus_per_worker=0.5))
    rows, clean = _metrics(runs["tmp"] / "lora_split"), _metrics(runs["tmp"] / "lora_colocated")
    for row in rows:
        assert row["rollout_weights_sha256"] == [row["weights_sha256"]]
    initial = load_source({"preset": "tiny"}, load_tokenizer(runs["tokenizer"]), seed=0)
    assert rows[0]["weights_sha256"] == weights_digest(initial.state_dict())  # B = 0: the merge is the base exactly
    assert rows[1]["weights_sha256"] != rows[0]["weights_sha256"]  # the trained adapters, merged
    keys = ["reward", "reward/even_tokens", "reward/think_format", "response_length"]
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in clean]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in clean], rel=1e-4, abs=1e-6)
    a, b = _weights(split), _weights(colocated)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
