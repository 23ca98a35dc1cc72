"""``dsalign run``: validate, start (or join) Ray, run the stages in order with retries, evaluate, report.

The driver holds no model. Each stage runs inside Ray actors (``actors.py``); the driver only passes configs and
checkpoint paths, so a stage can be retried from its last checkpoint after an actor dies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EvalConfig, ModelSource, RunConfig, StageConfig, config_notes
from .errors import StageFailed
from .jobs import dsalign_settings
from .preflight import preflight
from .report import format_table, write_report, write_text_atomic
from .schema import ConfigError, from_dict, to_dict


@dataclass
class RunState:
    """What survives a crash of the driver: finished stages and their outputs (``run_state.json``)."""

    finished: dict[str, str] = field(default_factory=dict)  # stage name -> final HF checkpoint dir
    evals: list[dict[str, Any]] = field(default_factory=list)
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # eval label -> accuracy per held-out prompt
    # stages this run has started (their directories hold this run's state); None: a state file from before this
    # was recorded, where every stage directory is taken to be this run's
    started: list[str] | None = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RunState:
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except ValueError as e:  # JSONDecodeError is one
            raise ValueError(f"{path}: cannot resume from this run state ({e}); it is written atomically, so it was "
                             "changed by hand: fix it, or start afresh without --resume") from None  # fmt: skip
        return cls(finished=data.get("finished", {}), evals=data.get("evals", []),
                   per_prompt=data.get("per_prompt", {}), started=data.get("started"))  # fmt: skip

    def save(self, path: Path) -> None:
        data = {"finished": self.finished, "evals": self.evals, "per_prompt": self.per_prompt, "started": self.started}
        write_text_atomic(path, json.dumps(data, indent=2))

    def has_started(self, stage: str) -> bool:
        return self.started is None or stage in self.started


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: ``TOKENIZERS_PARALLELISM=false`` and the driver's ``DSALIGN_*`` settings
    (e.g. ``DSALIGN_CPU_GEMM``), which would otherwise reach only workers started from this shell."""
    env = {"TOKENIZERS_PARALLELISM": "false", **dsalign_settings()}
    # Inside a submitted job Ray merges the job's runtime env into ray.init's and refuses a key set by both; the
    # job's (``jobs.submit`` forwards the submitting shell's DSALIGN_* there) already reaches the workers.
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        job_vars = {}
    return {k: v for k, v in env.items() if k not in job_vars}


def init_ray(cfg: RunConfig):
    """Join the configured cluster, the one this process was submitted to (``RAY_ADDRESS``), or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": worker_env()}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=env)
    return ray


def resolve_sources(cfg: RunConfig, stage: StageConfig, state: RunState) -> dict[str, Any]:
    """Turn ``from_stage`` references into checkpoint paths of finished stages."""

    def one(src) -> dict[str, Any]:
        if src.from_stage is not None:
            if src.from_stage not in state.finished:
                raise StageFailed(f"stage {stage.name!r} needs {src.from_stage!r}, which has not finished")
            return {"checkpoint": state.finished[src.from_stage], "overrides": src.overrides}
        return {"preset": src.preset, "checkpoint": src.checkpoint, "overrides": src.overrides}

    out = {"model": one(stage.model)}
    if stage.kind == "distill":
        out["teacher"] = one(stage.distill.teacher)
    return out


def run(cfg: RunConfig, resume: bool = False, progress: bool = True) -> RunState:
    """Run every stage of ``cfg``; with ``resume`` finished stages are skipped and a partial one continues."""
    from . import actors

    out = Path(cfg.output_dir)
    state_path = out / "run_state.json"
    earlier = RunState.load(state_path).finished if resume and state_path.is_file() else {}
    preflight(cfg, {name: path for name, path in earlier.items() if Path(path).is_dir()})
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (preflight's access check passes root where a filesystem still refuses: /proc, ...)
        raise ConfigError(f"output_dir: cannot create {out}: {e.strerror or e}") from e
    if resume and not state_path.is_file():
        print(f"[run] --resume: {out} holds no earlier run of this config (no run_state.json); starting afresh",
              flush=True)  # fmt: skip
    state = RunState.load(state_path) if resume else RunState()
    for name, path in list(state.finished.items()):
        if not Path(path).is_dir():  # its output was deleted since: run that stage (and its evals) again
            print(f"[run] stage {name}: output {path} is missing; it will run again", flush=True)
            del state.finished[name]
            labels = {name, f"{name} (budget prompts)"}  # its own rows, not those of a stage sharing a prefix
            state.evals = [e for e in state.evals if str(e["stage"]) not in labels]
            state.per_prompt = {k: v for k, v in state.per_prompt.items() if k not in labels}
    if not resume and state_path.exists():
        state_path.unlink()
    if not resume:  # an earlier run's report would pass for this run's until this one writes its own
        from .report import PLOTTED

        for stale in [out / "report.md", *(out / f"{key}.png" for key in PLOTTED)]:
            stale.unlink(missing_ok=True)
    resolved, resolved_text = out / "config.resolved.json", json.dumps(to_dict(cfg), indent=2)
    changed: list[str] = []
    if resume and resolved.is_file():
        before = json.loads(resolved.read_text())
        changed = config_changes(before, json.loads(resolved_text))
        if changed:
            print(f"[run] --resume with a changed config ({len(changed)} keys): " + "; ".join(changed[:10])
                  + ("; ..." if len(changed) > 10 else ""), flush=True)  # fmt: skip
        eval_changes = [c for c in changed if c.startswith("eval.")]
        if eval_changes and state.evals and isinstance(before.get("eval"), dict):
            # the table compares every row with the others: its evaluations all use the settings of the first
            cfg = dataclasses.replace(cfg, eval=from_dict(EvalConfig, before["eval"]))
            resolved_text = json.dumps(to_dict(cfg), indent=2)
            print(f"[run] the run's {len(state.evals)} evaluations so far used the earlier eval settings, and the "
                  f"rest keep them so that the table compares like with like: {'; '.join(eval_changes)} do not "
                  "apply (evaluate checkpoints afresh with `dsalign eval`, or start the run afresh)",
                  flush=True)  # fmt: skip
        kept = {st.get("name"): st for st in before.get("stages") or [] if isinstance(st, dict)}
        if any(name in kept for name in state.finished):  # a finished stage ran with its earlier values: record those
            now = json.loads(resolved_text)
            now["stages"] = [kept.get(st["name"], st) if st["name"] in state.finished else st for st in now["stages"]]
            resolved_text = json.dumps(now, indent=2)
    write_text_atomic(resolved, resolved_text)
    ray = init_ray(cfg)
    t0 = time.time()
    cpus = max(s.resources.cpus_per_worker for s in cfg.stages)
    gpus = max(s.resources.gpus_per_worker for s in cfg.stages)  # evaluations run where the stages train
    tokenizer_dir = ray.get(actors.prepare_tokenizer.remote(to_dict(cfg)))

    def evaluate(source: dict[str, Any], label: str, length_target: int | None = None, vs: str | None = None) -> None:
        if not cfg.eval.enabled:
            return
        task = actors.evaluate_source.options(num_cpus=cpus, num_gpus=gpus)
        try:
            result = ray.get(task.remote(to_dict(cfg), source, tokenizer_dir, length_target))
        except ray.exceptions.RayError as e:  # raised, crashed, killed for memory: the run stops with a report
            cause = getattr(e, "cause", None)
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
            raise StageFailed(f"evaluation of {label!r} failed: {detail}") from e
        state.per_prompt[label] = per = result.pop("per_prompt")
        row = {"stage": label, "accuracy": result["accuracy"], "acc_se": clustered_se(per)}
        row.update({k: v for k, v in result.items() if k not in ("accuracy", "length_target")})
        row["length_target"] = result.get("length_target", "-")
        row["vs"] = paired_delta(per, state.per_prompt.get(vs), vs) if vs else "-"
        state.evals.append(row)
        state.save(state_path)
        print(f"[eval] {label}: {row}", flush=True)

    def evaluate_stage(stage: StageConfig, ckpt: str, vs: str, missing_only: bool = False) -> None:
        """A finished stage's rows (plain prompts, and budget prompts for a length stage); ``missing_only``: those
        a resumed run lacks (an evaluation that failed after the stage finished)."""
        final = {"checkpoint": ckpt, "overrides": {}}
        rows = [(stage.name, None)]
        if stage.data.length_target is not None:
            rows.append((f"{stage.name} (budget prompts)", stage.data.length_target))
        for label, target in rows:
            if not missing_only or label not in state.per_prompt:
                evaluate(final, label, target, vs=vs)

    for note in config_notes(cfg):
        print(f"[run] note: {note}", flush=True)
    if cfg.eval.enabled and cfg.eval.path is None and all(s.data.synthetic is None for s in cfg.stages):
        print("[run] note: the held-out evaluation uses the synthetic addition task (no eval.path given) while no "
              "stage trains on it; set eval.path to your held-out prompts or eval.enabled: false",
              flush=True)  # fmt: skip
    labels = comparison_labels(cfg)
    stage_dirs = {s.name: cfg.stage_dir(s) for s in cfg.stages}
    previous_sigterm = _interrupt_on_sigterm()
    try:
        if not state.evals:
            evaluate(resolve_sources(cfg, cfg.stages[0], state)["model"], initial_label(cfg))
        for stage in cfg.stages:
            if stage.name in state.finished:
                ignored = [c for c in changed if c.startswith(f"stages[{cfg.stages.index(stage)}].")]
                print(f"[run] stage {stage.name}: finished earlier ({state.finished[stage.name]}); not run again"
                      + (f", so these changes do not apply to it: {'; '.join(ignored)} (delete its final/ directory "
                         "to run it again with them)" if ignored else ""), flush=True)  # fmt: skip
                evaluate_stage(stage, state.finished[stage.name], labels[stage.name], missing_only=True)
                continue
            vs = labels[stage.name]
            if vs not in state.per_prompt and not comparison_source(stage).from_stage:
                evaluate(resolve_sources(cfg, stage, state)["teacher" if stage.kind == "distill" else "model"], vs)
            print(f"[run] stage {stage.name} ({stage.kind}) starting", flush=True)
            ckpt = run_stage_with_retries(cfg, stage, state, tokenizer_dir, resume, progress, state_path)
            state.finished[stage.name] = ckpt
            state.save(state_path)
            evaluate_stage(stage, ckpt, vs)
    except (StageFailed, KeyboardInterrupt) as e:  # keep what the run learned: evaluations so far, curves up to here
        try:
            if isinstance(e, KeyboardInterrupt):
                first = "interrupted (Ctrl-C, SIGTERM or dsalign stop); --resume continues it"
            else:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
            report = write_report(out, stage_dirs, state.evals, f"dsalign run {cfg.name} (stopped: {first})")
            print(f"[run] partial report: {report}", flush=True)
        except Exception as report_error:  # noqa: BLE001 - the stage's failure is the error to raise
            print(f"[run] no partial report: {type(report_error).__name__}: {report_error}", flush=True)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    report = write_report(out, stage_dirs, state.evals, f"dsalign run {cfg.name}")
    ev = cfg.eval
    source = ev.path or "the synthetic task's held-out set"
    head = f"{ev.num_prompts} prompts of {source} x {ev.samples_per_prompt} samples, temperature {ev.temperature}"
    if ev.enabled or state.evals:  # (rows of an earlier run with evaluation on are still shown)
        print(f"\nHeld-out evaluation ({head}):")
        print(format_table(state.evals))
        print(
            "acc_se: standard error of accuracy, samples of a prompt clustered; vs: accuracy change on the same "
            "prompts with its paired standard error, against the model the stage started from (a student: its teacher)"
        )
    else:
        print("\nHeld-out evaluation: off (eval.enabled: false)")
    print(f"\nreport: {report}   total time: {time.time() - t0:.0f}s")
    return state


def _interrupt_on_sigterm():
    """SIGTERM (``kill``, a scheduler's preemption, ``dsalign stop`` of a Ray job, which kills after a grace period)
    raises ``KeyboardInterrupt`` in the driver, as Ctrl-C does, so the run writes its partial report before exiting
    (Ray's own handler aborts the process). Returns the handler it replaced (None off the main thread, where signals
    cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, interrupt)


def config_changes(before: Any, after: Any, path: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two resolved configs (plain data). Stages are
    matched by name (``stages[i]`` is the new config's index), so adding, removing or moving one names that stage
    instead of printing both whole lists."""
    if path == "stages" and isinstance(before, list) and isinstance(after, list) and all(
        isinstance(st, dict) and "name" in st for st in before + after
    ):
        old = {st["name"]: st for st in before}
        out = [c for i, st in enumerate(after) if st["name"] in old
               for c in config_changes(old[st["name"]], st, f"stages[{i}]")]  # fmt: skip
        out += [f"stages[{i}]: new stage {st['name']!r}" for i, st in enumerate(after) if st["name"] not in old]
        names = [st["name"] for st in after]
        out += [f"stages: stage {name!r} removed" for name in old if name not in names]
        if not out and [st["name"] for st in before] != names:
            out.append(f"stages: order {[st['name'] for st in before]} -> {names}")
        return out
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(before) + [k for k in after if k not in before]
        return [c for k in keys for c in config_changes(before.get(k), after.get(k), f"{path}.{k}" if path else k)]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [c for i, (b, a) in enumerate(zip(before, after)) for c in config_changes(b, a, f"{path}[{i}]")]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def _checkpoint_name(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def initial_label(cfg: RunConfig) -> str:
    """The name of the first evaluation (the first stage's starting model): ``untrained`` for a preset."""
    src = cfg.stages[0].model
    return "untrained" if src.preset else f"initial ({_checkpoint_name(src.checkpoint)})"


def comparison_source(stage: StageConfig) -> ModelSource:
    """What a stage's accuracy is compared with: the model it started from (a distilled student: its teacher)."""
    return stage.distill.teacher if stage.kind == "distill" else stage.model


def comparison_label(stage: StageConfig, cfg: RunConfig) -> str:
    """The evaluation row of ``comparison_source``: an earlier stage's, the run's first (the same source as the
    first stage's model), or its own (a checkpoint or preset the run evaluates before the stage)."""
    return comparison_labels(cfg)[stage.name]


def comparison_labels(cfg: RunConfig) -> dict[str, str]:
    """``comparison_label`` of every stage. A label names a source by its preset or the last two parts of its
    checkpoint path, which two different sources can share (one preset with other overrides; ``a/sft/final`` and
    ``b/sft/final``): a later source whose label is taken gets `` #2``, `` #3``, ... so that each source is
    evaluated under its own row and a ``vs`` never compares with another model's accuracy."""
    first = cfg.stages[0].model
    owner: dict[str, ModelSource | None] = {s.name: None for s in cfg.stages}  # a stage's own row: its output
    owner[initial_label(cfg)] = first
    labels = {}
    for stage in cfg.stages:
        src = comparison_source(stage)
        if src.from_stage:
            labels[stage.name] = src.from_stage
            continue
        if src == first:
            labels[stage.name] = initial_label(cfg)
            continue
        role = "teacher" if stage.kind == "distill" else "start"
        base = f"{role} ({_checkpoint_name(src.checkpoint) if src.checkpoint else src.preset})"
        label, k = base, 2
        while label in owner and owner[label] != src:
            label, k = f"{base} #{k}", k + 1
        owner[label] = src
        labels[stage.name] = label
    return labels


def clustered_se(per_prompt: list[float]) -> float:
    """Standard error of the mean accuracy with the samples of one prompt as a cluster (they are correlated)."""
    n = len(per_prompt)
    if n < 2:
        return float("nan")
    mean = sum(per_prompt) / n
    return (sum((a - mean) ** 2 for a in per_prompt) / (n - 1) / n) ** 0.5


def paired_difference(per: list[float], base: list[float]) -> tuple[float, float]:
    """(mean accuracy difference to ``base`` on the same held-out prompts, its standard error), paired per prompt."""
    diffs = [a - b for a, b in zip(per, base)]
    return sum(diffs) / len(diffs), clustered_se(diffs)


def paired_delta(per: list[float], base: list[float] | None, label: str) -> str:
    """``+d (SE s) vs label`` (``paired_difference``), or ``-`` without a comparable ``base``."""
    if base is None or len(base) != len(per):
        return "-"
    d, se = paired_difference(per, base)
    return f"{d:+.3f} (SE {se:.3f}) vs {label}"


STAGE_STATE = ("checkpoints", "metrics.jsonl", "tensorboard", "distill_sft.jsonl", "data.json")


def clear_stage_state(stage_dir: Path) -> list[str]:
    """A fresh (not ``--resume``) stage starts from nothing: remove what an earlier run left in its directory.

    Its resumable checkpoints would otherwise be picked up by a retry (``latest_checkpoint`` takes the highest
    step, whichever run wrote it) and would outrank this run's own checkpoints in keep-last-K pruning; its metrics
    would be appended to and plotted as this run's, and a distillation whose teacher traces all fail the filter would
    train on the earlier run's ``distill_sft.jsonl``. The last exported ``final/`` stays until this run replaces it
    (atomically). Returns the names removed (also printed)."""
    removed = []
    for name in STAGE_STATE:
        path = Path(stage_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        print(f"[run] {stage_dir}: fresh start, removed {', '.join(removed)} of an earlier run "
              "(use --resume to continue it instead)", flush=True)  # fmt: skip
    return removed


def run_stage_with_retries(
    cfg: RunConfig, stage: StageConfig, state: RunState, tokenizer_dir: str, resume: bool, progress: bool,
    state_path: Path | None = None,
) -> str:
    """Run one stage in fresh actors; when an actor dies or raises, report it and retry from the checkpoint."""
    import ray
    from dsalign.alignment.data import DataError
    from dsalign.alignment.trainer import CheckpointMismatch

    from . import actors

    attempts = stage.retries + 1
    # a stage this run has not started yet starts afresh even under --resume: what its directory holds is an
    # earlier run's (e.g. this run was interrupted in an earlier stage), and continuing from it would hand that run's
    # weights on as this run's
    fresh = not resume or not state.has_started(stage.name)
    if fresh:
        clear_stage_state(cfg.stage_dir(stage))
    if state.started is not None and stage.name not in state.started:
        state.started.append(stage.name)
        if state_path is not None:
            state.save(state_path)
    for attempt in range(1, attempts + 1):
        sources = resolve_sources(cfg, stage, state)
        try:
            return actors.run_stage(cfg, stage, sources, tokenizer_dir, resume=not fresh or attempt > 1,
                                    attempt=attempt)  # fmt: skip
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, actors.StageWorkerError) as e:
            step = actors.last_checkpoint_step(cfg.stage_dir(stage))
            what = "its worker process died" if isinstance(e, ray.exceptions.RayActorError) else "it raised"
            detail = str(e).strip() or type(e).__name__
            if isinstance(e, ray.exceptions.RayActorError):  # Ray's many lines of generic advice: keep the first
                detail = detail.splitlines()[0]
            at = f"last checkpoint: step {step}" if step is not None else "no checkpoint yet"
            msg = f"stage {stage.name!r} attempt {attempt}/{attempts} failed: {what} ({at}): {detail}"
            if isinstance(getattr(e, "cause", None), (DataError, ConfigError, CheckpointMismatch)):  # fails alike again
                raise StageFailed(msg + "; not retried: the stage's input is at fault") from e
            if attempt == attempts:
                raise StageFailed(msg + f"; no retries left (stage retries={stage.retries})") from e
            # once: the final failure is reported by whoever catches StageFailed (the CLI prints it)
            print(msg + "; retrying from " + ("the last checkpoint" if step is not None else "the start"), flush=True)
    raise AssertionError("unreachable")
