"""What runs inside a stage worker: model loading, data, and the SFT / GRPO / distillation loops.

Every loop is resumable exactly: the data a step sees is a pure function of (seed, step), so a stage's checkpoint
only needs the trainer state (model, optimizer, scheduler, RNG) and the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dsalign.model import ModelConfig, Transformer, load_checkpoint

from .config import DataSource, GRPOParams, LoraConfig, OptimConfig, RunConfig, SFTParams, StageConfig
from .demo_task import LENGTH_INSTRUCTION, make_prompts, make_sft_conversations, operand_sets
from .report import MetricsLogger

HELD_OUT_SEED = 987_654


@dataclass(frozen=True)
class Fault:
    """Testing hook, from ``DSALIGN_FAULT=<stage>:<step>[:raise][@<rank>]``: after step ``step``'s checkpoint the
    worker process exits (default) or raises (``raise``: the process lives on, as after an ordinary bug), on every
    rank or only on ``rank``."""

    step: int
    raises: bool = False
    rank: int | None = None

    @classmethod
    def parse(cls, spec: str) -> tuple[str, Fault]:
        """(stage name, fault) of a ``DSALIGN_FAULT`` value; a malformed value raises naming the expected form."""
        body, _, rank = spec.partition("@")
        parts = body.split(":")
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "raise"):
                raise ValueError
            return parts[0], cls(int(parts[1]), len(parts) == 3, int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"DSALIGN_FAULT={spec!r}: expected <stage>:<step>[:raise][@<rank>]") from None


@dataclass
class StageEnv:
    """What a stage needs besides its config; built by the worker."""

    run: RunConfig
    stage: StageConfig
    out_dir: Path
    tokenizer: Any
    sources: dict[str, Any]
    resume: bool
    fault: Fault | None = None  # testing hook (``DSALIGN_FAULT``): fail right after a step's checkpoint
    rollout_pool: Any = None  # split-mode GRPO: ``pools.RolloutPool`` (None: decode with the trainer's own model)
    reward_pool: Any = None  # ``pools.RewardPool`` (None: score in this process with ``build_combiner``)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_tokenizer(path: str | Path):
    """An HF tokenizer directory; one without a pad token pads with its EOS token (as TRL does). A directory whose
    tokenizer files do not load is a ``ValueError`` naming it (transformers' own errors name no file)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - JSON, OSError, tokenizers' own exceptions: all mean unreadable files
        raise ValueError(f"{path}: the tokenizer does not load ({type(e).__name__}: {e})") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def padded_vocab(tokenizer) -> int:
    return int(math.ceil(len(tokenizer) / 64) * 64)


RUNTIME_OVERRIDES = ("fp8", "fp8_pow2_scales")  # ModelConfig switches that apply to a loaded checkpoint
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # a preset takes these from the tokenizer


def stage_device(stage: StageConfig) -> torch.device:
    """Where a stage's trainer worker computes: its GPU when the stage reserves GPUs (Ray restricts the worker's
    ``CUDA_VISIBLE_DEVICES`` to its own), else the CPU. Models, reference, teacher and batches go there."""
    if stage.resources.gpus_per_worker <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"stage {stage.name!r} reserves gpus_per_worker={stage.resources.gpus_per_worker} but "
                           "torch sees no CUDA device in its worker (CPU-only torch build, or no GPU "
                           "assigned)")  # fmt: skip
    return torch.device("cuda", torch.cuda.current_device())


def load_source(src: dict[str, Any], tokenizer, seed: int = 0) -> Transformer:
    """A model from a preset (vocab sized to the tokenizer, initialized from ``seed``) or an HF checkpoint dir."""
    overrides = dict(src.get("overrides") or {})
    if src.get("preset"):
        ids = {k: getattr(tokenizer, k) for k in TOKEN_ID_FIELDS}
        cfg = ModelConfig.preset(src["preset"]).replace(vocab_size=padded_vocab(tokenizer), **ids, **overrides)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return Transformer(cfg)
    model = load_checkpoint(src["checkpoint"], missing_mtp="init")
    if overrides:  # preflight refused any other key for a checkpoint
        runtime = {k: v for k, v in overrides.items() if k in RUNTIME_OVERRIDES}
        if runtime:
            fresh = Transformer(model.cfg.replace(**runtime))
            fresh.load_state_dict(model.state_dict())
            fresh.generation_eos_token_ids = model.generation_eos_token_ids
            model = fresh
    return model


# ---------------------------------------------------------------------------------------------------- data
STAGE_SKIP_ADVICE = "set the stage's data.skip_invalid: true to drop (and count) them"


def training_prompts(run: RunConfig, data: DataSource, summary_dir: Path | None = None) -> list[dict[str, Any]]:
    """Prompt rows (``prompt`` messages, ``answer``, ...) of a stage; synthetic rows never overlap held-out ones.
    With ``summary_dir`` (the stage's directory, rank 0) the rows' origin goes to ``data.json`` there."""
    if data.synthetic is not None:
        held = make_prompts(run.task, run.eval.num_prompts, HELD_OUT_SEED)
        rows = make_prompts(run.task, data.num_rows, data.seed, exclude=operand_sets(held), budget=data.length_target)
        write_data_summary(summary_dir, f"synthetic: {data.synthetic}", rows, None)
        return rows
    rows, report = stage_file_rows(data, "prompt")
    write_data_summary(summary_dir, data.path, rows, report)
    return rows


def too_long_prompts(rows: list[dict[str, Any]], tokenizer, context: int) -> list[tuple[str, int]]:
    """``(prompt_id, tokens)`` of the prompts that leave no room to generate in a ``context``-token model (the
    chat template applied, as the rollout tokenizes them)."""
    from dsalign.alignment.chat import tokenize_prompt

    lengths = ((r["prompt_id"], len(tokenize_prompt(tokenizer, r["prompt"]))) for r in rows)
    return [(pid, n) for pid, n in lengths if n >= context]


def long_prompts_problem(path: str, long: list[tuple[str, int]], context: int) -> str:
    names = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:3]) + (", ..." if len(long) > 3 else "")
    return (f"{path}: {len(long)} prompt(s) do not fit the model's context of {context} tokens with room to "
            f"generate: {names}")


def prompts_that_fit(rows: list[dict[str, Any]], data: DataSource, tokenizer, context: int,
                     stage_dir: Path | None) -> list[dict[str, Any]]:  # fmt: skip
    """A data file's prompt rows, refusing (``DataError``) the ones too long to sample from (``too_long_prompts``),
    or with ``skip_invalid`` dropping them, counted in ``data.json``. Preflight runs the same check first."""
    from dsalign.alignment.data import DataError

    long = too_long_prompts(rows, tokenizer, context) if data.path is not None else []
    if not long:
        return rows
    problem = long_prompts_problem(data.path, long, context)
    if not data.skip_invalid:
        raise DataError(f"{problem}; shorten them, or {STAGE_SKIP_ADVICE}")
    count_skipped(stage_dir, len(long), problem + ": dropped")
    dropped = {pid for pid, _ in long}
    return [r for r in rows if r["prompt_id"] not in dropped]


def stage_prompts(env: StageEnv, context: int) -> list[dict[str, Any]]:
    """The stage's prompt rows (``training_prompts``) that fit a ``context``-token model (``prompts_that_fit``)."""
    rows = training_prompts(env.run, env.stage.data, summary_dir(env))
    return prompts_that_fit(rows, env.stage.data, env.tokenizer, context, summary_dir(env))


def enough_rows(rows: list[dict[str, Any]], per_round: int, key: str) -> list[dict[str, Any]]:
    """``rows``, if a round's ``per_round`` prompts fit in them: with fewer, every round would train on fewer groups
    than configured without a word (and workers would get unequal shares, so their collectives would not pair up).
    Preflight checks this too; here it covers rows that ``skip_invalid`` dropped since."""
    from dsalign.alignment.data import DataError

    if len(rows) < per_round:
        raise DataError(f"{key} is {per_round} prompts per round but the stage has {len(rows)} usable rows; lower "
                        f"{key} to at most {len(rows)} or give the stage more rows")  # fmt: skip
    return rows


def stage_file_rows(data: DataSource, schema: str):
    """A stage's data file as rows of ``schema`` ("prompt" or "conversation") with the loader's ``LoadReport``: the
    stage's ``skip_invalid`` (and how to set it, in the error), its first ``num_rows``, its ``length_target``."""
    rows, report = _file_rows(data.path, schema, data.num_rows, data.length_target, data.skip_invalid,
                              STAGE_SKIP_ADVICE, data.split)  # fmt: skip
    if data.num_rows and data.num_rows > len(rows):
        print(f"[data] {data.path}: num_rows is {data.num_rows} but the file has {len(rows)} usable rows; using all "
              f"{len(rows)}", flush=True)  # fmt: skip
    return rows, report


def prompt_file_rows(path: str, num_rows: int | None, budget: int | None = None, split: str = "test") -> list[dict]:
    """The first ``num_rows`` (None or 0 = all) rows of a prompt file (of a saved DatasetDict: its ``split``); with
    ``budget``, each prompt carries the length instruction in its system turn and a ``length_target`` column, as the
    synthetic task's budget prompts do. Malformed rows are an error (the evaluation's files have no skip option)."""
    return _file_rows(path, "prompt", num_rows, budget, False, None, split)[0]


def _file_rows(path: str, schema: str, num_rows: int | None, budget: int | None, skip_invalid: bool,
               skip_advice: str | None, split: str = "train"):  # fmt: skip
    from dsalign.alignment.data import DataConfig, load_records

    ds, report = load_records(DataConfig(path=path, schema=schema, skip_invalid=skip_invalid, skip_advice=skip_advice,
                                         split=split))  # fmt: skip
    rows = first_rows(list(ds), num_rows, path)
    if budget is not None:
        rows = [with_budget(r, budget, "prompt" if schema == "prompt" else "messages") for r in rows]
    return rows, report


def summary_dir(env: StageEnv) -> Path | None:
    """Where rank 0 writes the stage's ``data.json`` (other ranks write nothing)."""
    return env.out_dir if rank_world()[0] == 0 else None


def write_data_summary(stage_dir: Path | None, source: str, rows: list[dict], report) -> None:
    """``<stage_dir>/data.json``: where the stage's rows came from, how many it uses, and the malformed rows
    ``skip_invalid`` dropped (count and the first problems), which the run's report lists. Nothing without a dir."""
    if stage_dir is None:
        return
    from .report import write_text_atomic

    summary = {"source": source, "rows": len(rows), "skipped_invalid": report.num_invalid if report else 0,
               "problems": report.problems[:5] if report else []}  # fmt: skip
    write_text_atomic(Path(stage_dir) / "data.json", json.dumps(summary, indent=1) + "\n")


def count_skipped(stage_dir: Path | None, n: int, problem: str) -> None:
    """Add ``n`` rows dropped after loading (``skip_invalid``) to the stage's ``data.json``, which the report lists."""
    if stage_dir is None or not (Path(stage_dir) / "data.json").is_file():
        return
    from .report import write_text_atomic

    path = Path(stage_dir) / "data.json"
    summary = json.loads(path.read_text())
    summary["rows"] -= n
    summary["skipped_invalid"] += n
    summary["problems"] = [*summary["problems"], problem][:6]
    write_text_atomic(path, json.dumps(summary, indent=1) + "\n")
    print(f"[data] {problem}", flush=True)


def first_rows(rows: list[dict], num_rows: int | None, path: str) -> list[dict]:
    """``rows[:num_rows]`` (None or 0: all), saying so when rows are left out."""
    if not num_rows or num_rows >= len(rows):
        return rows
    print(f"[data] {path}: using the first {num_rows} of {len(rows)} rows (num_rows)", flush=True)
    return rows[:num_rows]


def with_budget(row: dict[str, Any], budget: int, field: str) -> dict[str, Any]:
    """``row`` with the length instruction appended to the system turn of its ``field`` messages."""
    from dsalign.alignment.length_control import with_system_instruction

    messages = with_system_instruction(row[field], LENGTH_INSTRUCTION.format(budget=budget))
    return {**row, field: messages, "length_target": budget}


def held_out_prompts(run: RunConfig, budget: int | None = None) -> list[dict[str, Any]]:
    """The evaluation's prompts: ``eval.path`` (its first ``num_prompts`` rows) or the synthetic task's held-out set
    (never used in training)."""
    if run.eval.path is not None:
        return prompt_file_rows(run.eval.path, run.eval.num_prompts, budget, run.eval.split)
    return make_prompts(run.task, run.eval.num_prompts, HELD_OUT_SEED, budget=budget)


def sft_conversations(run: RunConfig, data: DataSource, summary_dir: Path | None = None) -> list[dict[str, Any]]:
    """An SFT stage's conversations (``training_prompts`` for ``summary_dir``)."""
    if data.synthetic is not None:
        rows = make_sft_conversations(run.task, training_prompts(run, data), seed=data.seed + 1)
        write_data_summary(summary_dir, f"synthetic: {data.synthetic}", rows, None)
        return rows
    rows, report = stage_file_rows(data, "conversation")
    write_data_summary(summary_dir, data.path, rows, report)
    return rows


# ---------------------------------------------------------------------------------------------------- trainer glue
def trainer_config(optim: OptimConfig, total_steps: int, run: RunConfig, stage: StageConfig, **extra: Any):
    from dsalign.alignment.trainer import TrainerConfig

    return TrainerConfig(
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        beta1=optim.betas[0],
        beta2=optim.betas[1],
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=optim.min_lr_ratio,
        grad_clip=optim.grad_clip,
        zero_stage=stage.resources.zero_stage,
        ep_size=stage.resources.ep_size,
        compute_dtype=stage.training.compute_dtype,
        moment_dtype=stage.training.moment_dtype,
        activation_checkpointing=stage.training.activation_checkpointing,
        keep_last=stage.training.keep_last,
        seed=run.seed,
        **extra,
    )


def save_hf(runner, path: Path, tokenizer) -> Path:
    """Export the stage's model with its tokenizer (chat template included) and generation config."""
    from dsalign.alignment.trainer import export_hf

    # the stop ids the stage's model was loaded with (a checkpoint's generation_config.json: an end-of-turn token)
    # stay with its output, after the tokenizer's EOS
    more = sorted(set(getattr(runner.model, "generation_eos_token_ids", ())) - {tokenizer.eos_token_id})
    eos = [tokenizer.eos_token_id, *more] if more else tokenizer.eos_token_id

    def extra(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))
        gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id,
               "do_sample": True, "temperature": 1.0}  # fmt: skip
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    export_hf(runner, path, write_extra=extra)
    return path


class StageLoop:
    """Checkpointing, resume, logging and the fault hook shared by the stage loops."""

    def __init__(self, env: StageEnv, runner, total_steps: int):
        from dsalign.alignment.trainer import latest_checkpoint, load_training_checkpoint

        self.env, self.runner, self.total = env, runner, total_steps
        self.ckpt_root = env.out_dir / "checkpoints"
        self.rank = rank_world()[0]
        self.start = 0
        if env.resume and latest_checkpoint(self.ckpt_root) is not None:
            self.start, _ = load_training_checkpoint(self.ckpt_root, runner)
            print(f"[{env.stage.name}] resumed at step {self.start}", flush=True)
            if self.start > total_steps:
                from .schema import ConfigError

                raise ConfigError(f"stage {env.stage.name!r}: its last checkpoint is at step {self.start} but it is "
                                  f"now configured for {total_steps} steps; set the stage's steps (or iterations) to "
                                  f"{self.start} or more, or run it afresh without --resume")  # fmt: skip
        self.raylet_pid, self.parent_pid = _raylet_pid(), os.getppid()
        self.logger = None
        if self.rank == 0:  # a fresh stage's directory was cleared by the driver (runner.clear_stage_state)
            self.logger = MetricsLogger(env.out_dir, env.stage.name, resumed_at=self.start if env.resume else None)
        self.t0 = time.time()

    def end_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Log step ``step`` (1-based count of finished steps), checkpoint on schedule, honour the fault hook."""
        from dsalign.alignment.trainer import save_training_checkpoint

        if self._node_gone():
            # e.g. a SIGTERM to the run's process group stopped the local Ray node with the driver: nobody will
            # collect this stage, and carrying on would write checkpoints under a `--resume` of the same run
            print(f"[{self.env.stage.name}] this worker's Ray node is gone (raylet {self.raylet_pid}); stopping at "
                  f"step {step} without logging it (the last checkpoint stands)", flush=True)  # fmt: skip
            self.close()  # flush TensorBoard's buffered events
            os._exit(1)
        metrics = {**metrics, "elapsed_s": time.time() - self.t0}
        if self.logger is not None:
            self.logger.log(step, metrics)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k)
            print(f"[{self.env.stage.name}] step {step}/{self.total} {shown}", flush=True)
        if step % self.env.stage.checkpoint_every == 0 or step == self.total:
            save_training_checkpoint(self.ckpt_root, step, self.runner, data_state={"step": step},
                                     keep_last=self.env.stage.training.keep_last)  # fmt: skip
        fault = self.env.fault
        if fault is not None and step == fault.step and fault.rank in (None, rank_world()[0]):
            name, rank = self.env.stage.name, rank_world()[0]
            if fault.raises:
                raise RuntimeError(f"[{name}] fault injection: rank {rank} raises after step {step}")
            print(f"[{name}] fault injection: rank {rank}'s worker exits after step {step}", flush=True)
            os._exit(17)

    def _node_gone(self) -> bool:
        """In a Ray worker whose raylet was visible at the start: that raylet has exited, or this process, its
        child, was re-parented. Never outside Ray (a stage run in-process), nor where the raylet is out of sight
        (a container's process namespace)."""
        if self.raylet_pid is None:
            return False
        reparented = self.parent_pid == self.raylet_pid and os.getppid() != self.parent_pid
        return reparented or not pid_alive(self.raylet_pid)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _raylet_pid() -> int | None:
    """This Ray worker's raylet (Ray sets ``RAY_RAYLET_PID`` in its workers) when it is alive as seen from here."""
    pid = os.environ.get("RAY_RAYLET_PID", "")
    return int(pid) if pid.isdigit() and pid_alive(int(pid)) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---------------------------------------------------------------------------------------------------- SFT
def sft_step_size(num_examples: int, params: SFTParams) -> int:
    """Conversations per step: ``min(batch_size, examples)`` rounded down to a multiple of the data-parallel world,
    so every rank gets the same share and the same number of micro-batches (the ranks' collectives pair up)."""
    _, world = rank_world()
    n = min(params.batch_size, num_examples)
    if n < world:
        raise ValueError(f"SFT: {num_examples} conversations for {world} data-parallel ranks; each rank needs one")
    return n - n % world


def sft_micro_batches(num_examples: int, params: SFTParams) -> int:
    """Micro-batches per step on every rank: its share of ``sft_step_size`` over ``micro_batch_size``."""
    _, world = rank_world()
    share = sft_step_size(num_examples, params) // world
    return -(-share // params.micro_batch_size) if params.micro_batch_size else 1


def sft_batches(examples: list[dict], params: SFTParams, seed: int, step: int, pad_id: int):
    """The packed micro-batches of ``step``: a deterministic function of (seed, step), which makes resume exact.
    Each rank takes every ``world``-th chosen conversation and packs them ``micro_batch_size`` at a time."""
    from dsalign.alignment.packing import pack_examples

    rng = random.Random(seed * 1_000_003 + step)
    chosen = [examples[i] for i in rng.sample(range(len(examples)), sft_step_size(len(examples), params))]
    rank, world = rank_world()  # data parallel: each rank takes its share of the global batch
    share = chosen[rank::world]
    size = params.micro_batch_size or max(1, len(share))
    return [pack_examples(share[i : i + size], max_length=params.max_length * 4, pad_token_id=pad_id)
            for i in range(0, len(share), size)]  # fmt: skip


def run_sft_loop(env: StageEnv, model: Transformer, conversations: list[dict], params: SFTParams) -> Path:
    """Fine-tune ``model`` on conversations (assistant tokens only, plus MTP); returns the exported HF dir."""
    from dsalign.alignment.chat import ConversationError
    from dsalign.alignment.data import DataError
    from dsalign.alignment.sft import SFTConfig, build_sft_examples, sft_loss
    from dsalign.alignment.trainer import prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.model import next_token_targets

    data = env.stage.data
    sft_cfg = SFTConfig(max_length=params.max_length, skip_invalid=data.skip_invalid)
    try:
        examples, skipped = build_sft_examples(conversations, env.tokenizer, sft_cfg)
    except ConversationError as e:  # the same rows fail the same way again: a data error, not retried
        raise DataError(f"{data.path or 'the stage data'}: {e}; {STAGE_SKIP_ADVICE}") from e
    if skipped:
        count_skipped(summary_dir(env), skipped, f"{skipped} conversations with no assistant token within "
                      f"sft.max_length={params.max_length} (or otherwise unmaskable) were dropped")  # fmt: skip
    cfg = trainer_config(params.optim, params.steps, env.run, env.stage, mtp_lambda=params.mtp_lambda,
                         bias_update_gamma=params.bias_update_gamma)  # fmt: skip
    cfg.micro_batches = sft_micro_batches(len(examples), params)
    torch.manual_seed(env.run.seed)
    model = prepare_model(model, cfg)
    lora = apply_stage_lora(model, env.stage)
    runner = build_runner(model, cfg)
    loop = StageLoop(env, runner, params.steps)

    def loss_fn(m, batch):
        return sft_loss(m, batch, mtp_lambda=params.mtp_lambda)

    loss_fn.units = lambda batch: next_token_targets(batch.labels, batch.segment_ids)  # global token mean per step

    for step in range(loop.start, params.steps):
        batches = sft_batches(examples, params, env.run.seed, step, env.tokenizer.pad_token_id)
        metrics = train_step(runner, batches, loss_fn, cfg)
        loop.end_step(step + 1, metrics)
    return finish_stage(env, loop, runner, lora)


def finish_stage(env: StageEnv, loop: StageLoop, runner, lora) -> Path:
    """Close the stage's logs and export its model (LoRA: adapters merged in place first, so the export is a plain
    checkpoint) with the tokenizer to ``out_dir/final``."""
    loop.close()
    if lora is not None:
        from dsalign.alignment.trainer.lora import merge_lora

        merge_lora(lora)
    return save_hf(runner, env.out_dir / "final", env.tokenizer)


def lora_settings(lora: LoraConfig):
    """The trainer's ``LoraSettings`` for a stage's ``training.lora`` block (validates it)."""
    from dsalign.alignment.trainer.lora import LoraSettings

    return LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules),
                        experts=lora.experts)  # fmt: skip


def apply_stage_lora(model: Transformer, stage: StageConfig):
    """``stage.training.lora``: inject adapters and freeze the rest (peft's model, for the merge), else None."""
    if stage.training.lora is None:
        return None
    from dsalign.alignment.trainer.lora import apply_lora

    return apply_lora(model, lora_settings(stage.training.lora))


# ---------------------------------------------------------------------------------------------------- generation
def completion_texts(tokenizer, completions) -> list[str]:
    """Decoded completions as generated (special tags like ``<think>`` kept) without the stop token that ended a
    sample: EOS, or an end-of-turn id from the checkpoint's ``generation_config.json`` (``rollout.completion_text``)."""
    from dsalign.alignment.rollout import completion_text

    def ended_by(c) -> tuple[int, ...]:
        stop = getattr(c, "stop_reason", None)
        return (stop,) if getattr(c, "finish_reason", None) == "stop" and isinstance(stop, int) else ()

    return [completion_text(tokenizer, c.token_ids, ended_by(c)) for c in completions]


def rollout_engine(model: Transformer, tokenizer, slots: int, speculative: bool = False):
    """The rollout engine every stage (and rollout worker) decodes with: ``slots`` sequences at a time, each up to
    the model's whole context (``max_position_embeddings``). Its latent cache is sized per call to the longest
    prompt + ``max_new_tokens`` that call can reach, so the full context costs nothing unless used.
    ``speculative``: MTP drafts verified by the model (``grpo.speculative``)."""
    from dsalign.alignment.rollout import RolloutEngine

    return RolloutEngine(model, tokenizer, max_batch_size=slots, speculative=speculative)


def rollout(engine, tokenizer, rows: list[dict], n: int, temperature: float, max_new_tokens: int, seed: int,
            top_p: float = 1.0, row_ids: list[int] | None = None):  # fmt: skip
    """Generate ``n`` completions per prompt row; per-request seeds make every rollout reproducible.

    Row ``rows[i]`` samples with seed ``seed * 1000003 + row_ids[i]`` (default ``row_ids[i] = i``): passing each
    row's index in the full batch makes its samples independent of how the batch was shared out (trainer ranks,
    rollout workers)."""
    from dsalign.alignment.chat import tokenize_prompt
    from dsalign.alignment.sampling_params import SamplingParams

    prompt_ids = [tokenize_prompt(tokenizer, r["prompt"]) for r in rows]
    ids = range(len(rows)) if row_ids is None else row_ids
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed * 1_000_003 + i
        )  # fmt: skip
        for i in ids
    ]
    return prompt_ids, engine.generate(prompt_ids, params)


class LocalRollout:
    """Colocated generation: the engine decodes with the trainer's own model object, so the optimizer's updates are
    visible to it at once (nothing is copied). Same ``generate`` as ``pools.RolloutPool``."""

    def __init__(self, engine, tokenizer, autocast=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.autocast = autocast or contextlib.nullcontext  # the trainer's, so rollout and update share precision

    def generate(self, rows: list[dict], row_ids: list[int], n: int, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0):  # fmt: skip
        with self.autocast():
            return rollout(self.engine, self.tokenizer, rows, n, temperature, max_new_tokens, seed, top_p, row_ids)

    @contextlib.contextmanager
    def ep_phase(self):
        """With an expert-sharded model: the span of ``generate`` calls after which the ranks meet (each rank's
        number of calls may differ, e.g. under dynamic sampling); see ``RolloutEngine.ep_phase``. Entered under the
        trainer's autocast like ``generate``: the dummy forwards that keep a finished rank in step must exchange
        the same dtypes as the other ranks' real ones (bf16 experts under autocast)."""
        with self.autocast(), self.engine.ep_phase():
            yield


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes (sorted by name): equal digests mean the two
    state dicts are bitwise equal. One pass over the weights."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_columns(row: dict) -> list[str]:
    """The dataset columns rewards receive: every one but the prompt itself (TRL's reward convention) and the
    loader's record of the prompt's format (``TEXT_PROMPT``)."""
    from dsalign.alignment.data import TEXT_PROMPT

    return [k for k in row if k not in ("prompt", TEXT_PROMPT)]


def expand_columns(rows: list[dict], n: int) -> dict[str, list]:
    """Every dataset column except the prompt itself, repeated once per sample (TRL's reward convention)."""
    return {k: [r.get(k) for r in rows for _ in range(n)] for k in data_columns(rows[0])}


SAMPLE_COLUMNS = ("finish_reason",)  # the completions' attributes ``sample_columns`` adds to the dataset's columns


def sample_columns(rows: list[dict], n: int, comps) -> dict[str, list]:
    """The reward columns of ``n`` completions per row: ``expand_columns`` plus each sample's ``finish_reason``
    (``stop`` or ``length``: cut at ``max_new_tokens``), which ``stop_properly`` reads and TRL-style rewards
    ignore through ``**kwargs``."""
    return {**expand_columns(rows, n), **{k: [getattr(c, k) for c in comps] for k in SAMPLE_COLUMNS}}


def score_samples(scorer, rows: list[dict], n: int, texts: list[str], comps):
    """Score ``n`` completions per row (in order) with a combiner or reward pool: TRL's call with one prompt per
    sample in TRL's format (a string prompt and text completion for rows whose file prompt was a string, message
    lists otherwise: ``trl_reward_inputs``), the completion ids and every column (``sample_columns``)."""
    from dsalign.alignment.data import TEXT_PROMPT
    from dsalign.rewards import trl_reward_inputs

    prompts, completions = trl_reward_inputs([r["prompt"] for r in rows for _ in range(n)], texts,
                                             [bool(r.get(TEXT_PROMPT)) for r in rows for _ in range(n)])  # fmt: skip
    return scorer(prompts, completions, [c.token_ids for c in comps], **sample_columns(rows, n, comps))


def build_combiner(entries):
    from dsalign.rewards import RewardCombiner, RewardSpec

    specs = [RewardSpec(e.fn, weight=e.weight, params=dict(e.params), timeout_s=e.timeout_s) for e in entries]
    return RewardCombiner(specs)


@torch.no_grad()
def evaluate(model: Transformer, tokenizer, run: RunConfig, rows: list[dict],
             samples: list[dict[str, Any]] | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out accuracy (the mean of ``eval.reward``, default ``math_accuracy``; sampled at ``eval.temperature``),
    mean response length (tokens), format. ``samples``: a list to receive one record per sampled completion."""
    import dataclasses

    from dsalign.rewards import think_format

    ev = run.eval
    score = build_combiner([dataclasses.replace(ev.reward, weight=1.0)])  # TRL column passing, failures contained
    engine = rollout_engine(model, tokenizer, min(ev.max_batch_size, len(rows) * ev.samples_per_prompt))
    k = ev.samples_per_prompt
    _, comps = rollout(engine, tokenizer, rows, k, ev.temperature, ev.max_new_tokens, ev.seed)
    texts = completion_texts(tokenizer, comps)
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    scored = score_samples(score, rows, k, texts, comps)
    acc = scored.rewards
    check_eval_failures(scored.failures, len(acc), ev.reward.fn, acc)
    fmt = think_format(prompts, texts)
    lengths = [len(c.token_ids) for c in comps]
    out = {
        "accuracy": sum(a or 0.0 for a in acc) / len(acc),
        # per held-out prompt (mean over its samples): the unit of the paired noise estimate between stages
        "per_prompt": [sum(a or 0.0 for a in acc[i : i + k]) / k for i in range(0, len(acc), k)],
        "format": sum(f or 0.0 for f in fmt) / len(fmt),
        "mean_length": sum(lengths) / len(lengths),
    }
    out.update(sample_statistics(acc, texts, k, ev.reward.fn == "math_accuracy"))
    if samples is not None:
        for i, (c, text) in enumerate(zip(comps, texts)):
            row = rows[i // k]
            samples.append({"prompt_id": row.get("prompt_id", i // k), "sample": i % k, "prompt": row["prompt"],
                            "answer": row.get("answer"), "completion": text, "reward": acc[i], "format": fmt[i],
                            "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason})  # fmt: skip
    targets = [r.get("length_target") for r in rows]
    if targets[0] is not None:
        out["length_target"] = float(sum(targets) / len(targets))
    return out


def check_eval_failures(failures: list, n: int, reward: str, scores: list[float | None] | None = None) -> None:
    """An evaluation counts a failed sample as 0, and one its reward scored ``None`` ("not applicable", e.g.
    ``math_accuracy`` without a gold answer) too, so each says so: a warning naming how many samples (and the first
    error), and an error when no sample was scored (the accuracy would be a meaningless 0)."""
    failed_at = set(range(n)) if any(f.sample_index is None for f in failures) else {f.sample_index for f in failures}
    unscored = sum(v is None for i, v in enumerate(scores or []) if i not in failed_at)
    if len(failed_at) + unscored == n and n:
        detail = f"first failure: {failures[0]}" if failures else "it returned None (not applicable) on every one"
        raise ValueError(f"eval reward {reward!r} scored none of the {n} samples, so there is no accuracy to report; "
                         f"{detail}")  # fmt: skip
    if failed_at:
        print(f"[eval] reward {reward!r} failed on {len(failed_at)} of {n} samples (counted as 0); first: "
              f"{failures[0]}", flush=True)  # fmt: skip
    if unscored:
        print(f"[eval] reward {reward!r} returned None (not applicable) on {unscored} of {n} samples (counted as 0)",
              flush=True)  # fmt: skip


def sample_statistics(scores: list[float | None], texts: list[str], k: int, math: bool) -> dict[str, float]:
    """``pass@k`` (a prompt counts when any of its ``k`` samples is correct; binary rewards only) and, for
    ``math_accuracy``, ``maj@k`` (the majority-voted extracted answer is correct), averaged over prompts; nothing
    for ``k == 1`` or a reward with values other than 0 / 1."""
    from dsalign.alignment.metrics import majority_correct, pass_at_k
    from dsalign.rewards import extract_answer

    if k < 2 or any(v not in (0.0, 1.0, None) for v in scores):
        return {}
    groups = range(0, len(scores), k)
    out = {f"pass@{k}": sum(pass_at_k(k, sum(v == 1.0 for v in scores[i : i + k]), k) for i in groups) / len(groups)}
    if math:
        out[f"maj@{k}"] = sum(majority_correct([extract_answer(t) for t in texts[i : i + k]], scores[i : i + k])
                              for i in groups) / len(groups)  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- GRPO
def grpo_iteration_order(num_rows: int, per_iter: int, seed: int, it: int) -> list[int]:
    """Row indices of iteration ``it``, a deterministic function of (seed, it): ``per_iter`` sampled rows first (the
    iteration's batch), then every other row in random order (the refill stream of dynamic sampling)."""
    rng = random.Random(seed * 7_919 + it)
    first = rng.sample(range(num_rows), min(per_iter, num_rows))
    taken = set(first)
    rest = [i for i in range(num_rows) if i not in taken]
    rng.shuffle(rest)
    return first + rest


def iteration_share(num_rows: int, per_iter: int, seed: int, it: int) -> tuple[list[int], list[int]]:
    """(the iteration's row order, this rank's positions in it): every ``world``-th of its first ``per_iter``."""
    rank, world = rank_world()
    order = grpo_iteration_order(num_rows, per_iter, seed, it)
    return order, list(range(rank, min(per_iter, len(order)), world))


def sample_iteration(generator, scorer, tokenizer, rows: list[dict], p: GRPOParams, seed: int, it: int):
    """This rank's share of iteration ``it``: ``(prompt_ids, completions, scored, generate_s, stats)``.

    Each rank takes every ``world``-th prompt of the iteration's order (whole groups); a prompt samples with the seed
    of its place in that order, so the result does not depend on how the prompts were shared out. With
    ``p.dynamic_sampling`` (DAPO sec. 3.2) groups whose scored rewards are all equal (no signal under any
    estimator) are dropped and the rank keeps sampling further prompts of the order, a round of its share at a
    time, until it has its share of informative groups. The first round is the plain iteration. When
    ``dynamic_sampling_max_rounds`` rounds (or the prompts) run out first, the shortfall is filled with dropped groups
    (zero advantage: they add no gradient), so every rank still trains on its full share and the stage goes on; the
    shortfall is logged (``dynamic_sampling/shortfall``). Early in training, when every group scores 0, that is the
    plain iteration at ``max_rounds`` times the generation cost.
    """
    from dsalign.alignment.sampling import SampledGroup, dynamic_sample
    from dsalign.rewards import CombinedRewards

    rank, world = rank_world()
    order, share = iteration_share(len(rows), p.prompts_per_iter, seed, it)
    G, gen_s = p.group_size, 0.0

    def generate_and_score(positions: list[int]):
        nonlocal gen_s
        chunk = [rows[order[i]] for i in positions]
        t0 = time.time()
        prompt_ids, comps = generator.generate(chunk, positions, G, p.temperature, p.max_new_tokens,
                                               seed=seed * 100_003 + it, top_p=p.top_p)  # fmt: skip
        gen_s += time.time() - t0
        scored = score_samples(scorer, chunk, G, completion_texts(tokenizer, comps), comps)
        return prompt_ids, comps, scored

    if not p.dynamic_sampling:
        prompt_ids, comps, scored = generate_and_score(share)
        return prompt_ids, comps, scored, gen_s, {}

    errors, sampled = 0.0, []

    def sample_groups(positions: list[int]) -> list[SampledGroup]:
        nonlocal errors
        prompt_ids, comps, scored = generate_and_score(positions)
        errors += scored.metrics.get("errors/total", 0.0)
        groups = []
        for j, pos in enumerate(positions):
            sl = slice(j * G, (j + 1) * G)
            one = CombinedRewards(scored.rewards[sl], {k: v[sl] for k, v in scored.components.items()}, [], {})
            groups.append(SampledGroup(pos, [v for v in one.rewards if v is not None], (prompt_ids[j], comps[sl], one)))
        sampled.extend(groups)
        return groups

    stream = iter(range(rank, len(order), world))
    kept, stats = dynamic_sample(sample_groups, stream, target_groups=len(share), prompts_per_round=len(share),
                                 max_rounds=p.dynamic_sampling_max_rounds, allow_partial=True)  # fmt: skip
    if stats.shortfall:  # fill up with dropped groups, in the order they were sampled
        informative = {id(g) for g in kept}
        kept += [g for g in sampled if id(g) not in informative and len(set(g.rewards)) <= 1][: stats.shortfall]
    parts = [g.payload[2] for g in kept]
    names = sorted({k for part in parts for k in part.components})
    scored = CombinedRewards([v for part in parts for v in part.rewards],
                             {k: [v for part in parts for v in part.components.get(k, [None] * G)] for k in names},
                             [], {"errors/total": errors})  # fmt: skip
    keys = ("rounds", "groups_dropped", "prompts_used", "shortfall")
    extra = {f"dynamic_sampling/{k}": getattr(stats, k) for k in keys}
    return [g.payload[0] for g in kept], [c for g in kept for c in g.payload[1]], scored, gen_s, extra


def rollout_batch(tokenizer, prompt_ids, comps, n: int, shared_prompts: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows (``n`` completions per prompt, in order) with the rollout's log-probs
    of the completion tokens as ``old_logp`` (``alignment.rl.build_rollout_batch``)."""
    from dsalign.alignment.rl import build_rollout_batch

    return build_rollout_batch([prompt_ids[i // n] for i in range(len(comps))], comps, tokenizer.pad_token_id,
                               shared_prompts)  # fmt: skip


def make_rl_batch(tokenizer, prompt_ids, comps, rewards: list[float | None], n: int,
                  params) -> dict[str, torch.Tensor]:  # fmt: skip
    """The update's batch: right-padded rows, rollout log-probs as ``old_logp``, group-relative advantages.

    A completion whose reward is None (every reward function returned None or failed on it) is unscorable: as in
    TRL's ``GRPOTrainer`` it is left out of its group's statistics and gets advantage 0 (counting it as 0 would bias
    the group's baseline and hand it a spurious advantage)."""
    from dsalign.alignment.advantages import compute_advantages, group_ids_from_size
    from dsalign.alignment.sampling import mask_truncated

    batch = rollout_batch(tokenizer, prompt_ids, comps, n, params.shared_prompts)
    scorable = torch.tensor([v is not None for v in rewards])
    r = torch.tensor([0.0 if v is None else v for v in rewards], dtype=torch.float32)
    groups = group_ids_from_size(len(comps), n)
    # estimators take any group ids and sizes: run them on the scorable rows only
    batch["advantages"] = torch.zeros_like(r).masked_scatter(
        scorable, compute_advantages(params.advantage, r[scorable], groups[scorable])
    )
    if params.mask_truncated:
        truncated = torch.tensor([c.finish_reason == "length" for c in comps])
        batch["completion_mask"] = mask_truncated(batch["completion_mask"], truncated)
    return batch


def split_micro(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    B = batch["input_ids"].shape[0]
    out = []
    for s in range(0, B, size):
        mb = {k: v[s : s + size] for k, v in batch.items()}
        keep = int(mb["attention_mask"].sum(1).max())  # trim padding columns this micro-batch does not need
        out.append({k: v[:, :keep] if v.dim() >= 2 else v for k, v in mb.items()})  # [B, T, ...]: T is dim 1
    return out


def sync_rollout_weights(pool, runner, verify: bool) -> dict[str, Any]:
    """Split mode: send the trainer's current weights to every rollout worker, before the iteration generates.

    Every rank takes part in gathering expert-parallel shards (``gathered_state_dict``, a collective over the EP
    group); rank 0 puts the full state dict (CPU tensors) in the Ray object store once and every worker copies it
    into its engine's model. A LoRA policy ships merged (``merged_state_dict``): the workers' models are plain. With
    ``verify`` the workers' digests must equal the trainer's, bit for bit."""
    import torch.distributed as dist
    from dsalign.alignment.trainer.distributed import gathered_state_dict
    from dsalign.alignment.trainer.lora import has_adapters, merged_state_dict

    t0 = time.time()
    rank, world = rank_world()
    local = merged_state_dict(runner.model) if has_adapters(runner.model) else None
    full = gathered_state_dict(runner.model, local)
    out: dict[str, Any] = {}
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in full.items()}
        digests = pool.push_weights(state, verify)
        if verify:
            mine = weights_digest(state)
            stale = [k for k, d in enumerate(digests) if d != mine]
            if stale:
                theirs = [digests[k][:12] for k in stale]
                raise RuntimeError(f"split mode: rollout workers {stale} hold weights that differ from the trainer's "
                                   f"after the broadcast (digest {mine[:12]} vs {theirs})")  # fmt: skip
            out.update(weights_sha256=mine, rollout_weights_sha256=digests)
    if world > 1:
        dist.barrier()  # no rank asks for completions before every worker holds the new weights
    out["weight_sync_s"] = time.time() - t0
    return out


def _rollout_tallies(comps, scored, gen_s: float, sampling: dict[str, Any]) -> dict[str, Any]:
    """This rank's sums and counts behind the logged rollout metrics (combined over ranks by ``grpo_metrics``)."""
    t: dict[str, Any] = {"tokens": sum(len(c.token_ids) for c in comps), "completions": len(comps),
                         "truncated": sum(c.finish_reason == "length" for c in comps), "generate_s": gen_s,
                         "sampling": dict(sampling), "drafted": sum(c.drafted for c in comps),
                         "accepted": sum(c.accepted for c in comps)}  # fmt: skip
    if scored is not None:

        def tally(values):
            present = [v for v in values if v is not None]
            return [float(sum(present)), len(present)]

        t.update(reward=tally(scored.rewards), unscorable=sum(v is None for v in scored.rewards),
                 scored=len(scored.rewards), reward_errors=scored.metrics.get("errors/total", 0.0),
                 components={k: tally(v) for k, v in scored.components.items()})  # fmt: skip
    return t


def grpo_metrics(metrics: dict[str, Any], comps, scored, gen_s: float,
                 sampling: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The step's logged scalars: the trainer's, plus length, generation speed and expert load (with speculative
    rollouts the MTP drafts' acceptance), and (when the samples were ``scored``) reward (means over the samples a
    reward scored), reward failures and unscorable share.

    Collective with several trainer ranks: each holds only its share of the samples, so the sums and counts of
    every rank are combined (lengths and rewards are means over all samples, ``tokens_per_s`` the group's tokens
    over the slowest rank's generation time, failures and dynamic-sampling counts add up, ``rounds`` the most any
    rank needed)."""
    mine = _rollout_tallies(comps, scored, gen_s, sampling or {})
    ranks = [mine]
    if rank_world()[1] > 1:
        import torch.distributed as dist

        ranks = [None] * rank_world()[1]
        dist.all_gather_object(ranks, mine)
    tokens, count = sum(t["tokens"] for t in ranks), sum(t["completions"] for t in ranks)
    gen = max(t["generate_s"] for t in ranks)
    metrics.update(response_length=tokens / count if count else math.nan, generate_s=gen,
                   tokens_per_s=tokens / max(gen, 1e-9),
                   truncated_frac=sum(t["truncated"] for t in ranks) / count if count else math.nan)  # fmt: skip
    drafted = sum(t["drafted"] for t in ranks)
    if drafted:  # speculative rollouts: the share of MTP drafts the model accepted
        metrics["rollout_mtp_acceptance"] = sum(t["accepted"] for t in ranks) / drafted
    if scored is not None:

        def mean(pairs):
            total, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            return total / n if n else math.nan

        scored_total = sum(t["scored"] for t in ranks)
        names = sorted({k for t in ranks for k in t["components"]})
        metrics.update(
            reward=mean([t["reward"] for t in ranks]),
            unscorable_frac=sum(t["unscorable"] for t in ranks) / scored_total if scored_total else math.nan,
            reward_errors=sum(t["reward_errors"] for t in ranks),
            **{f"reward/{k}": mean([t["components"][k] for t in ranks if k in t["components"]]) for k in names},
        )
        if "math_accuracy" in names:
            metrics["accuracy"] = metrics["reward/math_accuracy"]
    for key in sorted({k for t in ranks for k in t["sampling"]}):
        values = [t["sampling"][key] for t in ranks if key in t["sampling"]]
        metrics[key] = max(values) if key.endswith("/rounds") else sum(values)
    loads = [v for k, v in metrics.items() if k.startswith("load_max_mean/")]
    if loads:
        metrics["expert_load_max_over_mean"] = max(loads)
    return metrics


def grpo_loss_config(p) -> Any:
    """The policy loss of a GRPO stage's params. ``norm_length`` is the completion budget, Dr. GRPO's constant
    normaliser (TRL's ``max_completion_length``); left unset it would be each micro-batch's padded row length, which
    varies with the prompts' lengths and the batch's composition and reweights identical tokens."""
    from dsalign.alignment.policy_loss import PolicyLossConfig

    return PolicyLossConfig(policy_loss=p.policy_loss, eps_low=p.eps_low, eps_high=p.eps_high,
                            dual_clip_c=p.dual_clip_c, agg=p.loss_agg, norm_length=p.max_new_tokens,
                            kl_beta=p.kl_beta, kl_estimator=p.kl_estimator)  # fmt: skip


def run_grpo(env: StageEnv) -> Path:
    """GRPO with group-relative advantages. Colocated: the engine decodes with the trainer's own model object.
    Split (``env.rollout_pool``): rollout workers decode with their own copies, refreshed before every iteration."""
    from dsalign.alignment.rl import correct_for_rollout, grpo_loss_fn
    from dsalign.alignment.trainer import prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.alignment.trainer.step import autocast_context, to_device, token_weighted_metrics

    p = env.stage.grpo
    device = stage_device(env.stage)
    model = load_source(env.sources["model"], env.tokenizer, env.run.seed).to(device)
    rows = enough_rows(stage_prompts(env, model.cfg.max_position_embeddings), p.prompts_per_iter,
                       "grpo.prompts_per_iter")  # fmt: skip
    scorer = env.reward_pool or build_combiner(env.stage.rewards)
    cfg = trainer_config(p.optim, p.iterations * p.updates_per_batch, env.run, env.stage, mtp_lambda=p.mtp_lambda,
                         bias_update_gamma=p.bias_update_gamma)  # fmt: skip
    loss_fn = grpo_loss_fn(grpo_loss_config(p), temperature=p.temperature, mtp_lambda=p.mtp_lambda)
    torch.manual_seed(env.run.seed)
    model = prepare_model(model, cfg)
    lora = apply_stage_lora(model, env.stage)
    reference, reference_biases = None, None
    if p.kl_beta > 0 and lora is None:
        reference = load_source(env.sources["model"], env.tokenizer, env.run.seed).to(device).eval()
    elif p.kl_beta > 0:  # LoRA: the reference is the policy with its adapters off and the source's router biases
        reference_biases = [g.e_score_correction_bias.clone() for g in model.gates()]
    runner = build_runner(model, cfg)
    if env.rollout_pool is None:
        slots = p.prompts_per_iter * p.group_size
        generator = LocalRollout(rollout_engine(model, env.tokenizer, slots, p.speculative), env.tokenizer,
                                 autocast=lambda: autocast_context(cfg, device))  # fmt: skip
    else:
        generator = env.rollout_pool
    loop = StageLoop(env, runner, p.iterations)
    # steps that train on nothing, said once per stage: metric at 1.0 -> why
    starved = {"unscorable_frac": "no reward scored any sample (every reward returned None or raised), so every "
               "advantage is 0 and the update only moved the balance terms; check the rewards against the data"}
    if p.mask_truncated:
        starved["truncated_frac"] = (f"every completion hit grpo.max_new_tokens ({p.max_new_tokens}) and "
                                     "grpo.mask_truncated is on, so no token entered the policy loss (pg_loss is NaN, "
                                     "the update only moved the balance terms); raise max_new_tokens or set "
                                     "mask_truncated: false")  # fmt: skip
    warned: set[str] = set()
    for it in range(loop.start, p.iterations):
        sync = {}
        if env.rollout_pool is not None:
            sync = sync_rollout_weights(env.rollout_pool, runner, env.stage.resources.verify_weight_sync)
        with generator.ep_phase():  # expert-parallel colocated decoding: ranks may sample a different number of rounds
            prompt_ids, comps, scored, gen_s, sampling = sample_iteration(generator, scorer, env.tokenizer, rows, p,
                                                                          env.run.seed, it)  # fmt: skip
        batch = to_device(make_rl_batch(env.tokenizer, prompt_ids, comps, scored.rewards, p.group_size, p), device)
        if p.kl_beta > 0:
            ref = model if reference is None else reference  # LoRA: the policy with its adapters off
            batch["ref_logp"] = reference_logprobs(ref, lora, batch, p.temperature, reference_biases)
        model.train()
        micro = split_micro(batch, p.micro_batch_size)
        cfg.micro_batches = len(micro)
        correction = {}
        if p.rollout_is_cap is not None:
            with autocast_context(cfg, device):
                correction = correct_for_rollout(runner.model, micro, p.temperature, p.rollout_is_cap)
            correction = token_weighted_metrics(correction, correction.pop("rollout_tokens"))  # all ranks
        for _ in range(p.updates_per_batch):
            metrics = train_step(runner, micro, loss_fn, cfg)
        step_metrics = {**grpo_metrics(metrics, comps, scored, gen_s, sampling), **sync, **correction}
        for key, why in starved.items():
            if key in warned or step_metrics.get(key) != 1.0:
                continue
            warned.add(key)  # once per stage; the fraction is logged every step
            if rank_world()[0] == 0:
                print(f"[{env.stage.name}] step {it + 1}: {why} ({key} in the metrics shows how often)", flush=True)
        loop.end_step(it + 1, step_metrics)
    return finish_stage(env, loop, runner, lora)


def reference_logprobs(reference: Transformer, lora, batch: dict[str, torch.Tensor], temperature: float,
                       router_biases: list[torch.Tensor] | None = None):
    """The KL reference's log-probs of the batch's completion tokens: the frozen source model, or under LoRA the
    policy itself with its adapters switched off (its base weights never train, so no second copy is loaded).
    ``router_biases`` (one per gate, the source's) stand in for the current ``e_score_correction_bias`` meanwhile:
    ``bias_update_gamma`` moves those during training, and the reference must route as the source did."""
    from dsalign.alignment.rl import token_logprobs

    was_training = reference.training
    reference.eval()
    if lora is not None:
        lora.disable_adapter_layers()
    gates = reference.gates() if router_biases is not None else []
    current = [g.e_score_correction_bias.clone() for g in gates]
    try:
        for g, b in zip(gates, router_biases or []):
            g.e_score_correction_bias.copy_(b)
        with torch.no_grad():
            return token_logprobs(reference, batch, temperature, positions=batch["completion_mask"])[0]
    finally:
        for g, b in zip(gates, current):
            g.e_score_correction_bias.copy_(b)
        if lora is not None:
            lora.enable_adapter_layers()
        reference.train(was_training)


# ---------------------------------------------------------------------------------------------------- distillation
def teacher_traces(env: StageEnv, rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's share of the teacher's scored traces (``samples_per_prompt`` per prompt, with provenance)."""

    d = env.stage.distill
    teacher = load_source(env.sources["teacher"], env.tokenizer, env.run.seed).to(stage_device(env.stage)).eval()
    every = stage_prompts(env, teacher.cfg.max_position_embeddings)
    row_ids = list(range(rank, len(every), world))
    rows = [every[i] for i in row_ids]
    engine = rollout_engine(teacher, env.tokenizer, d.max_batch_size)
    # seeds by each prompt's place in the whole list: the traces do not depend on how many ranks share them out
    _, comps = rollout(engine, env.tokenizer, rows, d.samples_per_prompt, d.temperature, d.max_new_tokens,
                       seed=env.run.seed + 31, row_ids=row_ids)  # fmt: skip
    texts = completion_texts(env.tokenizer, comps)
    k = d.samples_per_prompt
    scorer = env.reward_pool or build_combiner(env.stage.rewards)
    scored = score_samples(scorer, rows, k, texts, comps)
    teacher_name = str(env.sources["teacher"].get("checkpoint") or env.sources["teacher"].get("preset"))
    return [
        {
            "prompt_id": rows[i // k]["prompt_id"],
            "prompt": rows[i // k]["prompt"],
            "completion": texts[i],
            "reward": scored.rewards[i],
            "teacher": teacher_name,
            "trace_index": i % k,
            "num_tokens": len(comps[i].token_ids),
            "answer": rows[i // k].get("answer"),  # prompt files need no answer column
        }  # fmt: skip
        for i in range(len(comps))
    ]


def interleave_shares(shares: list[list], per_prompt: int) -> list:
    """Rank ``r`` took prompts ``r, r + world, ...`` and returned ``per_prompt`` items for each: put them back in
    the prompts' order, as one rank would have produced them."""
    world, total = len(shares), sum(len(s) for s in shares) // per_prompt
    return [shares[g % world][(g // world) * per_prompt + t] for g in range(total) for t in range(per_prompt)]


def run_on_policy_distill(env: StageEnv) -> Path:
    """``distill.mode: on_policy``: each step the student samples completions, the teacher scores the student's
    tokens (``alignment.distill.teacher_scores``: one forward, no gradient), and the student is updated toward the
    teacher on its own samples. ``sampled_reverse_kl``: per-token cost ``log p_S - log p_T`` of the sampled token as
    a negative advantage in the GRPO loss (one update per batch, so the ratio is 1 and the gradient is the reverse
    KL's, ``E_S[(log p_S - log p_T) grad log p_S]``); ``topk_*``: the KL over the teacher's top-k tokens per
    position. Logs ``reverse_kl`` (its sampled estimate, every loss) and the stage's rewards when it names some."""
    from dsalign.alignment.distill import teacher_scores, topk_distill_loss_fn
    from dsalign.alignment.policy_loss import PolicyLossConfig
    from dsalign.alignment.rl import grpo_loss_fn
    from dsalign.alignment.trainer import prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.alignment.trainer.step import autocast_context, to_device, token_weighted_metrics

    op = env.stage.distill.on_policy
    device = stage_device(env.stage)
    student = load_source(env.sources["model"], env.tokenizer, env.run.seed).to(device)
    teacher = load_source(env.sources["teacher"], env.tokenizer, env.run.seed).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    context = min(student.cfg.max_position_embeddings, teacher.cfg.max_position_embeddings)
    rows = enough_rows(stage_prompts(env, context), op.prompts_per_step, "distill.on_policy.prompts_per_step")
    scorer = (env.reward_pool or build_combiner(env.stage.rewards)) if env.stage.rewards else None
    cfg = trainer_config(op.optim, op.steps, env.run, env.stage, mtp_lambda=0.0)
    torch.manual_seed(env.run.seed)
    student = prepare_model(student, cfg)
    lora = apply_stage_lora(student, env.stage)
    runner = build_runner(student, cfg)
    k, top_k = op.samples_per_prompt, op.top_k if op.loss.startswith("topk") else 0
    if op.loss == "sampled_reverse_kl":  # the update scores tokens at the temperature they were sampled at: ratio 1
        loss_fn = grpo_loss_fn(PolicyLossConfig(), temperature=op.temperature)
    else:
        loss_fn = topk_distill_loss_fn(op.loss.split("_")[1])
    generator = LocalRollout(rollout_engine(student, env.tokenizer, -(-op.prompts_per_step // rank_world()[1]) * k),
                             env.tokenizer, autocast=lambda: autocast_context(cfg, device))  # fmt: skip
    loop = StageLoop(env, runner, op.steps)
    for step in range(loop.start, op.steps):
        order, share = iteration_share(len(rows), op.prompts_per_step, env.run.seed, step)
        chunk = [rows[order[i]] for i in share]
        t0 = time.time()
        prompt_ids, comps = generator.generate(chunk, share, k, op.temperature, op.max_new_tokens,
                                               seed=env.run.seed * 100_003 + step)  # fmt: skip
        gen_s = time.time() - t0
        batch = to_device(rollout_batch(env.tokenizer, prompt_ids, comps, k, op.shared_prompts), device)
        student.train()
        micro = split_micro(batch, op.micro_batch_size)
        cost, tokens = 0.0, 0
        with autocast_context(cfg, device):
            for mb in micro:
                mb.update(teacher_scores(teacher, mb, top_k))
                mask = mb["completion_mask"]
                gap = (mb["old_logp"] - mb["teacher_logp"]) * mask  # log p_S - log p_T of each sampled token
                cost, tokens = cost + float(gap.sum()), tokens + int(mask.sum())
                mb["advantages"] = -gap
        cfg.micro_batches = len(micro)
        metrics = train_step(runner, micro, loss_fn, cfg)
        metrics.update(token_weighted_metrics({"reverse_kl": cost / tokens if tokens else math.nan}, tokens))
        scored = None if scorer is None else score_samples(scorer, chunk, k, completion_texts(env.tokenizer, comps),
                                                           comps)  # fmt: skip
        loop.end_step(step + 1, grpo_metrics(metrics, comps, scored, gen_s))
    return finish_stage(env, loop, runner, lora)


def run_distill(env: StageEnv) -> Path:
    """R1-style: the teacher samples k traces per prompt, rewards verify them, the filtered traces (with
    provenance) become the student's SFT set. ``distill.mode: on_policy`` runs ``run_on_policy_distill``."""
    import torch.distributed as dist
    from dsalign.alignment.distill import TraceFilterConfig, filter_traces, write_sft_dataset

    if env.stage.on_policy_distill:
        return run_on_policy_distill(env)
    d = env.stage.distill
    data_file = env.out_dir / "distill_sft.jsonl"
    rank, world = rank_world()
    if not (env.resume and data_file.is_file()):
        traces = teacher_traces(env, rank, world)
        if world > 1:  # every rank sampled its share of the prompts; rank 0 filters and writes the dataset
            gathered: list = [None] * world
            dist.all_gather_object(gathered, traces)
            traces = interleave_shares(gathered, d.samples_per_prompt)
        if rank == 0:
            rules = TraceFilterConfig(min_reward=d.min_reward, keep=d.keep, require_well_formed=d.require_well_formed,
                                      max_tokens=d.max_new_tokens)  # fmt: skip
            kept, stats = filter_traces(traces, rules)
            if kept:
                tmp = data_file.with_suffix(".tmp")
                write_sft_dataset(kept, tmp)
                tmp.replace(data_file)
            print(
                f"[{env.stage.name}] kept {stats.kept}/{stats.traces} traces, {stats.prompts_kept} prompts", flush=True
            )
        if world > 1:
            dist.barrier()
        if not data_file.is_file():
            from dsalign.alignment.data import DataError

            raise DataError(f"distill: no teacher trace passed the filter (min_reward={d.min_reward}, "
                            f"require_well_formed={d.require_well_formed}); the teacher samples with fixed seeds, so "
                            "a retry would draw the same traces: lower distill.min_reward, turn off "
                            "distill.require_well_formed, or sample more (distill.samples_per_prompt)")  # fmt: skip
    conversations = [json.loads(line) for line in data_file.read_text().splitlines()]
    student = load_source(env.sources["model"], env.tokenizer, env.run.seed).to(stage_device(env.stage))
    return run_sft_loop(env, student, conversations, d.sft)


def run_sft(env: StageEnv) -> Path:
    model = load_source(env.sources["model"], env.tokenizer, env.run.seed).to(stage_device(env.stage))
    return run_sft_loop(env, model, sft_conversations(env.run, env.stage.data, summary_dir(env)), env.stage.sft)


STAGE_RUNNERS = {"sft": run_sft, "grpo": run_grpo, "distill": run_distill}
