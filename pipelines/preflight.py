"""Checks that run before any Ray actor starts: every problem a config can have that is visible up front.

Data files exist, reward specs import (with their parameters), checkpoints have a config and weights, the tokenizer
is there, GRPO's algorithm names are registered, resources make sense for the stage (split mode has rollout workers,
a local Ray fits every stage's placement group), and the output directory is writable. All problems are reported
together, each naming its stage and key. (Value ranges are checked earlier, when the config is loaded.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsalign.model import ModelConfig, check_checkpoint

from .config import ModelSource, RewardEntry, RunConfig, StageConfig
from .placement import stage_layout, total_cpus
from .schema import ConfigError, to_dict
from .stages import (
    HELD_OUT_SEED,
    RUNTIME_OVERRIDES,
    SAMPLE_COLUMNS,
    STAGE_SKIP_ADVICE,
    TOKEN_ID_FIELDS,
    data_columns,
    lora_settings,
    prompt_file_rows,
    stage_file_rows,
)


class PreflightError(ConfigError):
    """One or more problems found before starting; ``problems`` lists them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("config problems found before starting:\n  - " + "\n  - ".join(problems))


def _check_model(src: ModelSource, where: str, problems: list[str],
                 built: dict[str, ModelConfig | None] | None = None) -> ModelConfig | None:  # fmt: skip
    """The source's problems; returns the config its model would have (None when unknown or broken). ``built``:
    the configs of the stages before this one, by name, for a ``from_stage`` source."""
    model_cfg = None
    if src.from_stage is not None:
        fixed = sorted(set(src.overrides) - set(RUNTIME_OVERRIDES))
        if fixed:
            problems.append(f"{where}.overrides: {fixed} cannot change the architecture of stage "
                            f"{src.from_stage!r}'s output (a checkpoint); only the runtime switches "
                            f"{list(RUNTIME_OVERRIDES)} apply to it")  # fmt: skip
        return (built or {}).get(src.from_stage)
    if src.preset is not None:
        # set from the run's tokenizer when a preset is instantiated (``stages.load_source``), so not overridable
        taken = [k for k in ("vocab_size", *TOKEN_ID_FIELDS) if k in src.overrides]
        if taken:
            problems.append(f"{where}.overrides: {taken} come from the run's tokenizer for a preset model (the "
                            "vocabulary is sized to it, the special token ids are its own); remove them, or change "
                            "the tokenizer")  # fmt: skip
        try:
            model_cfg = ModelConfig.preset(src.preset)
            if src.overrides:
                model_cfg = model_cfg.replace(**src.overrides)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{where}: {e}")
    elif src.checkpoint is not None:
        path = Path(src.checkpoint)
        fixed = sorted(set(src.overrides) - set(RUNTIME_OVERRIDES))
        if fixed:
            problems.append(f"{where}.overrides: {fixed} cannot change a checkpoint's architecture; only the runtime "
                            f"switches {list(RUNTIME_OVERRIDES)} apply to a checkpoint")  # fmt: skip
        if not path.is_dir():
            problems.append(f"{where}.checkpoint: {path} " + ("is a file, not a checkpoint directory" if path.exists()
                                                                else "does not exist"))  # fmt: skip
        elif not (path / "config.json").is_file():
            problems.append(f"{where}.checkpoint: {path} has no config.json")
        elif not any(path.glob("*.safetensors")):
            problems.append(f"{where}.checkpoint: {path} has no *.safetensors weights")
        else:
            try:
                # config.json, shard headers, weights' keys and layers; no tensor. Missing MTP weights as the stages
                # load them (``load_source``: fresh MTP modules, trained by any stage with mtp_lambda > 0)
                model_cfg = check_checkpoint(path, missing_mtp="init")
            except (ValueError, FileNotFoundError) as e:
                problems.append(f"{where}.checkpoint: {e}")
    return model_cfg


def _check_expert_parallel(stage: StageConfig, model_cfg: ModelConfig | None, where: str, problems: list[str]) -> None:
    """Expert parallelism gives each of ``ep_size`` ranks an equal slice of every MoE layer's routed experts."""
    ep = stage.resources.ep_size
    if model_cfg is not None and ep > 1 and model_cfg.n_routed_experts % ep:
        problems.append(f"{where}.resources.ep_size: {ep} does not divide the model's {model_cfg.n_routed_experts} "
                        "routed experts (each rank holds an equal share); use a divisor")  # fmt: skip


def _check_algorithm_names(stage: StageConfig, where: str, problems: list[str]) -> None:
    """GRPO picks its advantage estimator, policy loss, loss aggregation and KL estimator by name from registries."""
    from dsalign.alignment.advantages import ADVANTAGE_ESTIMATORS
    from dsalign.alignment.kl import KL_ESTIMATORS
    from dsalign.alignment.policy_loss import LOSS_AGGREGATIONS, POLICY_LOSSES

    choices = (("advantage", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES), ("loss_agg", LOSS_AGGREGATIONS),
               ("kl_estimator", KL_ESTIMATORS))  # fmt: skip
    for key, registry in choices:
        value = getattr(stage.grpo, key)
        if value not in registry:
            known = ", ".join(registry.names())
            problems.append(f"{where}.grpo.{key}: unknown {registry.kind} {value!r}; known: {known}")


def _check_shares(stage: StageConfig, where: str, problems: list[str]) -> None:
    """Every worker takes an equal share of a step's batch, so all of them run the same number of micro-batches."""
    world = stage.resources.num_workers
    if world == 1:
        return
    prompts = None  # (key, prompts per step) of the stages that sample
    if stage.kind == "grpo":
        prompts = ("grpo.prompts_per_iter", stage.grpo.prompts_per_iter)
    elif stage.on_policy_distill:
        prompts = ("distill.on_policy.prompts_per_step", stage.distill.on_policy.prompts_per_step)
    if prompts is not None:
        key, per = prompts
        if per % world:
            problems.append(f"{where}.{key}: {per} prompts do not split evenly over num_workers {world}; use a "
                            f"multiple of {world}")  # fmt: skip
        return
    sft, block = (stage.sft, "sft") if stage.kind == "sft" else (stage.distill.sft, "distill.sft")
    if sft.batch_size < world or (sft.micro_batch_size and sft.batch_size % world):
        problems.append(f"{where}.{block}.batch_size: {sft.batch_size} conversations do not give each of the "
                        f"{world} workers an equal share; use a multiple of {world}")  # fmt: skip


def _check_lora(stage: StageConfig, where: str, problems: list[str]) -> None:
    lora = stage.training.lora
    if lora is None:
        return
    where = f"{where}.training.lora"
    res = stage.resources
    if res.zero_stage == 3:
        problems.append(f"{where}: not with resources.zero_stage: 3 (the merged export folds adapters into weights "
                        "ZeRO-3 keeps partitioned); use zero_stage 0-2")  # fmt: skip
    if lora.experts and res.ep_size > 1:
        problems.append(f"{where}.experts: not with resources.ep_size > 1 (got {res.ep_size}): expert adapters are "
                        "not sharded with their experts; adapt attention only or use ep_size 1")  # fmt: skip
    try:
        lora_settings(lora)
    except ValueError as e:
        problems.append(f"{where}: {e}")


def _check_resources(stage: StageConfig, where: str, local_cpus: float | None, problems: list[str]) -> None:
    """Mode/worker combinations that cannot work, and (on a local Ray we start) a placement group that cannot fit."""
    res = stage.resources
    where = f"{where}.resources"
    if res.mode == "split":
        if stage.kind != "grpo":
            problems.append(f"{where}.mode: 'split' applies to GRPO stages only (this is a {stage.kind} stage)")
        elif res.rollout_workers < 1:
            problems.append(
                f"{where}: mode 'split' needs rollout_workers >= 1 (got {res.rollout_workers}); set e.g. "
                "rollout_workers: 1, or use mode: colocated (the trainer's own model decodes)"
            )
        if res.zero_stage == 3:
            problems.append(
                f"{where}: mode 'split' broadcasts rank 0's full weights, which ZeRO stage 3 partitions; "
                "use zero_stage 0-2"
            )
    elif (stage.kind == "grpo" or stage.on_policy_distill) and res.zero_stage == 3:
        what = "a colocated GRPO stage" if stage.kind == "grpo" else "on-policy distillation"
        problems.append(
            f"{where}.zero_stage: 3 partitions every weight outside the forward pass, but {what} "
            "decodes with the trainer's model between steps (the rollout engine reads the weights directly); use "
            "zero_stage 0-2"
        )
    if res.zero_stage == 3 and res.ep_size > 1:
        problems.append(
            f"{where}: zero_stage 3 with ep_size {res.ep_size}: DeepSpeed does not support MoE under stage 3; use "
            "zero_stage 0-2 with expert parallelism, or ep_size 1 with zero_stage 3"
        )
    if res.mode != "split" and res.rollout_workers:
        problems.append(
            f"{where}.rollout_workers: {res.rollout_workers} set, but mode is {res.mode!r}; set mode: split"
        )
    if res.num_workers > 1 and 0 < res.gpus_per_worker < 1:
        problems.append(
            f"{where}: num_workers {res.num_workers} with gpus_per_worker {res.gpus_per_worker:g} lets Ray put two "
            "trainer ranks on one GPU, which NCCL refuses (duplicate GPU in one group); use gpus_per_worker: 1 (or 0)"
        )
    if res.reward_workers and stage.kind == "sft":
        problems.append(f"{where}.reward_workers: an sft stage scores no rewards; remove reward_workers")
    layout = stage_layout(res, stage.kind)
    gpus = sum(b.get("GPU", 0.0) for b in layout.bundles)
    if local_cpus is not None and gpus > 0:
        import torch

        if gpus > torch.cuda.device_count():
            problems.append(f"{where}: the stage reserves {gpus:g} GPUs but this machine has "
                            f"{torch.cuda.device_count()}; set gpus_per_worker: 0")  # fmt: skip
    if local_cpus is not None and total_cpus(layout) > local_cpus:
        problems.append(
            f"{where}: the stage's placement group needs {total_cpus(layout):g} CPUs ({layout.bundles}) but the "
            f"local Ray has {local_cpus:g} (ray.num_cpus); lower the *cpus_per_worker values (fractions such as 0.5 "
            "are allowed) or the worker counts"
        )


def _run_tokenizer(cfg: RunConfig):
    """The tokenizer the run will use (``prepare_tokenizer``'s: the demo one is deterministic in the task); made
    once per task (a tokenizer directory is read each time: it may change between runs)."""
    if cfg.tokenizer != "demo":
        return _make_run_tokenizer(cfg)
    key = json.dumps(to_dict(cfg.task), sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = _make_run_tokenizer(cfg)
    return _TOKENIZERS[key]


_TOKENIZERS: dict[str, object] = {}


def _make_run_tokenizer(cfg: RunConfig):
    if cfg.tokenizer == "demo":
        from .demo_tokenizer import task_tokenizer

        return task_tokenizer(cfg.task)
    from .stages import load_tokenizer

    return load_tokenizer(cfg.tokenizer)


def _vocab_size(checkpoint: Path) -> int | None:
    """``vocab_size`` of a checkpoint's config.json; None when it has none that reads (``_check_model`` says why)."""
    try:
        return int(json.loads((checkpoint / "config.json").read_text()).get("vocab_size", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _check_vocabulary(cfg: RunConfig, problems: list[str], finished: dict[str, str] | None = None) -> None:
    """A checkpoint a stage starts from must read token ids as the run's tokenizer writes them: its embedding must
    cover the tokenizer, and a tokenizer shipped beside it must be the same vocabulary. ``finished`` (a resumed
    run's finished stages and their outputs): a stage still to run from one of them is checked alike, since the
    run's tokenizer may have changed since (another ``task`` retrains the demo tokenizer)."""
    sources = []
    for i, stage in enumerate(cfg.stages):
        if finished and stage.name in finished:
            continue
        where = f"stages[{i}] ({stage.name})"
        sources.append((f"{where}.model", stage.model))
        if stage.kind == "distill":
            sources.append((f"{where}.distill.teacher", stage.distill.teacher))
    external = [(f"{w}.checkpoint", Path(s.checkpoint)) for w, s in sources if s.checkpoint]
    external += [(f"{w}.from_stage ({s.from_stage!r}, finished earlier)", Path(finished[s.from_stage]))
                 for w, s in sources if s.from_stage and s.from_stage in (finished or {})]  # fmt: skip
    external = [(w, path, _vocab_size(path)) for w, path in external]
    external = [(w, path, rows) for w, path, rows in external if rows is not None]  # (others already reported)
    if not external:
        return
    from .stages import load_tokenizer

    tok = _run_tokenizer(cfg)
    run_vocab = tok.get_vocab()
    for where, path, rows in external:
        if rows < len(tok):
            problems.append(f"{where}: {path} embeds {rows} tokens but the run's tokenizer "
                            f"({cfg.tokenizer}) has {len(tok)}; set tokenizer: to the checkpoint's own")  # fmt: skip
        elif any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            try:
                theirs = load_tokenizer(path).get_vocab()
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if theirs != run_vocab:
                differ = sum(theirs.get(t) != i for t, i in run_vocab.items())
                sizes = f"{len(theirs)} vs {len(run_vocab)} tokens, {differ} of the run's with other ids"
                fix = (f"set tokenizer: {path}" if "finished earlier" not in where else "the run's tokenizer changed "
                       "since that stage ran (task or tokenizer settings): restore them, or run afresh without "
                       "--resume")  # fmt: skip
                problems.append(f"{where}: the tokenizer saved with {path} differs from the run's (tokenizer: "
                                f"{cfg.tokenizer}; {sizes}): token ids would mean other tokens; {fix}")


def _check_prompt_lengths(rows: list[dict], path: str, models: list[ModelConfig], cfg: RunConfig, where: str,
                          problems: list[str], advice: str) -> None:  # fmt: skip
    """Prompts the models that sample from them have no room to generate after (a worker would fail on them)."""
    if not models or any(p.startswith("tokenizer:") for p in problems):
        return
    from .stages import long_prompts_problem, too_long_prompts

    context = min(m.max_position_embeddings for m in models)
    long = too_long_prompts(rows, _run_tokenizer(cfg), context)
    if long:
        problems.append(f"{where}: {long_prompts_problem(path, long, context)}{advice}")


def _missing_gold(rows: list[dict], what: str) -> str | None:
    """``math_accuracy``'s gold is the ``answer`` column, else ``solution``: a row without one (absent, null, empty
    or NaN) would score None on every sample. The problem, or None."""
    from dsalign.rewards.accuracy import gold_missing

    gold = "answer" if "answer" in rows[0] else "solution"
    missing = [str(r["prompt_id"]) for r in rows if gold_missing(r.get(gold))]
    if not missing:
        return None
    column = f"'{gold}'" if gold in rows[0] else "'answer' (or 'solution')"
    return (f"{len(missing)} of {len(rows)} rows have no {column} {what} (first: {', '.join(missing[:3])}); "
            "math_accuracy reads the gold answer from the 'answer' column, else 'solution'")


def _check_eval_file(cfg: RunConfig, problems: list[str]) -> list[dict] | None:
    """The held-out file exists, parses, and (for the default ``math_accuracy``) every row the evaluation takes has
    a gold answer. Returns the rows the evaluation takes (None when the file failed)."""
    if not Path(cfg.eval.path).exists():
        problems.append(f"eval.path: {cfg.eval.path} does not exist")
        return None
    try:
        rows = prompt_file_rows(cfg.eval.path, cfg.eval.num_prompts, split=cfg.eval.split)
    except ValueError as e:  # DataError names the file, row and field
        problems.append(f"eval.path: {e}")
        return None
    if not rows:
        problems.append(f"eval.path: {cfg.eval.path} has no rows")
        return None
    if cfg.eval.reward.fn == "math_accuracy" and (problem := _missing_gold(rows, "to check completions against")):
        problems.append(f"eval.path: {problem}")
    return rows


REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what the reward call passes besides the columns


def _reward_columns(rows: list[dict] | None, where: str, problems: list[str]) -> set[str] | None:
    """The columns rewards are called with on these rows (every data column but the prompt, plus ``finish_reason``:
    ``stages.sample_columns``), or None without rows (reported elsewhere). A data column named like one of the
    call's own arguments or sample columns is a problem: the call would fail, or overwrite it."""
    if not rows:
        return None
    columns = set(data_columns(rows[0]))
    clash = sorted(columns & {*REWARD_ARGUMENTS, *SAMPLE_COLUMNS})
    if clash:
        problems.append(f"{where}: column(s) {clash} of the data clash with what the reward call passes itself "
                        f"({', '.join(REWARD_ARGUMENTS + SAMPLE_COLUMNS)}); rename them")  # fmt: skip
    return columns | set(SAMPLE_COLUMNS)


def _stage_columns(cfg: RunConfig, stage: StageConfig, file_rows: list[dict] | None, where: str,
                   problems: list[str]) -> set[str] | None:  # fmt: skip
    """A stage's reward columns (``_reward_columns``), its data file's or its synthetic prompts'."""
    from .demo_task import make_prompts

    if stage.data.synthetic is not None:
        file_rows = make_prompts(cfg.task, 1, stage.data.seed, budget=stage.data.length_target)
    return _reward_columns(file_rows, f"{where}.data.path", problems)


def _check_stage_data(stage: StageConfig, where: str, problems: list[str]) -> list[dict] | None:
    """A stage's data file exists and parses with the schema its kind reads (conversations for SFT, prompts for GRPO
    and distillation), keeps at least one row, and, when the stage's rewards include ``math_accuracy``, gives every
    prompt an ``answer``. The whole file is read: a bad row found here costs nothing, found by a worker it costs the
    stages before it. Returns the rows read (None without a file or when it failed)."""
    path = stage.data.path
    if path is None:
        return None
    if not Path(path).exists():
        problems.append(f"{where}.data.path: {path} does not exist")
        return None
    try:
        rows, _ = stage_file_rows(stage.data, "conversation" if stage.kind == "sft" else "prompt")
    except ValueError as e:  # DataError names the file, row and field
        problems.append(f"{where}.data.path: {e}")
        return None
    if not rows:
        problems.append(f"{where}.data.path: {path} has no usable rows")
        return None
    _check_rows_per_round(stage, where, len(rows), problems)
    gold_checked = stage.kind != "sft" and any(e.fn == "math_accuracy" for e in stage.rewards)
    if gold_checked and (problem := _missing_gold(rows, "for the stage's math_accuracy reward")):
        problems.append(f"{where}.data.path: {problem}")
    return rows


def _check_rows_per_round(stage: StageConfig, where: str, usable: int, problems: list[str]) -> None:
    """A GRPO iteration (an on-policy distillation step) takes its prompts from the stage's rows without repeats:
    with fewer rows than it asks for, every round would train on fewer groups than configured, silently."""
    if stage.kind == "grpo":
        key, per_round = "grpo.prompts_per_iter", stage.grpo.prompts_per_iter
    elif stage.on_policy_distill:
        key, per_round = "distill.on_policy.prompts_per_step", stage.distill.on_policy.prompts_per_step
    else:
        return
    if usable < per_round:
        problems.append(f"{where}.{key}: {per_round} prompts per round, but the stage's data has {usable} usable "
                        f"rows; lower {key} or give the stage more rows")  # fmt: skip


def _check_reward(entry: RewardEntry, where: str, problems: list[str], columns: set[str] | None = None) -> None:
    """The reward spec imports and takes its ``params``; with the data's ``columns`` known, every required
    parameter is filled by the call, a param or a column (else it would fail on every sample), and no param is
    also a column (the column's value would silently win)."""
    from dsalign.rewards import load_reward, unfilled_parameters

    shadowed = sorted(set(entry.params) & (columns or set()))
    if shadowed:
        problems.append(f"{where}.params {shadowed}: also column(s) of the data, whose values the call would pass "
                        "instead; rename the param or the column")  # fmt: skip
    try:
        reward = load_reward(entry.fn, **entry.params)
        unfilled = [] if columns is None else unfilled_parameters(reward, columns)
    except Exception as e:  # noqa: BLE001 - any import-time failure of user code is a config problem
        problems.append(f"{where}.fn {entry.fn!r}: {type(e).__name__}: {e}")
        return
    if unfilled:
        problems.append(f"{where}.fn {entry.fn!r}: nothing fills its required parameter(s) {unfilled}: they are "
                        f"not in params and not columns of the data ({sorted(columns)}); set them under "
                        "params")  # fmt: skip


def preflight(cfg: RunConfig, finished: dict[str, str] | None = None) -> None:
    """Raise ``PreflightError`` listing every problem found; return quietly when the run can start. ``finished``:
    the stages a resumed run will not run again, and their outputs."""
    problems: list[str] = []
    if not cfg.stages:
        problems.append("stages: a run needs at least one stage (sft, grpo or distill)")
    if cfg.tokenizer != "demo":
        tok = Path(cfg.tokenizer)
        if not (tok / "tokenizer_config.json").is_file() and not (tok / "tokenizer.json").is_file():
            problems.append(f"tokenizer: {tok} is not a tokenizer directory (no tokenizer.json)")
        else:
            try:
                _run_tokenizer(cfg)
            except ValueError as e:
                problems.append(f"tokenizer: {e}")
    local = cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")  # a Ray we start here: capacity known
    local_cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1) if local else None
    built: dict[str, ModelConfig | None] = {}  # each stage's model config (its output's), for from_stage sources
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}] ({stage.name})"
        built[stage.name] = _check_model(stage.model, f"{where}.model", problems, built)
        _check_expert_parallel(stage, built[stage.name], where, problems)
        _check_resources(stage, where, local_cpus, problems)
        _check_lora(stage, where, problems)
        _check_shares(stage, where, problems)
        teacher = _check_model(stage.distill.teacher, f"{where}.distill.teacher", problems, built) if (
            stage.kind == "distill") else None  # fmt: skip
        if stage.kind == "grpo":
            _check_algorithm_names(stage, where, problems)
            model_cfg = built[stage.name]
            if stage.grpo.speculative and model_cfg is not None and model_cfg.num_nextn_predict_layers < 1:
                problems.append(f"{where}.grpo.speculative: the model has no MTP module to draft with "
                                "(num_nextn_predict_layers 0); set it to false")
        if stage.data.synthetic is not None:
            _check_rows_per_round(stage, where, stage.data.num_rows, problems)
        if stage.data.synthetic is not None and stage.data.num_rows and cfg.eval.path is None:
            distinct = cfg.task.num_distinct()
            if stage.data.num_rows + cfg.eval.num_prompts > distinct:
                problems.append(
                    f"{where}.data.num_rows: {stage.data.num_rows} synthetic rows plus {cfg.eval.num_prompts} "
                    f"held-out prompts exceed the {distinct} distinct problems the task can make (task: "
                    f"min_terms {cfg.task.min_terms}, max_terms {cfg.task.max_terms}, max_value {cfg.task.max_value})"
                )
        rows = _check_stage_data(stage, where, problems)
        if rows and stage.kind != "sft" and not stage.data.skip_invalid:  # (with it, the stage drops and counts them)
            traces = stage.kind == "distill" and not stage.on_policy_distill  # only the teacher samples
            sampled_by = [teacher] if traces else [built[stage.name], teacher]
            _check_prompt_lengths(rows, stage.data.path, [c for c in sampled_by if c], cfg, f"{where}.data.path",
                                  problems, f"; shorten them, or {STAGE_SKIP_ADVICE}")  # fmt: skip
        if stage.kind in ("grpo", "distill") and not stage.rewards and not stage.on_policy_distill:
            problems.append(f"{where}.rewards: a {stage.kind} stage needs at least one reward")
        columns = _stage_columns(cfg, stage, rows, where, problems) if stage.rewards and stage.kind != "sft" else None
        for j, entry in enumerate(stage.rewards):
            _check_reward(entry, f"{where}.rewards[{j}]", problems, columns)
    if cfg.eval.enabled:
        if cfg.eval.path is not None:
            eval_rows = _check_eval_file(cfg, problems)
        else:  # the synthetic held-out prompts
            from .demo_task import make_prompts

            eval_rows = make_prompts(cfg.task, 1, HELD_OUT_SEED)
        columns = _reward_columns(eval_rows, "eval.path", problems)
        if cfg.eval.path is not None and eval_rows:  # every stage's model is evaluated on them
            _check_prompt_lengths(eval_rows, cfg.eval.path, [c for c in built.values() if c], cfg, "eval.path",
                                  problems, "; shorten them or lower eval.num_prompts")  # fmt: skip
        _check_reward(cfg.eval.reward, "eval.reward", problems, columns)
    for key, out in [("output_dir", Path(cfg.output_dir))] + [
        (f"stages[{i}].output_dir", Path(s.output_dir)) for i, s in enumerate(cfg.stages) if s.output_dir
    ]:
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            problems.append(f"{key}: {out} cannot be a directory: {blocker} is a file")
            continue
        probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK):
            problems.append(f"{key}: {out} is not writable")
    if not any(p.startswith("tokenizer:") for p in problems):
        _check_vocabulary(cfg, problems, finished)
    if problems:
        raise PreflightError(problems)
