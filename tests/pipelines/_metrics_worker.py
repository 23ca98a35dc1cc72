"""One rank of the rollout-metrics test (``python _metrics_worker.py RANK WORLD PORT``): each rank logs its share."""

import json
import sys
from types import SimpleNamespace

import torch.distributed as dist
from dsalign.pipelines.stages import grpo_metrics


def share(rank: int):
    """Rank 0: 3 completions, one unscorable; rank 1: 1 completion, longer and better rewarded."""
    if rank == 0:
        lens, rewards, acc = [2, 3, 1], [1.0, None, 0.0], [1.0, None, 0.0]
        extra = {"dynamic_sampling/rounds": 1, "dynamic_sampling/groups_dropped": 0}
    else:
        lens, rewards, acc = [10], [0.5], [1.0]
        extra = {"dynamic_sampling/rounds": 3, "dynamic_sampling/groups_dropped": 4}
    cut = {10}  # rank 1's completion hit max_new_tokens: 1 of the 4 completions is truncated
    comps = [SimpleNamespace(token_ids=[7] * n, finish_reason="length" if n in cut else "stop", drafted=n,
                             accepted=n // 2) for n in lens]  # speculative: 6 drafts (2 accepted) on rank 0, 10 (5)
    scored = SimpleNamespace(rewards=rewards, components={"math_accuracy": acc}, metrics={"errors/total": rank + 1.0})
    return comps, scored, 2.0 + 2 * rank, extra


if __name__ == "__main__":
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comps, scored, gen_s, extra = share(rank)
    print("METRICS " + json.dumps(grpo_metrics({}, comps, scored, gen_s, extra)))
    dist.destroy_process_group()
