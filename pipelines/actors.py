"""Ray actors and tasks: with ``pools.py`` (rollout and reward workers), ``placement.py`` (placement groups),
``runner.py`` and ``jobs.py``, the only code that talks to Ray.

- ``StageWorker``: one process of a stage's trainer group. With ``num_workers > 1`` the workers form one
  ``torch.distributed`` group (gloo on CPU, NCCL on GPU; rendezvous on rank 0's node) and run the stage SPMD; rank 0
  logs, checkpoints and exports. In the default colocated mode the rollout engine decodes with the trainer's own
  model object, so weights are handed over in process, never converted or copied. In split mode (GRPO) rollout
  workers decode instead and get the trainer's weights before every iteration (``pools.py``).
- ``run_stage``: reserves the stage's placement group (``placement.py``: one bundle per trainer, rollout and reward
  worker), starts the actors in it, and removes actors and group when the stage ends or fails.
- ``prepare_tokenizer`` / ``evaluate_source``: short tasks for the driver (tokenizer training, held-out evals).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import ray

from .config import RunConfig, StageConfig
from .placement import StageLayout, in_bundle, release, reserve
from .pools import ProcessInfo, RewardPool, RewardWorker, RolloutPool, RolloutWorker, assigned_device
from .schema import from_dict, to_dict
from .stages import Fault, pid_alive


class StageWorkerError(RuntimeError):
    """A stage raised inside its worker (or could not start); the message is the error, ``cause`` the worker's
    exception. The driver's retry loop adds the stage, attempt and last checkpoint."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _threads(cpus: float) -> int:
    """torch threads for an actor holding ``cpus`` CPUs: its whole CPUs, at least one."""
    return max(1, int(cpus))


@ray.remote
class StageWorker(ProcessInfo):
    """Runs one stage (SFT, GRPO or distillation) in its own process."""

    def __init__(self, num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))

    def address(self) -> tuple[str, int]:
        """This worker's node address and a free port on it: rank 0's serve as the group's rendezvous."""
        return ray.util.get_node_ip_address(), _free_port()

    def join_group(self, rank: int, world_size: int, master: tuple[str, int]) -> None:
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")  # fmt: skip
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)

    def run(self, run_cfg: dict, stage_name: str, sources: dict, tokenizer_dir: str, resume: bool,
            fault: Fault | None, pools: dict[str, Any]) -> str:  # fmt: skip
        from .stages import STAGE_RUNNERS, StageEnv, load_tokenizer

        run = from_dict(RunConfig, run_cfg)
        stage = next(s for s in run.stages if s.name == stage_name)
        env = StageEnv(run=run, stage=stage, out_dir=run.stage_dir(stage), tokenizer=load_tokenizer(tokenizer_dir),
                       sources=sources, resume=resume, fault=fault, rollout_pool=pools.get("rollout"),
                       reward_pool=pools.get("reward"))  # fmt: skip
        env.out_dir.mkdir(parents=True, exist_ok=True)
        return str(STAGE_RUNNERS[stage.kind](env))


def _local_node_down(grace_s: float = 1.0) -> bool:
    """Whether a process of the Ray node this driver started has exited, waiting up to ``grace_s`` for one to (a
    signal to the whole process group reaches them as it reaches the driver). False when the driver joined a running
    cluster (it started no node processes) or Ray cannot tell; Ctrl-C alone leaves the node up (Ray starts its
    processes with SIGINT blocked), and then costs the wait."""
    try:
        node = ray._private.worker.global_worker.node
        procs = [info.process for infos in node.all_processes.values() for info in infos if info.process is not None]
    except Exception:  # noqa: BLE001 - Ray's private API; when in doubt, clean up as usual
        return False
    deadline = time.monotonic() + grace_s
    while procs:
        if any(p.poll() is not None for p in procs):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


def _died_peer(refs: list, wait_s: float = 3.0) -> Exception | None:
    """The ``RayActorError`` of a stage worker that died, if one did within ``wait_s``: when a worker is killed its
    peers fail in their collectives ("Connection reset by peer"), and that error can reach the driver first."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return e
        except Exception:  # noqa: BLE001 - a raised error is what the caller reports anyway
            continue
    return None


def _kill_local(pids: list[int]) -> None:
    """SIGKILL the stage's actor processes on this machine (the local node ``_local_node_down`` found going): a
    checkpoint they were writing stays a temp directory, which the next save or resume ignores."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait until the stage's actor processes on this machine have exited (SIGKILL what is left at the timeout), so
    that nothing the run reports as stopped still writes to its directory."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        if alive:
            time.sleep(0.05)
    _kill_local(alive)


def _running(pid: int) -> bool:
    """``stages.pid_alive``, and not a zombie (exited, not yet reaped by its parent: it has stopped)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def last_checkpoint_step(stage_dir: Path) -> int | None:
    from dsalign.alignment.trainer import latest_checkpoint

    latest = latest_checkpoint(Path(stage_dir) / "checkpoints")
    return None if latest is None else int(latest.name.split("_")[-1])


def _fault(stage: StageConfig, attempt: int) -> Fault | None:
    """Testing hook: ``DSALIGN_FAULT=<stage>:<step>[:raise][@<rank>]`` makes the stage's worker(s) exit (or raise)
    after that step, first attempt only (``stages.Fault``)."""
    spec = os.environ.get("DSALIGN_FAULT")
    if not spec or attempt != 1:
        return None
    name, fault = Fault.parse(spec)
    return fault if name == stage.name else None


def start_actors(cfg: RunConfig, stage: StageConfig, sources: dict, tokenizer_dir: str, pg: Any,
                 layout: StageLayout) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The stage's trainer workers (joined into one torch.distributed group) and its rollout / reward pools, each
    actor in its own bundle of ``pg``."""
    res = stage.resources
    pools: dict[str, Any] = {}
    if layout.rollout:
        p = stage.grpo
        slots = -(-p.prompts_per_iter // len(layout.rollout)) * p.group_size  # one engine slot per sample of a chunk
        opts = {"num_cpus": res.rollout_cpus_per_worker, "num_gpus": res.rollout_gpus_per_worker, "max_restarts": 0}
        pools["rollout"] = RolloutPool([
            RolloutWorker.options(**opts, **in_bundle(pg, b)).remote(
                sources["model"], tokenizer_dir, cfg.seed, slots, _threads(res.rollout_cpus_per_worker),
                stage.training.compute_dtype, p.speculative)
            for b in layout.rollout
        ])  # fmt: skip
    if layout.reward:
        d = stage.distill
        group = (stage.grpo.group_size if stage.kind == "grpo"
                 else d.on_policy.samples_per_prompt if stage.on_policy_distill else d.samples_per_prompt)  # fmt: skip
        opts = {"num_cpus": res.reward_cpus_per_worker, "max_restarts": 0}
        workers = [RewardWorker.options(**opts, **in_bundle(pg, b)).remote(stage.rewards,
                                                                          _threads(res.reward_cpus_per_worker))
                   for b in layout.reward]  # fmt: skip
        pools["reward"] = RewardPool(workers, group)
    opts = {"num_cpus": res.cpus_per_worker, "num_gpus": res.gpus_per_worker, "max_restarts": 0}
    trainers = [StageWorker.options(**opts, **in_bundle(pg, b)).remote(_threads(res.cpus_per_worker))
                for b in layout.trainers]  # fmt: skip
    if len(trainers) > 1:
        master = ray.get(trainers[0].address.remote())
        ray.get([w.join_group.remote(r, len(trainers), master) for r, w in enumerate(trainers)])
    return trainers, pools


def run_stage(cfg: RunConfig, stage: StageConfig, sources: dict, tokenizer_dir: str, resume: bool,
              attempt: int) -> str:  # fmt: skip
    """Reserve the stage's placement group, start its actors, run it to the end, tear everything down; returns the
    exported checkpoint dir."""
    try:
        pg, layout = reserve(stage)
    except TimeoutError as e:
        raise StageWorkerError(str(e)) from e
    actors: list[Any] = []
    pids: list[int] = []
    node_down = False
    try:
        trainers, pools = start_actors(cfg, stage, sources, tokenizer_dir, pg, layout)
        actors = trainers + [w for pool in pools.values() for w in pool.workers]
        here = ray.get_runtime_context().get_node_id()  # (a host name can repeat across machines; a node id not)
        pids = [pid for node, pid in ray.get([w.process.remote() for w in actors]) if node == here]
        fault = _fault(stage, attempt)
        refs = [w.run.remote(to_dict(cfg), stage.name, sources, tokenizer_dir, resume, fault, pools) for w in trainers]
        try:
            results = ray.get(refs)  # raises on the first failed task, not after every task ended
        except ray.exceptions.RayTaskError as e:
            died = _died_peer(refs)  # a rank whose peer was killed raises the broken connection, maybe first
            if died is not None:
                raise died from e
            raise StageWorkerError(f"{type(e.cause).__name__}: {e.cause}", e.cause) from e
        return results[0]
    except KeyboardInterrupt:
        # a SIGTERM to the run's whole process group stops the local Ray node this driver started too; a Ray call
        # then blocks for a minute and aborts the driver before the partial report is written. Without a node there
        # is nothing to clean up (a worker whose node is gone stops at its next step: stages.StageLoop)
        node_down = _local_node_down()
        if node_down:  # its raylet may take seconds to go, and the workers train on meanwhile: stop them here
            _kill_local(pids)
        raise
    finally:
        if not node_down:
            for w in actors:
                ray.kill(w, no_restart=True)
            release(pg)
            _wait_gone(pids)  # ray.kill returns at once: a worker would train on (and checkpoint) a moment longer


@ray.remote(num_cpus=1)
def prepare_tokenizer(run_cfg: dict) -> str:
    return demo_tokenizer_dir(run_cfg)


def demo_tokenizer_dir(run_cfg: dict) -> str:
    """The run's tokenizer directory. ``tokenizer: demo`` trains one locally from the task's texts and keeps it in
    ``output_dir/tokenizer`` with the task settings it was made from (``task.json``); a run whose task differs
    (another ``max_value`` adds number tokens and moves ids) trains a new one instead of reusing it, so the run uses
    the tokenizer that preflight checked its checkpoints against."""
    from .demo_tokenizer import save_tokenizer, task_tokenizer

    run = from_dict(RunConfig, run_cfg)
    if run.tokenizer != "demo":
        return str(Path(run.tokenizer).resolve())
    out = Path(run.output_dir) / "tokenizer"
    stamp = json.dumps(to_dict(run.task), sort_keys=True)
    made_from = out / "task.json"
    if (out / "tokenizer.json").is_file() and made_from.is_file() and made_from.read_text() == stamp:
        return str(out.resolve())
    tmp, old = out.with_name("tokenizer.tmp"), out.with_name("tokenizer.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    save_tokenizer(task_tokenizer(run.task), tmp)
    (tmp / "task.json").write_text(stamp)
    if out.exists():
        print(f"[run] {out}: made for other task settings (or by an older version); training a new one", flush=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
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
    model = load_source(source, tok, run.seed).to(assigned_device()).eval()
    return evaluate(model, tok, run, held_out_prompts(run, budget=length_target))
