"""GRPO's log-prob forward + backward: completion positions only vs every position, same model, same batch.

    python bench/rl_logprobs.py [--preset small] [--rows 64] [--prompt-len 30] [--completion-len 64] [--rounds 4]

``alignment.rl.token_logprobs`` with ``positions=completion_mask`` (what ``grpo_loss_fn`` passes) sends only the
completion rows through the fused head (``kernels.fused_ce.fused_linear_logprobs``); the baseline is the same call
without ``positions``, which projects every position (prompt and padding too) onto the vocabulary. Each side runs
forward + backward of ``mean(logp over the completion mask)``; fp32, ``torch.set_num_threads(threads)``, the
trainer's host-memory policy on (as the trainer runs); prompts of ``--prompt-len`` random tokens and completions of
``completion-len / 2 .. completion-len`` tokens, right-padded as ``build_rl_batch`` pads them. Sides alternate
within each round (one warm-up call before each timed call); the figure is the best of ``--rounds``. The gain
grows with the head's share of the model (vocabulary x hidden) and with the prompt's share of the batch.
Prints one JSON line: {"metric", "ours", "baseline", "ratio", "unit"} with ratio = baseline / ours (a speedup).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def grpo_batch(vocab: int, rows: int = 64, prompt_len: int = 30, completion_len: int = 64) -> dict[str, torch.Tensor]:
    """``rows`` right-padded GRPO rows (``build_rl_batch``): ``prompt_len`` random prompt tokens and
    ``completion_len / 2 .. completion_len`` random completion tokens each (seeded)."""
    from dsalign.alignment.rl import build_rl_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    lens = torch.randint(completion_len // 2, completion_len + 1, (rows,), generator=g).tolist()
    comps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    return build_rl_batch(prompts, comps, pad_id=0)


def logprobs_fwd_bwd(model, batch: dict[str, torch.Tensor], positions: torch.Tensor | None) -> None:
    """Forward (log-probs and entropy, as ``grpo_loss_fn`` asks) + backward of the mean completion log-prob."""
    from dsalign.alignment.rl import token_logprobs

    mask = batch["completion_mask"]
    logp, _, _ = token_logprobs(model, batch, 1.0, with_entropy=True, positions=positions)
    ((logp * mask).sum() / mask.sum()).backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from dsalign.alignment.trainer import retain_host_memory
    from dsalign.model import ModelConfig, Transformer

    torch.set_num_threads(args.threads)
    retain_host_memory()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset)).train()
    batch = grpo_batch(model.cfg.vocab_size, args.rows, args.prompt_len, args.completion_len)
    mask = batch["completion_mask"]

    def step(positions) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logprobs_fwd_bwd(model, batch, positions)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"completion": [], "all": []}
    for _ in range(args.rounds):
        for name, positions in (("completion", mask), ("all", None)):
            step(positions)
            times[name].append(step(positions))
    ours, base = min(times["completion"]), min(times["all"])
    B, T = batch["input_ids"].shape
    shape = f"{args.preset}_{B}x{T}_completion_frac{float(mask.float().mean()):.2f}_fp32_{args.threads}threads"
    print(f"# completion positions only: {[round(t, 3) for t in times['completion']]} s; "
          f"all positions: {[round(t, 3) for t in times['all']]} s")  # fmt: skip
    row = {"metric": f"grpo_logprobs_fwd_bwd_s_{shape}", "ours": round(ours, 4), "baseline": round(base, 4),
           "ratio": round(base / ours, 3), "unit": "s (best of rounds; ratio = baseline/ours)"}  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
