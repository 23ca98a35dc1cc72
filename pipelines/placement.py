"""Where a stage's actors run: one Ray placement group per stage attempt, one bundle per actor.

The bundles are, in order, the trainer workers, the rollout workers (split mode) and the reward workers. Reserving
them together makes co-location explicit (``PACK``: as few nodes as possible; ``STRICT_PACK``: one node; ``SPREAD`` /
``STRICT_SPREAD``: across nodes) and makes a stage that cannot fit fail with a message instead of starting some
actors and waiting forever for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Resources, StageConfig


@dataclass(frozen=True)
class StageLayout:
    """Bundle indices of each role in the stage's placement group."""

    trainers: range
    rollout: range
    reward: range
    bundles: list[dict[str, float]]


def stage_layout(res: Resources, kind: str) -> StageLayout:
    """The bundles a stage reserves. Rollout workers exist only for split-mode GRPO, reward workers only for stages
    that score (GRPO, distillation); preflight refuses the other combinations."""
    trainer = _bundle(res.cpus_per_worker, res.gpus_per_worker)
    n_rollout = res.rollout_workers if (kind == "grpo" and res.mode == "split") else 0
    n_reward = res.reward_workers if kind in ("grpo", "distill") else 0
    bundles = (
        [dict(trainer) for _ in range(res.num_workers)]
        + [_bundle(res.rollout_cpus_per_worker, res.rollout_gpus_per_worker) for _ in range(n_rollout)]
        + [{"CPU": res.reward_cpus_per_worker} for _ in range(n_reward)]
    )
    t, r = res.num_workers, res.num_workers + n_rollout
    return StageLayout(range(0, t), range(t, r), range(r, r + n_reward), bundles)


def total_cpus(layout: StageLayout) -> float:
    return sum(b["CPU"] for b in layout.bundles)


def reserve(stage: StageConfig) -> tuple[Any, StageLayout]:
    """Create the stage's placement group and wait until the cluster has placed it; returns (group, layout).

    Raises ``TimeoutError`` naming the bundles and the cluster's resources when it does not fit within
    ``resources.placement_timeout_s`` (the group is removed first)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    res = stage.resources
    layout = stage_layout(res, stage.kind)
    pg = placement_group(layout.bundles, strategy=res.placement_strategy, name=f"dsalign-{stage.name}")
    ready, _ = ray.wait([pg.ready()], timeout=res.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(
            f"stage {stage.name!r}: the cluster could not place its {len(layout.bundles)} bundles {layout.bundles} "
            f"(strategy {res.placement_strategy}) within {res.placement_timeout_s:.0f}s; cluster resources: "
            f"{ray.cluster_resources()}. Lower resources.*cpus_per_worker / worker counts or add nodes."
        )
    return pg, layout


def release(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def in_bundle(pg: Any, index: int) -> dict[str, Any]:
    """Actor options that schedule into bundle ``index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
    }
