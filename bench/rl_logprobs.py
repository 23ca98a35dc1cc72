"""GRPO's log-prob forward + backward, same model, same batch: (1) completion positions only vs every position;
(2) each group's prompt computed once (shared prompts) vs once per row.

    python bench/rl_logprobs.py [--preset small] [--rows 64] [--group 8] [--prompt-len 30] [--completion-len 64]
                                [--rounds 4]

(1) ``alignment.rl.token_logprobs`` with ``positions=completion_mask`` (what ``grpo_loss_fn`` passes) sends only the
completion rows through the fused head (``kernels.fused_ce.fused_linear_logprobs``); the baseline is the same call
without ``positions``, which projects every position (prompt and padding too) onto the vocabulary. The gain grows
with the head's share of the model (vocabulary x hidden) and with the prompt's share of the batch.
(2) The batch with ``prompt_group`` / ``prompt_len`` (``build_rl_batch(shared_prompts=True)``, the pipeline's
default): the decoder layers compute each group's prompt once (``model/layout.py``); the baseline is the same batch
without them. Both with completion positions only. The gain grows with the group size and the prompt's share.
Each side runs forward + backward of ``mean(logp over the completion mask)``; fp32, ``torch.set_num_threads(threads)``,
the trainer's host-memory policy on (as the trainer runs); ``rows / group`` prompts of ``--prompt-len`` random
tokens, each in ``--group`` rows, and completions of ``completion-len / 2 .. completion-len`` tokens, right-padded as
``build_rl_batch`` pads them. Sides alternate within each round (one warm-up call before each timed call); the figure
is the best of ``--rounds``. Prints one JSON line per comparison: {"metric", "ours", "baseline", "ratio", "unit"}
with ratio = baseline / ours (a speedup).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def grpo_batch(vocab: int, rows: int = 64, prompt_len: int = 30, completion_len: int = 64, group: int = 1,
               shared_prompts: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """``rows`` right-padded GRPO rows (``build_rl_batch``): ``rows / group`` prompts of ``prompt_len`` random
    tokens, each in ``group`` consecutive rows, and ``completion_len / 2 .. completion_len`` random completion tokens
    per row (seeded)."""
    from dsalign.alignment.rl import build_rl_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(-(-rows // group))]
    lens = torch.randint(completion_len // 2, completion_len + 1, (rows,), generator=g).tolist()
    comps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    return build_rl_batch([prompts[i // group] for i in range(rows)], comps, pad_id=0, shared_prompts=shared_prompts)


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
    p.add_argument("--group", type=int, default=8, help="rows per prompt")
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
    shared = grpo_batch(model.cfg.vocab_size, args.rows, args.prompt_len, args.completion_len, args.group)
    plain = grpo_batch(model.cfg.vocab_size, args.rows, args.prompt_len, args.completion_len, args.group, False)
    mask = plain["completion_mask"]

    def step(batch, positions) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logprobs_fwd_bwd(model, batch, positions)
        return time.perf_counter() - t0

    variants = {"shared": (shared, mask), "completion": (plain, mask), "all": (plain, None)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (batch, positions) in variants.items():
            step(batch, positions)
            times[name].append(step(batch, positions))
    print("# " + "; ".join(f"{name}: {[round(t, 3) for t in ts]} s" for name, ts in times.items()))
    B, T = plain["input_ids"].shape
    shape = f"{args.preset}_{B}x{T}_completion_frac{float(mask.float().mean()):.2f}_fp32_{args.threads}threads"
    for metric, ours, base in ((f"grpo_logprobs_fwd_bwd_s_{shape}", "completion", "all"),
                               (f"grpo_logprobs_shared_prompts_fwd_bwd_s_{shape}_group{args.group}", "shared",
                                "completion")):  # fmt: skip
        o, b = min(times[ours]), min(times[base])
        print(json.dumps({"metric": metric, "ours": round(o, 4), "baseline": round(b, 4), "ratio": round(b / o, 3),
                          "unit": f"s (best of rounds; ours = {ours}, baseline = {base}; ratio = baseline/ours)"}))


if __name__ == "__main__":
    main()
