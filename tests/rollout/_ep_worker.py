"""One rank of the expert-parallel generation test (``python _ep_worker.py RANK WORLD PORT SPECULATIVE``).

Each rank decodes its own prompts with an expert-sharded tiny model (EP = 2, gloo) and checks its completions against
the same engine on the full, unsharded model. The ranks' work differs on purpose: rank 0 decodes long completions in
one ``generate`` call, rank 1 short ones over two calls plus an empty call inside one ``ep_phase`` (as dynamic
sampling does); without lockstep, a rank that finishes early stops joining the MoE all-to-alls and the other hangs.
"""

import copy
import sys

import torch
import torch.distributed as dist
from dsalign.alignment.rollout import RolloutEngine
from dsalign.alignment.sampling_params import SamplingParams
from dsalign.alignment.trainer.distributed import ParallelGroups, shard_experts
from dsalign.kernels.grouped_gemm import _CAST_CACHE
from dsalign.model import ModelConfig, Transformer


def refused_requests(rank: int, ep: RolloutEngine) -> None:
    """Rank 1 passes a prompt longer than the context: it raises at validation, and rank 0, waiting for rank 1's
    forwards, raises too (it used to wait until the group's timeout)."""
    sp = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    try:
        ep.generate([[5] * (200 if rank == 1 else 4)], sp)
    except (ValueError, RuntimeError) as e:
        print(f"rank {rank}: raised {type(e).__name__}: {e}")
    else:
        print(f"rank {rank}: no error")


def failing_scorer(rank: int, ep: RolloutEngine) -> None:
    """Rank 1 fails between generate calls inside an ``ep_phase`` (as when its reward scorer raises during dynamic
    sampling) while rank 0 still decodes: rank 0 raises too (it used to wait until the group's timeout)."""
    sp = SamplingParams(max_new_tokens=30 if rank == 0 else 2, temperature=0, ignore_eos=True)
    try:
        with ep.ep_phase():
            ep.generate([[5, 6, 7]], sp)
            if rank == 1:
                raise RuntimeError("scorer failed")
    except RuntimeError as e:
        print(f"rank {rank}: raised RuntimeError: {e}")
    else:
        print(f"rank {rank}: no error")


def main() -> None:
    rank, world, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    speculative = mode == "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = Transformer(ModelConfig.preset("tiny")).eval()
    sharded = copy.deepcopy(full)
    shard_experts(sharded, ParallelGroups(ep_size=world, ep_group=dist.group.WORLD, edp_group=None, group_name="ep"))
    ep = RolloutEngine(sharded, max_batch_size=2, max_len=96, speculative=speculative)
    if mode in ("refuse", "scorer"):
        (refused_requests if mode == "refuse" else failing_scorer)(rank, ep)
        dist.destroy_process_group()
        return
    ref = RolloutEngine(full, max_batch_size=2, max_len=96, speculative=speculative)
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 9, 3)]
    if rank == 0:
        calls = [(prompts, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))]
    else:
        calls = [
            (prompts[:1], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)),
            ([], None),
            (prompts[1:], SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True)),
        ]
    with ep.ep_phase():
        got = [ep.generate(p, sp) for p, sp in calls]
    worst = 0.0
    for (p, sp), out in zip(calls, got):
        want = ref.generate(p, sp)
        assert [c.token_ids for c in out] == [c.token_ids for c in want], (rank, p)
        for a, b in zip(out, want):
            worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)])
    assert worst <= 1e-4, worst
    # outside a phase every call meets the group at its end: both ranks call twice, with different lengths
    for n_new in ((30, 4) if rank == 0 else (2, 12)):
        out = ep.generate(prompts[:2], SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))
        want = ref.generate(prompts[:2], SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))
        assert [c.token_ids for c in out] == [c.token_ids for c in want]
    # under bf16 autocast (the trainer's compute_dtype bf16) the experts exchange bf16: a rank's dummy forwards must
    # too, so the whole phase runs under it, as LocalRollout.ep_phase enters it (results differ from fp32: only
    # completion and lengths are checked)
    with torch.autocast("cpu", dtype=torch.bfloat16), ep.ep_phase():
        for n_new in ((25,) if rank == 0 else (2, 3)):
            out = ep.generate(prompts[:2], SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))
            assert [len(c.token_ids) for c in out] == [n_new, n_new]
    # the experts' bf16 copies served the phase's decode steps and dummy forwards, and are gone after it (they would
    # sit through the next training step's peak memory)
    assert len(_CAST_CACHE) == 0, len(_CAST_CACHE)
    print(f"rank {rank}: ok, worst |d logp| {worst:.1e}, dummy forwards {ep._lockstep.dummy_forwards}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
