"""Run configs: strict schema, overrides, and preflight failures before any actor starts (issue 8, acceptance 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dsalign.pipelines.config import load_config
from dsalign.pipelines.preflight import PreflightError, preflight
from dsalign.pipelines.schema import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.max_batch_size=0", r"eval: max_batch_size: expected a positive number of slots, got 0"),
        ("stages.distill.distill.max_batch_size=-4", r"stages\[2\]\.distill: max_batch_size: expected a positive"),
        ("stages.grpo.grpo.group_size=1", r"stages\[1\]\.grpo: group_size: expected >= 2 \(advantages are relative"),
        ("stages.grpo.grpo.temperature=0", r"stages\[1\]\.grpo: temperature: expected > 0 \(greedy samples"),
        ("stages.grpo.grpo.top_p=1.5", r"stages\[1\]\.grpo: top_p: expected a probability mass in \(0, 1\], got 1\.5"),
        ("stages.grpo.grpo.dual_clip_c=0.5", r"stages\[1\]\.grpo: dual_clip_c: expected null or a bound > 1"),
        ("stages.sft.sft.steps=0", r"stages\[0\]\.sft: steps: expected >= 1, got 0"),
        ("stages.grpo.grpo.optim.lr=-1", r"stages\[1\]\.grpo\.optim: lr: expected > 0 \(.*\), got -1\.0"),
        ("stages.sft.sft.optim.betas=[0.9]", r"stages\[0\]\.sft\.optim: betas: expected two AdamW betas in \[0, 1\)"),
        ("stages.distill.distill.keep=most", r"stages\[2\]\.distill: keep: expected 'best' or 'all', got 'most'"),
        ("stages.sft.checkpoint_every=0", r"stages\[0\]: checkpoint_every: expected >= 1, got 0"),
        ("stages.length.data.length_target=0", r"stages\[3\]\.data: length_target: expected a positive number"),
        ("eval.samples_per_prompt=0", r"eval: samples_per_prompt: expected >= 1, got 0"),
        ("stages.distill.distill.mode=online", r"stages\[2\]\.distill: mode: expected 'traces' or 'on_policy'"),
        ("stages.distill.distill.on_policy.loss=kl", r"distill\.on_policy: loss: expected sampled_reverse_kl \| topk_"),
        ("stages.grpo.grpo.rollout_is_cap=0.5", r"stages\[1\]\.grpo: rollout_is_cap: expected null or a weight bound"),
        ("task.slip_rate=2", r"task: slip_rate: expected a probability in \[0, 1\], got 2"),
        ("task.verbose_fraction=-1", r"task: verbose_fraction: expected a probability in \[0, 1\], got -1"),
        ("task.min_terms=0", r"task: min_terms: expected at least 2 numbers to add, got 0"),
        ("task.min_terms=9", r"task: max_terms: expected >= min_terms \(9\), got 5"),
        ("ray.num_cpus=0", r"ray: num_cpus: expected null \(all CPUs\) or at least 1, got 0"),
        ("name=", r"name: expected a non-empty string, got ''"),
    ],
)
def test_out_of_range_values_fail_on_load_naming_the_key(override, message):
    """Values no stage could run with fail when the config loads (before Ray starts), not inside a stage's worker
    after the earlier stages ran (where a retry would only fail again)."""
    assert load_config(DEMO, ["eval.max_batch_size=64"]).eval.max_batch_size == 64
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_preflight_names_unknown_grpo_algorithms(tmp_path):
    overrides = [f"output_dir={tmp_path / 'out'}", "stages.grpo.grpo.advantage=gae", "stages.grpo.grpo.loss_agg=mean",
                 "stages.length.grpo.kl_estimator=k4", "stages.length.grpo.policy_loss=ppo"]  # fmt: skip
    with pytest.raises(PreflightError) as err:
        preflight(load_config(DEMO, overrides))
    assert err.value.problems == [
        "stages[1] (grpo).grpo.advantage: unknown advantage estimator 'gae'; known: drgrpo, grpo, rloo",
        "stages[1] (grpo).grpo.loss_agg: unknown loss aggregation 'mean'; known: seq-mean-token-mean, "
        "seq-mean-token-sum-norm, token-mean",
        "stages[3] (length).grpo.policy_loss: unknown policy loss 'ppo'; known: gspo, ppo_clip",
        "stages[3] (length).grpo.kl_estimator: unknown KL estimator 'k4'; known: k1, k2, k3",
    ]


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


def test_preflight_reads_every_stage_data_file(tmp_path):
    """Each stage's data file is parsed with its kind's schema before any actor starts: malformed rows, a file of the
    wrong kind, an empty file, and prompts without the answer the stage's math_accuracy reward needs."""
    import json

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    convo = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    data = _tiny(tmp_path)
    data["stages"][0]["data"] = {"path": jsonl("sft.jsonl", [{"messages": convo}, {"messages": "oops"}])}
    data["stages"][1]["data"] = {"path": jsonl("no_answer.jsonl", [{"prompt": "1+1?"}, {"prompt": "2+3?"}])}
    data["stages"][2]["data"] = {"path": jsonl("empty.jsonl", [])}
    data["stages"][3]["data"] = {"path": jsonl("convos.jsonl", [{"messages": convo}])}  # prompts expected
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    problems = err.value.problems
    sft = next(p for p in problems if p.startswith("stages[0] (sft).data.path: "))
    assert "sft.jsonl: line 2: field 'messages'" in sft and "set the stage's data.skip_invalid: true" in sft
    assert ("stages[1] (grpo).data.path: 2 of 2 rows have no 'answer' (or 'solution') for the stage's math_accuracy "
            "reward") in "\n".join(problems)
    assert any(p.startswith("stages[2] (distill).data.path: ") and "empty.jsonl" in p for p in problems), problems
    assert any(p.startswith("stages[3] (length).data.path: ") and "convos.jsonl: line 1" in p for p in problems)
    # the same files, fixed: SFT skips its bad row when told to (counted), GRPO's rows have answers
    data["stages"][0]["data"]["skip_invalid"] = True
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(4)]  # a GRPO round takes 4 prompts
    data["stages"][1]["data"] = {"path": jsonl("ok.jsonl", rows)}
    data["stages"][2]["data"] = data["stages"][3]["data"] = {"path": str(tmp_path / "ok.jsonl")}
    preflight(load_config(_write(tmp_path, data)))


def test_preflight_checks_checkpoint_dirs(tmp_path):
    data = _base(tmp_path)
    data["stages"][0]["model"] = {"checkpoint": str(tmp_path / "missing_ckpt")}
    with pytest.raises(PreflightError, match="missing_ckpt does not exist"):
        preflight(load_config(_write(tmp_path, data)))
    (tmp_path / "empty_ckpt").mkdir()
    data["stages"][0]["model"] = {"checkpoint": str(tmp_path / "empty_ckpt")}
    with pytest.raises(PreflightError, match="empty_ckpt has no config.json"):
        preflight(load_config(_write(tmp_path, data)))
    preflight(load_config(DEMO, [f"output_dir={tmp_path / 'ok'}"]))  # the demo itself passes


def test_preflight_refuses_a_reward_whose_required_params_nothing_fills(tmp_path):
    """``soft_overlong`` without ``max_length`` / ``cache_length`` imports fine but would raise on every sample (the
    stage used to train with reward_errors on all of them); preflight knows the data's columns and says so."""
    data = _base(tmp_path)
    data["stages"][1]["rewards"] = [{"fn": "math_accuracy"}, {"fn": "soft_overlong"}]
    expected = (r"stages\[1\] \(grpo\)\.rewards\[1\]\.fn 'soft_overlong': nothing fills its required parameter\(s\) "
                r"\['max_length', 'cache_length'\]: they are not in params and not columns of the data "
                r"\(\['answer', 'finish_reason', 'prompt_id'\]\)")
    with pytest.raises(PreflightError, match=expected):
        preflight(load_config(_write(tmp_path, data)))
    data["stages"][1]["rewards"][1]["params"] = {"max_length": 60, "cache_length": 10}
    preflight(load_config(_write(tmp_path, data)))


def test_preflight_checks_what_rewards_will_be_called_with(tmp_path):
    """math_accuracy's gold may be 'solution' (TRL / NuminaMath datasets); a data column named like the call's own
    arguments would fail or be overwritten; a param that is also a column would lose to it silently; eval.reward's
    required columns are checked against the evaluation's prompts as stage rewards are."""
    user = tmp_path / "user_rewards.py"
    user.write_text("def needs_level(prompts, completions, level, **kw):\n"
                    "    return [float(level[0])] * len(prompts)\n")

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    solution = jsonl("solution.jsonl", [{"prompt": f"{i}+1?", "solution": str(i + 1)} for i in range(16)])
    clash = jsonl("clash.jsonl", [{"prompt": f"{i}+1?", "answer": str(i + 1), "completions": "x", "level": 1}
                                  for i in range(16)])  # fmt: skip
    base = [f"output_dir={tmp_path / 'out'}", "stages=[{name: grpo, kind: grpo, model: {preset: tiny}, "
            "grpo: {iterations: 1}, rewards: [{fn: math_accuracy}]}]"]  # fmt: skip
    preflight(load_config(DEMO, [*base, f"stages.grpo.data.path={solution}", f"eval.path={solution}"]))
    with pytest.raises(PreflightError) as err:
        preflight(load_config(DEMO, [*base, f"stages.grpo.data.path={clash}",
                                     "stages.grpo.rewards=[{fn: math_accuracy}, "
                                     f"{{fn: '{user}:needs_level', params: {{level: 3}}}}]",
                                     f"eval.reward={{fn: '{user}:needs_level'}}"]))  # fmt: skip
    problems = err.value.problems
    assert any(p.startswith("stages[0] (grpo).data.path: column(s) ['completions'] of the data clash with what the "
                            "reward call passes itself") for p in problems), problems  # fmt: skip
    assert any(p.startswith("stages[0] (grpo).rewards[1].params ['level']: also column(s) of the data") for p in
               problems), problems  # fmt: skip
    assert any(p.startswith(f"eval.reward.fn '{user}:needs_level': nothing fills its required parameter(s) "
                            "['level']") for p in problems), problems  # fmt: skip


def test_preflight_refuses_an_ep_size_the_experts_do_not_split_into_and_overrides_of_a_stage_output(tmp_path):
    """Both used to pass preflight: an ep_size that does not divide the routed experts failed in the workers (and was
    retried), architecture overrides on a from_stage source were silently ignored."""
    base = [f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, "stages.sft.resources={num_workers: 3, ep_size: 3, cpus_per_worker: 0.5}",
                                     "stages.sft.sft.batch_size=6",
                                     "stages.grpo.model.overrides={num_hidden_layers: 2}"]))  # fmt: skip
    assert err.value.problems[:2] == [
        "stages[0] (sft).resources.ep_size: 3 does not divide the model's 8 routed experts (each rank holds an equal "
        "share); use a divisor",
        "stages[1] (grpo).model.overrides: ['num_hidden_layers'] cannot change the architecture of stage 'sft''s "
        "output (a checkpoint); only the runtime switches ['fp8', 'fp8_pow2_scales'] apply to it",
    ], err.value.problems
    preflight(load_config(TINY, [*base, "stages.grpo.model.overrides={fp8: true}"]))


def test_speculative_rollouts_need_an_mtp_module(tmp_path):
    """grpo.speculative drafts with the model's MTP module: a model without one is refused before any actor starts
    (the engine would raise in the worker); the tiny config's speculative stage (from a stage with MTP) passes."""
    base = [f"output_dir={tmp_path / 'out'}"]
    preflight(load_config(TINY, base))  # its `length` stage decodes speculatively
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, "stages.sft.model.overrides={num_nextn_predict_layers: 0}"]))
    assert err.value.problems == [
        "stages[3] (length).grpo.speculative: the model has no MTP module to draft with (num_nextn_predict_layers 0); "
        "set it to false"
    ], err.value.problems
    # a checkpoint whose config declares MTP but whose weights lack it (as many published ones do) gets fresh MTP
    # modules when a stage loads it, which SFT then trains: preflight sees the model the stages build
    from dsalign.model import ModelConfig, Transformer, save_checkpoint
    from safetensors.torch import load_file, save_file

    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=512))  # room for the demo tokenizer
    save_checkpoint(model, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    mtp = f"model.layers.{model.cfg.num_hidden_layers}."
    save_file({k: v for k, v in load_file(shard).items() if not k.startswith(mtp)}, shard, metadata={"format": "pt"})
    preflight(load_config(TINY, [*base, f"stages.sft.model={{checkpoint: {tmp_path / 'ckpt'}}}"]))


def test_prompts_too_long_to_sample_from_are_refused_before_the_run_or_dropped_and_counted(tmp_path):
    """A prompt the model has no room to generate after used to pass preflight and fail the stage mid-run (retried),
    named by its index in a batch; now preflight names the file and the prompt, and with skip_invalid the stage drops
    it and counts it in data.json."""
    from dsalign.pipelines.preflight import _run_tokenizer
    from dsalign.pipelines.stages import prompts_that_fit, stage_file_rows, write_data_summary

    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(8)]
    rows[2]["prompt"] = "1 + " * 1500 + "1?"  # the tiny preset's context is 1024 tokens
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"output_dir={tmp_path / 'out'}", "stages=[{name: grpo, kind: grpo, model: {preset: tiny}, "
            "grpo: {iterations: 1, prompts_per_iter: 4}, rewards: [{fn: math_accuracy}], "
            f"data: {{path: {path}}}}}]"]
    with pytest.raises(PreflightError) as err:
        preflight(load_config(DEMO, base))
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(
        f"stages[0] (grpo).data.path: {path}: 1 prompt(s) do not fit the model's context of 1024 tokens with room to "
        "generate: long.jsonl:3 ("), err.value.problems  # fmt: skip
    cfg = load_config(DEMO, [*base, "stages.grpo.data.skip_invalid=true"])
    preflight(cfg)
    data = cfg.stages[0].data
    loaded, report = stage_file_rows(data, "prompt")
    write_data_summary(tmp_path, str(path), loaded, report)
    tok = _run_tokenizer(cfg)
    kept = prompts_that_fit(loaded, data, tok, 1024, tmp_path)
    assert [r["prompt_id"] for r in kept] == [f"long.jsonl:{i}" for i in (1, 2, 4, 5, 6, 7, 8)]
    summary = json.loads((tmp_path / "data.json").read_text())
    assert summary["rows"] == 7 and summary["skipped_invalid"] == 1 and "dropped" in summary["problems"][-1]
    with pytest.raises(ValueError, match=r"long.jsonl: 1 prompt\(s\) do not fit .*; shorten them, or set the stage's"):
        prompts_that_fit(loaded, load_config(DEMO, base).stages[0].data, tok, 1024, None)


def test_preflight_refuses_tokenizer_fields_in_a_preset_models_overrides(tmp_path):
    """A preset's vocabulary and special token ids come from the run's tokenizer: overriding them used to pass
    preflight and crash the stage (``replace() got multiple values for keyword argument 'vocab_size'``)."""
    data = _base(tmp_path)
    data["stages"][0]["model"] = {"preset": "tiny", "overrides": {"vocab_size": 100, "eos_token_id": 5}}
    with pytest.raises(PreflightError, match=r"\.overrides: \['vocab_size', 'eos_token_id'\] come from the run's "
                                             "tokenizer"):
        preflight(load_config(_write(tmp_path, data)))


def test_preflight_reads_checkpoint_headers_against_the_config(tmp_path):
    """A checkpoint source's shard headers and keys are checked against its config.json before any actor starts
    (no tensor is read): a truncated shard and a config that disagrees with the weights' layers fail preflight."""
    import json
    import shutil

    from dsalign.model import save_checkpoint
    from dsalign.pipelines.demo_tokenizer import task_tokenizer
    from dsalign.pipelines.stages import load_source

    run = load_config(TINY)
    good = save_checkpoint(load_source({"preset": "tiny"}, task_tokenizer(run.task), 0), tmp_path / "good")
    truncated, fewer = tmp_path / "truncated", tmp_path / "fewer"
    shutil.copytree(good, truncated)
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    shutil.copytree(good, fewer)
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] - 1}))
    data = _tiny(tmp_path)
    data["stages"][0]["model"] = {"checkpoint": str(truncated)}
    data["stages"][3]["model"] = {"checkpoint": str(fewer)}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    problems = err.value.problems
    assert any(p.startswith("stages[0] (sft).model.checkpoint: ") and "truncated/model.safetensors" in p
               for p in problems), problems  # fmt: skip
    assert any(p.startswith("stages[3] (length).model.checkpoint: ") and "num_hidden_layers" in p
               for p in problems), problems  # fmt: skip
    data["stages"][0]["model"] = data["stages"][3]["model"] = {"checkpoint": str(good)}
    preflight(load_config(_write(tmp_path, data)))


def _tiny(tmp_path, **grpo_resources) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["stages"][1]["resources"] = grpo_resources
    return data


def test_split_mode_without_rollout_workers_fails_preflight(tmp_path):
    cfg = load_config(_write(tmp_path, _tiny(tmp_path, mode="split")))
    with pytest.raises(
        PreflightError, match=r"stages\[1\] \(grpo\)\.resources: mode 'split' needs rollout_workers >= 1"
    ):
        preflight(cfg)


def test_resource_combinations_that_cannot_work_fail_preflight(tmp_path):
    data = _tiny(tmp_path, mode="split", rollout_workers=2, reward_workers=1)  # 1 + 2 + 1 CPUs on a 2-CPU Ray
    data["stages"][0]["resources"] = {"mode": "split", "reward_workers": 1}
    data["stages"][3]["resources"] = {"rollout_workers": 1}
    data["stages"][2]["resources"] = {"gpus_per_worker": 64}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    text = str(err.value)
    assert "stages[0] (sft).resources.mode: 'split' applies to GRPO stages only" in text
    assert "stages[0] (sft).resources.reward_workers: an sft stage scores no rewards" in text
    assert "stages[1] (grpo).resources: the stage's placement group needs 4 CPUs" in text and "has 2" in text
    assert "stages[3] (length).resources.rollout_workers: 1 set, but mode is 'colocated'; set mode: split" in text
    assert "stages[2] (distill).resources: the stage reserves 64 GPUs but this machine has" in text
    assert len(err.value.problems) == 5
    fits = _tiny(tmp_path, mode="split", rollout_workers=2, rollout_cpus_per_worker=0.25, reward_workers=1,
                 reward_cpus_per_worker=0.5)  # fmt: skip
    preflight(load_config(_write(tmp_path, fits)))  # fractional CPUs: 1 + 0.5 + 0.5 fits


def test_fractional_gpus_for_several_trainer_ranks_fail_preflight(tmp_path):
    """Two NCCL ranks of one group on one GPU (Ray packs fractional GPUs together) fail inside NCCL, far from the
    config; preflight names the keys instead."""
    data = _tiny(tmp_path, num_workers=2, gpus_per_worker=0.5)
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    assert "stages[1] (grpo).resources: num_workers 2 with gpus_per_worker 0.5 lets Ray put two trainer ranks on " \
        "one GPU" in str(err.value)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"mode": "spilt"}, r"stages\[1\]\.resources: mode: expected one of \('colocated', 'split'\), got 'spilt'"),
        ({"placement_strategy": "pack"}, r"stages\[1\]\.resources: placement_strategy: expected one of \('PACK'"),
        ({"rollout_cpus_per_worker": 0}, r"stages\[1\]\.resources: rollout_cpus_per_worker: expected a positive"),
        ({"reward_workers": -1}, r"stages\[1\]\.resources: reward_workers: expected 0 or more, got -1"),
    ],
)
def test_bad_resources_fail_on_load(tmp_path, resources, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _tiny(tmp_path, **resources)))


def test_placement_bundles_one_per_actor_in_role_order():
    from dsalign.pipelines.config import Resources
    from dsalign.pipelines.placement import stage_layout, total_cpus

    res = Resources(num_workers=2, cpus_per_worker=2, gpus_per_worker=1, mode="split", rollout_workers=2,
                    rollout_cpus_per_worker=0.5, reward_workers=1)  # fmt: skip
    layout = stage_layout(res, "grpo")
    assert layout.bundles == [{"CPU": 2, "GPU": 1}] * 2 + [{"CPU": 0.5}] * 2 + [{"CPU": 1.0}]
    assert (layout.trainers, layout.rollout, layout.reward) == (range(0, 2), range(2, 4), range(4, 5))
    assert stage_layout(res, "distill").bundles == [{"CPU": 2, "GPU": 1}] * 2 + [{"CPU": 1.0}]  # no rollout workers
    res.rollout_gpus_per_worker = 0.5  # split-mode rollout workers on (shares of) GPUs
    assert stage_layout(res, "grpo").bundles[2:4] == [{"CPU": 0.5, "GPU": 0.5}] * 2
    demo = load_config(DEMO)  # every demo stage's placement group fits the demo's local Ray
    assert all(total_cpus(stage_layout(s.resources, s.kind)) <= demo.ray.num_cpus for s in demo.stages)


def test_preflight_refuses_zero3_for_grpo_and_more_rows_than_the_task_has(tmp_path):
    data = _tiny(tmp_path, zero_stage=3)  # a colocated GRPO stage decodes with the trainer's (partitioned) weights
    data["stages"][0]["resources"] = {"zero_stage": 3}  # SFT under ZeRO-3 is fine
    data["stages"][2]["resources"] = {"zero_stage": 3, "ep_size": 2, "num_workers": 2}  # not with EP
    data["task"] = {"min_terms": 2, "max_terms": 2, "max_value": 9}  # 81 distinct problems
    data["eval"] = {**data.get("eval", {}), "num_prompts": 20}
    data["stages"][0]["data"] = {"synthetic": "addition", "num_rows": 70, "seed": 1}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    text = str(err.value)
    assert "stages[1] (grpo).resources.zero_stage: 3 partitions every weight" in text
    assert "stages[0] (sft).data.num_rows: 70 synthetic rows plus 20 held-out prompts exceed the 81 distinct" in text
    assert "stages[2] (distill).resources: zero_stage 3 with ep_size 2: DeepSpeed does not support MoE" in text
    assert all("stages[0] (sft).resources" not in p for p in err.value.problems)
    # on-policy distillation samples from the student it trains, as GRPO does (trace distillation may use stage 3)
    data["stages"][2]["resources"] = {"zero_stage": 3}
    data["stages"][2]["distill"] = {**data["stages"][2]["distill"], "mode": "on_policy"}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    assert ("stages[2] (distill).resources.zero_stage: 3 partitions every weight outside the forward pass, but "
            "on-policy distillation decodes") in str(err.value)  # fmt: skip


def test_config_reference_doc_is_generated_from_the_schema():
    import dataclasses

    from dsalign.pipelines import config as config_module
    from dsalign.pipelines.config_doc import config_reference

    doc = config_reference()
    committed = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text()
    assert committed == doc, "docs/CONFIG.md is stale: run `dsalign config reference > docs/CONFIG.md`"
    classes = [c for c in vars(config_module).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f"{f.name}` |" not in doc]
    assert not missing, missing
    # per-block defaults: GRPO's optim block starts at 2e-4, SFT's at 1e-3
    assert "| `optim.lr` | float | `0.0002` |" in doc and "| `optim.lr` | float | `0.001` |" in doc


def test_config_show_prints_a_resolved_config_that_loads_back(tmp_path, capsys):
    from dsalign.pipelines.cli import main
    from dsalign.pipelines.schema import to_dict

    overrides = [f"output_dir={tmp_path / 'out'}", "stages.grpo.grpo.iterations=3"]
    assert main(["config", "show", str(TINY), *[a for o in overrides for a in ("--set", o)]]) == 0
    shown = tmp_path / "resolved.yaml"
    shown.write_text(capsys.readouterr().out)
    assert to_dict(load_config(shown)) == to_dict(load_config(TINY, overrides))
    assert main(["config", "show", str(TINY), "--set", "stages.grpo.grpo.kl_estimator=k7"]) == 2
    assert "grpo.kl_estimator: unknown KL estimator 'k7'" in capsys.readouterr().err


def _demo_sized_checkpoint(path, with_tokenizer: bool = False):
    """A tiny model sized to the tiny run's demo tokenizer (trained from its task), as that run's stage exports are
    (optionally with the tokenizer beside it)."""
    from dsalign.model import save_checkpoint
    from dsalign.pipelines.demo_task import corpus_for_tokenizer
    from dsalign.pipelines.demo_tokenizer import train_tokenizer
    from dsalign.pipelines.stages import load_source

    tok = train_tokenizer(corpus_for_tokenizer(load_config(TINY).task))
    save_checkpoint(load_source({"preset": "tiny"}, tok), path,
                    write_extra=(lambda tmp: tok.save_pretrained(str(tmp))) if with_tokenizer else None)  # fmt: skip
    return path


def test_preflight_checks_the_eval_file_and_checkpoint_overrides(tmp_path):
    ckpt = _demo_sized_checkpoint(tmp_path / "ckpt")
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    base = [f"output_dir={tmp_path / 'out'}", f"stages.sft.model.checkpoint={ckpt}", "stages.sft.model.preset=null"]
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, f"eval.path={held}", "stages.sft.model.overrides={hidden_size: 8}"]))
    assert err.value.problems == [
        "stages[0] (sft).model.overrides: ['hidden_size'] cannot change a checkpoint's architecture; only the runtime "
        "switches ['fp8', 'fp8_pow2_scales'] apply to a checkpoint",
        "eval.path: 1 of 2 rows have no 'answer' to check completions against (first: held.jsonl:2); math_accuracy "
        "reads the gold answer from the 'answer' column, else 'solution'",
    ]
    preflight(load_config(TINY, [*base, f"eval.path={held}", "eval.num_prompts=1"]))  # only the first row is used
    preflight(load_config(TINY, [*base, f"eval.path={tmp_path / 'gone.jsonl'}", "eval.enabled=false"]))
    with pytest.raises(PreflightError, match="eval.path: .*gone.jsonl does not exist"):
        preflight(load_config(TINY, [*base, f"eval.path={tmp_path / 'gone.jsonl'}"]))


def test_preflight_refuses_a_checkpoint_whose_vocabulary_is_not_the_runs(tmp_path):
    from dsalign.model import ModelConfig, Transformer, save_checkpoint
    from transformers import AutoTokenizer

    small = tmp_path / "small_vocab"
    save_checkpoint(Transformer(ModelConfig.preset("tiny").replace(vocab_size=64)), small)
    same = _demo_sized_checkpoint(tmp_path / "same", with_tokenizer=True)
    other = _demo_sized_checkpoint(tmp_path / "other", with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra_token>"])  # one more id: the vocabularies differ
    tok.save_pretrained(str(other))
    base = [f"output_dir={tmp_path / 'out'}", "stages.sft.model.preset=null"]
    preflight(load_config(TINY, [*base, f"stages.sft.model.checkpoint={same}"]))  # a stage export of this run: fine
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, f"stages.sft.model.checkpoint={small}",
                                     "stages.distill.distill.teacher.from_stage=null",
                                     f"stages.distill.distill.teacher.checkpoint={other}"]))  # fmt: skip
    assert err.value.problems == [
        f"stages[0] (sft).model.checkpoint: {small} embeds 64 tokens but the run's tokenizer (demo) has 295; set "
        "tokenizer: to the checkpoint's own",
        f"stages[2] (distill).distill.teacher.checkpoint: the tokenizer saved with {other} differs from the run's "
        f"(tokenizer: demo; 296 vs 295 tokens, 0 of the run's with other ids): token ids would mean other tokens; set "
        f"tokenizer: {other}",
    ]


def test_preflight_on_resume_checks_finished_stages_against_a_changed_tokenizer(tmp_path):
    """--resume with another task retrains the demo tokenizer: a stage still to run from a finished stage's output
    would read its token ids as other tokens (it used to run, silently). Finished stages themselves are not checked."""
    sft = _demo_sized_checkpoint(tmp_path / "sft_final", with_tokenizer=True)
    base = [f"output_dir={tmp_path / 'out'}"]
    preflight(load_config(TINY, base), finished={"sft": str(sft)})
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, "task.max_terms=4"]), finished={"sft": str(sft)})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(
        f"stages[1] (grpo).model.from_stage ('sft', finished earlier): the tokenizer saved with {sft} differs from "
        "the run's (tokenizer: demo; "), err.value.problems  # fmt: skip
    assert err.value.problems[0].endswith("the run's tokenizer changed since that stage ran (task or tokenizer "
                                          "settings): restore them, or run afresh without --resume")  # fmt: skip
    every = {name: str(sft) for name in ("sft", "grpo", "distill", "length")}  # nothing left to run from them
    preflight(load_config(TINY, [*base, "task.max_terms=4"]), finished=every)


def test_training_block_reaches_the_trainer():
    from dsalign.pipelines.stages import trainer_config

    keys = {"compute_dtype": "bf16", "moment_dtype": "bf16", "activation_checkpointing": "true", "keep_last": 1}
    cfg = load_config(TINY, [f"stages.grpo.training.{k}={v}" for k, v in keys.items()])
    grpo = cfg.stages[1]
    tc = trainer_config(grpo.grpo.optim, 2, cfg, grpo)
    assert (tc.compute_dtype, tc.moment_dtype, tc.activation_checkpointing, tc.keep_last) == ("bf16", "bf16", True, 1)
    plain = trainer_config(cfg.stages[0].sft.optim, 2, cfg, cfg.stages[0])
    assert (plain.compute_dtype, plain.moment_dtype, plain.activation_checkpointing) == ("fp32", "fp32", False)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.training: compute_dtype: expected 'fp32' or 'bf16'"):
        load_config(TINY, ["stages.grpo.training.compute_dtype=fp16"])


def test_num_rows_defaults_use_a_whole_file_and_512_synthetic_rows():
    from dsalign.pipelines.config import DataSource

    assert DataSource(synthetic="addition").num_rows == 512
    assert DataSource(path="prompts.jsonl").num_rows is None  # every row of the file (it was 512 as well)
    assert DataSource(path="prompts.jsonl", num_rows=0).num_rows == 0  # also "all", as older configs wrote it
    with pytest.raises(ValueError, match="num_rows: expected >= 1, got 0"):
        DataSource(synthetic="addition", num_rows=0)


def test_sft_micro_batches_and_equal_worker_shares(tmp_path, monkeypatch):
    from dsalign.pipelines import stages
    from dsalign.pipelines.config import SFTParams
    from dsalign.pipelines.stages import sft_batches, sft_micro_batches

    examples = [{"input_ids": [1, 2, 3 + i], "labels": [-100, 2, 3 + i]} for i in range(10)]
    whole = sft_batches(examples, SFTParams(batch_size=8), seed=0, step=3, pad_id=0)
    micro = sft_batches(examples, SFTParams(batch_size=8, micro_batch_size=3), seed=0, step=3, pad_id=0)
    assert len(whole) == 1 and len(micro) == 3 == sft_micro_batches(10, SFTParams(batch_size=8, micro_batch_size=3))
    ids = lambda batches: sorted(int(t) for b in batches for t in b.input_ids[b.labels != -100] if t > 2)  # noqa: E731
    assert ids(micro) == ids(whole) and len(ids(whole)) == 8  # the same 8 conversations, in 3 micro-batches
    # fewer conversations than batch_size, not a multiple of the world: every rank still gets an equal share (5 -> 4)
    monkeypatch.setattr(stages, "rank_world", lambda: (1, 2))
    p = SFTParams(batch_size=8, micro_batch_size=1)
    assert sft_micro_batches(5, p) == 2 == len(sft_batches(examples[:5], p, seed=0, step=3, pad_id=0))
    with pytest.raises(ValueError, match="1 conversations for 2 data-parallel ranks"):
        sft_micro_batches(1, p)
    monkeypatch.undo()
    base = [f"output_dir={tmp_path / 'out'}", "ray.num_cpus=8"]
    workers = [f"stages.{s}.resources.num_workers=2" for s in ("sft", "grpo", "distill")]
    uneven = ["stages.grpo.grpo.prompts_per_iter=3", "stages.sft.sft.batch_size=7",
              "stages.sft.sft.micro_batch_size=2", "stages.distill.distill.sft.batch_size=1"]  # fmt: skip
    with pytest.raises(PreflightError) as err:
        preflight(load_config(TINY, [*base, *workers, *uneven]))
    assert err.value.problems == [
        "stages[0] (sft).sft.batch_size: 7 conversations do not give each of the 2 workers an equal share; use a "
        "multiple of 2",
        "stages[1] (grpo).grpo.prompts_per_iter: 3 prompts do not split evenly over num_workers 2; use a multiple of 2",
        "stages[2] (distill).distill.sft.batch_size: 1 conversations do not give each of the 2 workers an equal "
        "share; use a multiple of 2",
    ]


def test_on_policy_distillation_needs_no_reward_and_splits_its_prompts_evenly(tmp_path):
    base = [f"output_dir={tmp_path / 'out'}", "stages.distill.rewards=[]"]
    with pytest.raises(PreflightError, match=r"stages\[2\] \(distill\)\.rewards: a distill stage needs at least one"):
        preflight(load_config(DEMO, base))  # trace distillation filters by reward
    on_policy = [*base, "stages.distill.distill.mode=on_policy"]
    preflight(load_config(DEMO, on_policy))
    uneven = [*on_policy, "stages.distill.resources.num_workers=3", "stages.distill.resources.cpus_per_worker=0.5"]
    with pytest.raises(PreflightError, match=r"distill\.on_policy\.prompts_per_step: 16 prompts do not split evenly"):
        preflight(load_config(DEMO, uneven))


@pytest.mark.parametrize("path", sorted((TINY.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every config in configs/ passes the schema (preflight needs their inputs: demo_on_policy.yaml reads the
    demo's outputs)."""
    cfg = load_config(path)
    assert cfg.stages and cfg.name


@pytest.mark.parametrize("override, message", [
    ("stages.sft.sft.steps.x=5", "override 'stages.sft.sft.steps.x=5': stages.sft.sft.steps is int 4, not a mapping"),
    ("stages.sft.sft.steps=[1,2", "override 'stages.sft.sft.steps=[1,2': the value is not valid YAML"),
    ("stages.sft.sft.optim.lr=.inf", "stages[0].sft.optim.lr: expected a finite number, got inf"),
    ("stages.grpo.rewards.0.weight=.nan", "stages[1].rewards[0].weight: expected a finite number, got nan"),
    ("stages.sft.sft.optim.lr=0", "stages[0].sft.optim: lr: expected > 0"),
    ("stages.sft.data={path: a.jsonl, synthetic: addition}", "stages[0].data: give exactly one of path or synthetic"),
    ("stages.distill.distill.teacher={}", "stages[2].distill.teacher: give exactly one of preset, checkpoint"),
    ("stages.grpo.resources.mode=weird", "stages[1].resources: mode: expected one of"),
    ("stages.sft.name=../../etc", "stages[0]: name: expected a plain name"),
    ("stages.sft.rewards=[{fn: math_accuracy}]", "stage 'sft': rewards apply to grpo and distill stages, not sft"),
    ("stages.sft.sft.optim.betas.0=0.8", "stages.sft.sft.optim.betas is not in the config file, so there is no list to "
                                         "index; set the whole list (stages.sft.sft.optim.betas=[...])"),
])  # fmt: skip
def test_bad_values_name_their_place(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_a_run_without_stages_fails_preflight():
    with pytest.raises(PreflightError, match="stages: a run needs at least one stage"):
        preflight(load_config(TINY, ["stages=[]"]))


def test_yaml_1_1_exponents_read_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; a number field takes it as the number it spells."""
    data = _tiny(tmp_path)
    data["stages"][0]["sft"]["optim"] = {"lr": "1e-5"}
    assert load_config(_write(tmp_path, data)).stages[0].sft.optim.lr == 1e-5
    data["stages"][0]["sft"]["optim"] = {"lr": "fast"}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.sft\.optim\.lr: expected a number, got str 'fast'"):
        load_config(_write(tmp_path, data))


def test_a_key_given_twice_or_a_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text().replace("kind: sft\n", "kind: sft\n    kind: grpo\n", 1))
    with pytest.raises(ConfigError, match=r"(?s)dup.yaml: not valid YAML .*key 'kind' is given twice \(first line"):
        load_config(path)
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.sft.training.lora={dropout: 1.5}", r"stages\[0\]\.training\.lora: dropout: expected a probability"),
        ("stages.sft.training.lora={r: 0}", r"stages\[0\]\.training\.lora: r: expected a rank >= 1"),
        ("stages.sft.training.lora={alpha: 0}", r"stages\[0\]\.training\.lora: alpha: expected > 0"),
        ("stages.sft.training.lora={target_modules: []}", r"lora: target_modules: expected at least one module"),
        ("stages.grpo.output_dir=runs/tiny/sft", r"stages 'sft' and 'grpo' write to overlapping directories"),
        ("stages.grpo.output_dir=runs/tiny/sft/inner", r"stages 'sft' and 'grpo' write to overlapping directories"),
        ("stages.sft.name=report.md", r"stage name 'report.md' is taken by a file of the run directory"),
        ("stages.sft.output_dir=runs/tiny/tokenizer", r"stage 'sft': output_dir .*tokenizer overlaps the run's"),
        ("stages.sft.output_dir=runs/tiny/tokenizer/x", r"output_dir .*overlaps the run's tokenizer"),
        ("stages.sft.output_dir=runs/tiny", r"stage 'sft': output_dir .*runs/tiny overlaps the run directory"),
        ("stages.sft.output_dir=runs", r"stage 'sft': output_dir .*runs overlaps the run directory"),
        ("seed=-1", r"seed: expected an integer in \[0, 2\*\*63\)"),
    ],
)
def test_lora_values_and_clashing_stage_directories_fail_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override] + (["stages.1.model.from_stage=report.md"] if "name=" in override else []))


def test_yaml_merge_keys_and_exponent_floats_read_alike_in_files_and_overrides(tmp_path):
    """Anchors with ``<<`` merges are YAML and work; ``1e-6`` is a number in a file's untyped blocks (model
    overrides, reward params) as in ``--set``, where ``name=1e3`` stays what the file would make of it."""
    text = TINY.read_text().replace("data: {synthetic: addition, num_rows: 64, seed: 1}",
                                    "data: &rows {synthetic: addition, num_rows: 64, seed: 1}", 1)  # fmt: skip
    text = text.replace("data: {synthetic: addition, num_rows: 64, seed: 2}", "data: {<<: *rows, seed: 2}", 1)
    text = text.replace("model: {preset: tiny}", "model: {preset: tiny, overrides: {rms_norm_eps: 1e-6}}", 1)
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    cfg = load_config(path, ["stages.grpo.rewards.0.params={max_length: 1e2}"])
    assert cfg.stages[1].data.num_rows == 64 and cfg.stages[1].data.seed == 2  # its own value over the merged one
    assert cfg.stages[0].model.overrides == {"rms_norm_eps": 1e-6}
    assert cfg.stages[1].rewards[0].params == {"max_length": 100.0}
    with pytest.raises(ConfigError, match=r"name: expected a string, got float 1000\.0"):
        load_config(path, ["stages.sft.name=1e3"])


def test_an_output_dir_under_a_file_fails_preflight(tmp_path):
    (tmp_path / "afile").write_text("x")
    data = _tiny(tmp_path)
    data["output_dir"] = str(tmp_path / "afile")
    data["stages"][1]["output_dir"] = str(tmp_path / "afile" / "grpo")
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    assert f"output_dir: {tmp_path / 'afile'} cannot be a directory: {tmp_path / 'afile'} is a file" in str(err.value)
    assert "stages[1].output_dir:" in str(err.value)


def test_more_prompts_per_round_than_rows_fails_preflight(tmp_path):
    """A GRPO iteration samples its prompts without repeats: with fewer rows, every iteration trained on fewer groups
    than configured (dynamic sampling even reported no shortfall) and workers got unequal shares."""
    data = _tiny(tmp_path)
    data["stages"][1]["data"] = {"synthetic": "addition", "num_rows": 3}
    prompts = tmp_path / "two.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    data["stages"][3]["data"] = {"path": str(prompts)}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(_write(tmp_path, data)))
    text = str(err.value)
    assert "stages[1] (grpo).grpo.prompts_per_iter: 4 prompts per round, but the stage's data has 3 usable rows" in text
    assert "stages[3] (length).grpo.prompts_per_iter: 4 prompts per round, but the stage's data has 2 usable" in text


def test_a_stage_refuses_fewer_rows_than_a_round_needs():
    from dsalign.alignment.data import DataError
    from dsalign.pipelines.stages import enough_rows

    assert enough_rows([{}] * 4, 4, "grpo.prompts_per_iter") == [{}] * 4
    with pytest.raises(DataError, match=r"grpo.prompts_per_iter is 16 prompts per round but the stage has 5 usable"):
        enough_rows([{}] * 5, 16, "grpo.prompts_per_iter")


def test_a_warmup_longer_than_the_stage_is_noted():
    """It runs (as in other trainers) but the learning rate never reaches lr: `run` and `config show` say so."""
    from dsalign.pipelines.config import config_notes

    assert config_notes(load_config(TINY)) == [] and config_notes(load_config(DEMO)) == []
    assert config_notes(load_config(TINY, ["stages.sft.sft.optim.warmup_steps=10"])) == [
        "stages[0] (sft).sft.optim.warmup_steps is 10 but the stage makes 4 optimizer steps: its learning rate peaks "
        "at 0.4x lr and never decays"]  # fmt: skip


def test_a_saved_dataset_dict_is_read_at_its_split(tmp_path):
    """A DatasetDict saved to disk (train / test) could only be read at 'train': data.split picks a stage's split,
    eval.split (default 'test') the held-out one."""
    import datasets
    from dsalign.pipelines.stages import held_out_prompts, stage_file_rows

    rows = {name: [{"prompt": f"{name} {i}+1?", "answer": str(i + 1)} for i in range(n)]
            for name, n in (("train", 6), ("test", 3))}  # fmt: skip
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(tmp_path / "ds")
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"eval.path={tmp_path / 'ds'}",
                             f"stages.grpo.data={{path: {tmp_path / 'ds'}}}", "stages.grpo.grpo.prompts_per_iter=2"])
    assert [r["prompt"][0]["content"] for r in held_out_prompts(cfg)] == ["test 0+1?", "test 1+1?", "test 2+1?"]
    assert len(stage_file_rows(cfg.stages[1].data, "prompt")[0]) == 6
    only_test = load_config(TINY, [f"stages.grpo.data={{path: {tmp_path / 'ds'}, split: test}}"]).stages[1].data
    assert [r["answer"] for r in stage_file_rows(only_test, "prompt")[0]] == ["1", "2", "3"]
    with pytest.raises(ValueError, match=r"no split 'dev'; available: train, test \(a run config picks one with "
                                         r"data.split or eval.split\)"):  # fmt: skip
        held_out_prompts(load_config(TINY, [f"eval.path={tmp_path / 'ds'}", "eval.split=dev"]))
