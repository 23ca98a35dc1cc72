"""Exact, atomic training checkpoints and the HF export.

Layout under a checkpoint root::

    step_00000005/
        trainer_state.json      step, world size, EP size (written by rank 0)
        rank00000.pt            this rank's model state (incl. router biases and its expert shard), optimizer and
                                scheduler state (ZeRO partition under DeepSpeed), RNG states, data position; under
                                ZeRO-3 only rank 0's file holds the (gathered) parameters, the others their buffers
        rank00001.pt            ...

Atomicity: every rank writes into ``.tmp-step_00000005-<id>/``; after a barrier rank 0 fsyncs and renames it to
``step_00000005``. A crash at any point leaves either the old set of ``step_*`` directories or the new one; resume
only considers names matching ``step_<8 digits>`` that hold ``trainer_state.json``, so a partial temp dir is never
picked (and the next save removes it). Keep-last-K deletes the oldest complete checkpoints after a successful save.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dsalign.model import save_checkpoint as save_hf_checkpoint

from .distributed import full_model_for_export, gathered_parameters, is_zero3
from .step import Runner

_ASIDE_PREFIX = ".old-"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Every RNG the step may draw from: torch CPU (and CUDA), python ``random``, numpy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name.removeprefix(_ASIDE_PREFIX))
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            (aside if child.name.startswith(_ASIDE_PREFIX) else found)[int(m.group(1))] = child
    # a re-save of step X moves step_X aside, then renames its new copy in: a crash between the two leaves only the
    # aside copy, which is still a complete checkpoint of step X
    return sorted({**aside, **found}.items())


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, payload: Any) -> None:
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _shared_tmp_name(step: int) -> str:
    name = [f".tmp-step_{step:08d}-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _parameter_names(model: torch.nn.Module) -> set[str]:
    """Every name of every parameter, tied ones (embedding / head) under each of their names."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def save_training_checkpoint(root: str | Path, step: int, runner: Runner, data_state: Any = None,
                             keep_last: int = 3) -> Path:  # fmt: skip
    """Save everything needed to continue bit-exactly after ``step`` optimizer steps; returns the final path.

    ``data_state`` is this rank's data position (any picklable object, e.g. a sampler's state); it comes back
    from ``load_training_checkpoint``. Collective under ``torch.distributed``: every rank must call it.
    """
    root = Path(root)
    rank, world = _rank_world()
    final = root / f"step_{step:08d}"
    tmp = root / _shared_tmp_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        for old in root.glob(f"{_ASIDE_PREFIX}step_*"):  # a crashed re-save: the old copy is the checkpoint
            original = root / old.name.removeprefix(_ASIDE_PREFIX)
            if original.exists() or not (old / STATE_FILE).is_file():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, original)
        tmp.mkdir()
    _barrier()
    try:
        # ZeRO-3: every rank holds the same full parameters inside the gather, so only rank 0 writes them (N copies
        # would cost N times the disk; loading re-partitions rank 0's copy); buffers (router biases) are not
        # partitioned and every rank keeps its own. Otherwise each rank's state is its own (its expert shard).
        params = _parameter_names(runner.model) if is_zero3(runner.model) and rank != 0 else set()
        with gathered_parameters(runner.model):
            model_state = {k: v.detach().clone() for k, v in runner.model.state_dict().items() if k not in params}
        payload = {
            "model": model_state,
            "runner": runner.state_dict(),
            "rng": rng_state(),
            "data_state": data_state,
        }
        _write_file(tmp / f"rank{rank:05d}.pt", payload)
        _barrier()
        if rank == 0:
            meta = {"step": step, "world_size": world, "ep_size": _ep_size(runner), "format": 1}
            with open(tmp / STATE_FILE, "w") as f:  # flushed to disk before the rename publishes the directory
                f.write(json.dumps(meta, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            aside = root / f"{_ASIDE_PREFIX}step_{step:08d}"
            if final.exists():  # re-saving the same step: moved aside, deleted once the new copy is in place
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
            os.rename(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(aside, ignore_errors=True)
            # Checkpoints past this step belong to a run that was rewound (resumed from an earlier checkpoint):
            # auto-resume takes the highest step, so they go; then keep the last ``keep_last``.
            kept = []
            for saved, path in list_checkpoints(root):
                if saved > step:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    kept.append(path)
            for old in kept[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def _ep_size(runner: Runner) -> int:
    cfg = getattr(runner, "cfg", None)
    return int(getattr(cfg, "ep_size", 1))


class CheckpointMismatch(ValueError):
    """A training checkpoint this run cannot resume from as configured (another world size or EP size, a damaged
    state file): trying again fails the same way, so the pipeline does not retry it."""


def load_training_checkpoint(path: str | Path, runner: Runner) -> tuple[int, Any]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint directory; returns (step, data_state).

    ``path`` may be a checkpoint root: its latest complete checkpoint is used.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint (step_XXXXXXXX/{STATE_FILE}) under {path}")
        path = latest
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except ValueError as e:
        raise CheckpointMismatch(f"{path / STATE_FILE}: damaged ({e}); delete {path} to resume from the checkpoint "
                                 "before it") from None  # fmt: skip
    rank, world = _rank_world()
    if meta["world_size"] != world:
        raise CheckpointMismatch(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                                 f"{world}; resume with the same world size (and EP size)")  # fmt: skip
    if meta.get("ep_size", _ep_size(runner)) != _ep_size(runner):  # (older checkpoints do not say)
        raise CheckpointMismatch(f"checkpoint {path} was written with ep_size {meta['ep_size']} (its expert shards), "
                                 f"this run uses ep_size {_ep_size(runner)}; resume with the same ep_size")  # fmt: skip
    shard = path / f"rank{rank:05d}.pt"
    try:
        payload = torch.load(shard, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise RuntimeError(f"{shard}: cannot be read ({type(e).__name__}: {e}); delete {path} to resume from the "
                           "checkpoint before it") from e  # fmt: skip
    with gathered_parameters(runner.model, modifier_rank=0):  # ZeRO-3: rank 0's parameters, re-partitioned to all
        if is_zero3(runner.model) and rank != 0:  # this rank's file holds its buffers only (save_training_checkpoint)
            missing, unexpected = runner.model.load_state_dict(payload["model"], strict=False)
            stray = sorted(set(missing) - _parameter_names(runner.model))
            if unexpected or stray:
                raise ValueError(f"{shard}: does not match the model (missing {stray[:5]}, unexpected "
                                 f"{unexpected[:5]})")  # fmt: skip
        else:
            runner.model.load_state_dict(payload["model"])
    runner.load_state_dict(payload["runner"])
    from .step import refresh_fp8_weights

    refresh_fp8_weights(runner.model)  # restores through .data do not move the version counters the caches key on
    set_rng_state(payload["rng"])
    return int(meta["step"]), payload["data_state"]


def export_hf(runner: Runner, path: str | Path, **kwargs: Any) -> Path | None:
    """Write the model in the HF format (``dsalign.model.save_checkpoint``) for serving; rank 0 writes.

    Expert-parallel models are gathered first (``distributed.gather_experts``); LoRA models must be merged
    (``lora.merge_lora``) before export.
    """
    model = full_model_for_export(runner.model)
    rank, _ = _rank_world()
    out = save_hf_checkpoint(model, path, **kwargs) if rank == 0 else None
    _barrier()
    return out
