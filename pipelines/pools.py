"""Rollout workers (split-mode GRPO) and reward workers: Ray actors, and the pools a stage worker calls.

The driver (``actors.run_stage``) starts the workers in the stage's placement group and hands the pools to the
stage's trainer workers, which call them like the in-process objects they replace:

- ``RolloutPool.generate`` = ``stages.LocalRollout.generate``: the prompts are cut into contiguous chunks, one per
  worker; each worker owns a model built from the stage's source checkpoint (same code and kernels as the trainer)
  and a ``RolloutEngine``. A prompt's sampling seed comes from its index in the iteration's batch, so which worker
  samples it does not change the seed.
- ``RolloutPool.push_weights``: the weight broadcast. The trainer's rank 0 puts its state dict (CPU tensors) in the
  Ray object store once per iteration; every worker fetches that one object and copies it into its model with
  ``RolloutEngine.update_weights``. We use the object store rather than a ``torch.distributed`` broadcast because it
  needs no second process group spanning trainer and rollout processes (which would have to be re-formed on every
  retry); the cost is one serialization through host memory per iteration, which a GPU cluster would replace with an
  NCCL broadcast (not implemented).
- ``RewardPool(prompts, completions, ids, **columns)`` = ``RewardCombiner(...)``: whole groups per worker, results
  concatenated in order (``dsalign.rewards.concat_results``), for rewards heavy enough to deserve processes of their
  own (``code_execution``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import ray


def contiguous_chunks(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into at most ``parts`` contiguous, non-empty ranges, sizes differing by at most one.

    >>> [list(r) for r in contiguous_chunks(5, 2)], contiguous_chunks(1, 3)
    ([[0, 1, 2], [3, 4]], [range(0, 1)])
    """
    base, extra = divmod(count, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        if size:
            out.append(range(start, start + size))
        start += size
    return out


def assigned_device() -> str:
    """Where a Ray actor or task computes: ``cuda`` when Ray assigned it a GPU (and torch sees one), else ``cpu``."""
    import torch

    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class ProcessInfo:
    """Mixed into the stage's actor classes: where each one runs."""

    def process(self) -> tuple[str, int]:
        """(Ray node id, process id): the driver stops the workers on its own node itself on an interrupt."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


@ray.remote
class RolloutWorker(ProcessInfo):
    """A model copy and a ``RolloutEngine``; takes weights from the trainer, returns completions with log-probs."""

    def __init__(self, source: dict[str, Any], tokenizer_dir: str, seed: int, max_batch_size: int, num_threads: int,
                 compute_dtype: str = "fp32", speculative: bool = False):  # fmt: skip
        import torch

        from .stages import LocalRollout, load_source, load_tokenizer, rollout_engine

        torch.set_num_threads(max(1, num_threads))
        self.tokenizer = load_tokenizer(tokenizer_dir)
        device = assigned_device()  # rollout_gpus_per_worker
        model = load_source(source, self.tokenizer, seed).to(device)
        self.engine = rollout_engine(model, self.tokenizer, max_batch_size, speculative)
        bf16 = compute_dtype == "bf16"  # decode in the trainer's precision (training.compute_dtype)

        def autocast():
            return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

        self.local = LocalRollout(self.engine, self.tokenizer, autocast=autocast)

    def update_weights(self, state: dict, verify: bool) -> str | None:
        """Copy the trainer's weights in; with ``verify`` return the digest of the whole model afterwards."""
        from .stages import weights_digest

        self.engine.update_weights(state)
        return weights_digest(self.engine.model.state_dict()) if verify else None

    def generate(self, rows: list[dict], row_ids: list[int], n: int, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float) -> tuple[list[list[int]], list]:  # fmt: skip
        return self.local.generate(rows, row_ids, n, temperature, max_new_tokens, seed, top_p)


class RolloutPool:
    """Handles to a stage's rollout workers (picklable: the driver passes it to the trainer workers)."""

    def __init__(self, workers: list[Any]):
        self.workers = workers

    def ep_phase(self) -> contextlib.AbstractContextManager:
        """Rollout workers hold whole (unsharded) models: nothing to keep in step (``LocalRollout.ep_phase``)."""
        return contextlib.nullcontext()

    def push_weights(self, state: dict, verify: bool) -> list[str | None]:
        """Broadcast ``state`` (name -> CPU tensor) to every worker; returns their digests (``None`` without verify)."""
        ref = ray.put(state)
        return ray.get([w.update_weights.remote(ref, verify) for w in self.workers])

    def generate(self, rows: list[dict], row_ids: list[int], n: int, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0) -> tuple[list[list[int]], list]:  # fmt: skip
        """``n`` completions per row, ordered by (row, sample) as one engine would return them."""
        parts = contiguous_chunks(len(rows), len(self.workers))
        refs = [
            w.generate.remote(
                [rows[i] for i in part], [row_ids[i] for i in part], n, temperature, max_new_tokens, seed, top_p
            )  # fmt: skip
            for w, part in zip(self.workers, parts)
        ]
        prompt_ids: list[list[int]] = []
        comps: list = []
        for part, (ids, done) in zip(parts, ray.get(refs)):
            prompt_ids += ids
            comps += [dataclasses.replace(c, request_index=c.request_index + part.start) for c in done]
        return prompt_ids, comps


@ray.remote
class RewardWorker(ProcessInfo):
    """Scores slices of a batch with the stage's rewards (loaded once, in this process)."""

    def __init__(self, entries: list, num_threads: int):
        import torch

        from .stages import build_combiner

        torch.set_num_threads(max(1, num_threads))
        self.combiner = build_combiner(entries)

    def names(self) -> list[str]:
        return list(self.combiner.fns)

    def score(self, prompts: list, completions: list, completion_ids: list | None, columns: dict[str, Any]):
        return self.combiner(prompts, completions, completion_ids, **columns)


class RewardPool:
    """Handles to a stage's reward workers; called like a ``RewardCombiner``. Samples come in groups of
    ``group_size`` consecutive rows (a prompt's samples), and a group is never split, so group rewards
    (``kimi_length``) see what they would see in process."""

    def __init__(self, workers: list[Any], group_size: int):
        self.workers, self.group_size = workers, group_size
        self._names: list[str] | None = None

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **columns: Any):
        from dsalign.rewards import concat_results

        n, g = len(completions), self.group_size
        if n % g:
            raise ValueError(f"RewardPool: {n} completions are not whole groups of {g}")
        if self._names is None:
            self._names = ray.get(self.workers[0].names.remote())
        refs = []
        for part in contiguous_chunks(n // g, len(self.workers)):
            s = slice(part.start * g, part.stop * g)
            cols = {k: v[s] if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
            ids = None if completion_ids is None else completion_ids[s]
            refs.append(self.workers[len(refs)].score.remote(prompts[s], completions[s], ids, cols))
        return concat_results(ray.get(refs), self._names)
