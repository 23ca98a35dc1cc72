"""Ray actors and tasks: the only place (with ``runner.py`` and ``jobs.py``) that talks to Ray.

- ``StageWorker``: one process of a stage's trainer group. With ``num_workers > 1`` the workers form one
  ``torch.distributed`` group (gloo on CPU, NCCL on GPU) and run the stage SPMD; rank 0 logs, checkpoints and
  exports. In the default colocated mode the rollout engine decodes with the trainer's own model object, so
  weights are handed over in process, never converted or copied.
- ``prepare_tokenizer`` / ``evaluate_source``: short tasks for the driver (tokenizer training, held-out evals).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import ray

from .config import RunConfig, StageConfig
from .schema import from_dict, to_dict


class StageWorkerError(RuntimeError):
    """A stage raised inside its worker; the message carries the stage, the step reached and the error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote
class StageWorker:
    """Runs one stage (SFT, GRPO or distillation) in its own process."""

    def __init__(self, rank: int, world_size: int, master: tuple[str, int] | None, num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.rank, self.world = rank, world_size
        if world_size > 1:
            import torch.distributed as dist

            os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                              WORLD_SIZE=str(world_size), LOCAL_RANK="0")  # fmt: skip
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size)

    def pid(self) -> int:
        return os.getpid()

    def run(self, run_cfg: dict, stage_name: str, sources: dict, tokenizer_dir: str, resume: bool,
            fault_at_step: int | None) -> str:  # fmt: skip
        from .stages import STAGE_RUNNERS, StageEnv, load_tokenizer

        run = from_dict(RunConfig, run_cfg)
        stage = next(s for s in run.stages if s.name == stage_name)
        env = StageEnv(run=run, stage=stage, out_dir=run.stage_dir(stage), tokenizer=load_tokenizer(tokenizer_dir),
                       sources=sources, resume=resume, fault_at_step=fault_at_step)  # fmt: skip
        env.out_dir.mkdir(parents=True, exist_ok=True)
        return str(STAGE_RUNNERS[stage.kind](env))


def last_checkpoint_step(stage_dir: Path) -> int | None:
    from dsalign.alignment.trainer import latest_checkpoint

    latest = latest_checkpoint(Path(stage_dir) / "checkpoints")
    return None if latest is None else int(latest.name.split("_")[-1])


def _fault_step(stage: StageConfig, attempt: int) -> int | None:
    """Testing hook: ``DSALIGN_FAULT=<stage>:<step>`` kills the stage's worker after that step, first attempt only."""
    spec = os.environ.get("DSALIGN_FAULT")
    if not spec or attempt != 1:
        return None
    name, _, step = spec.partition(":")
    return int(step) if name == stage.name else None


def run_stage(cfg: RunConfig, stage: StageConfig, sources: dict, tokenizer_dir: str, resume: bool,
              attempt: int) -> str:  # fmt: skip
    """Start the stage's worker group, run it to the end, tear it down; returns the exported checkpoint dir."""
    res = stage.resources
    n = res.num_workers
    master = ("127.0.0.1", _free_port()) if n > 1 else None
    threads = max(1, int(res.cpus_per_worker))
    opts = {"num_cpus": res.cpus_per_worker, "num_gpus": res.gpus_per_worker, "max_restarts": 0}
    workers = [StageWorker.options(**opts).remote(r, n, master, threads) for r in range(n)]
    fault = _fault_step(stage, attempt)
    try:
        refs = [w.run.remote(to_dict(cfg), stage.name, sources, tokenizer_dir, resume, fault) for w in workers]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            step = last_checkpoint_step(cfg.stage_dir(stage))
            raise StageWorkerError(f"stage {stage.name!r} raised at/after step {step}: {e.cause!r}") from e
        return results[0]
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)


@ray.remote(num_cpus=1)
def prepare_tokenizer(run_cfg: dict) -> str:
    """The run's tokenizer directory: ``tokenizer: demo`` trains one locally (once, then reused)."""
    from .demo_task import corpus_for_tokenizer
    from .demo_tokenizer import save_tokenizer, train_tokenizer

    run = from_dict(RunConfig, run_cfg)
    if run.tokenizer != "demo":
        return str(Path(run.tokenizer).resolve())
    out = Path(run.output_dir) / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name("tokenizer.tmp")
        save_tokenizer(train_tokenizer(corpus_for_tokenizer(run.task)), tmp)
        tmp.replace(out)
    return str(out.resolve())


@ray.remote(num_cpus=1)
def evaluate_source(
    run_cfg: dict, source: dict[str, Any], tokenizer_dir: str, length_target: int | None = None
) -> dict:
    """Held-out metrics of a model source (a preset's untrained model or a stage's exported checkpoint)."""
    import torch

    from .stages import evaluate, held_out_prompts, load_source, load_tokenizer

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    run = from_dict(RunConfig, run_cfg)
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(run.seed)
    model = load_source(source, tok, run.seed).eval()
    return evaluate(model, tok, run, held_out_prompts(run, budget=length_target))
