"""Rollout vs update log-prob agreement under ``training.compute_dtype: bf16``: rollouts decoded under the update's
bf16 autocast (what the GRPO stage does) vs decoded in fp32 (what it did before), same model and prompts.

    python bench/rollout_precision.py [--preset small] [--prompts 8] [--group 8] [--new-tokens 48] [--seed 0]

A randomly initialized ``preset`` model (seed ``--seed``) samples ``group`` completions of ``new-tokens`` tokens
for each of ``prompts`` synthetic prompts with ``RolloutEngine`` (per-request seeds), once with bf16 autocast on
and once off; the update's log-probs of each side's own completions are then recomputed as the GRPO loss does
(``alignment.rl.token_logprobs`` over the completion positions) under bf16 autocast. The figure is the mean
``|logp_update - logp_rollout|`` over completion tokens (0 would mean an importance ratio of exactly 1 on-policy);
the max is printed too. The two sides sample different tokens (different precisions), so the means are over
different but equally sized token sets. Prints one JSON line per measurement: {"metric", "ours", "baseline",
"ratio", "unit"} with ratio = baseline / ours (how many times smaller the mismatch is).
"""

from __future__ import annotations

import argparse
import json

import torch


def mismatch(model, prompts, params, rollout_bf16: bool) -> tuple[float, float]:
    from dsalign.alignment.rl import build_rollout_batch, token_logprobs
    from dsalign.alignment.rollout import RolloutEngine

    engine = RolloutEngine(model, None, max_batch_size=len(prompts) * params[0].n)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=rollout_bf16):
        comps = engine.generate(prompts, params)
    batch = build_rollout_batch([c.prompt_ids for c in comps], comps, pad_id=0)
    old = batch["old_logp"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        new, _, _ = token_logprobs(model, batch, positions=batch["completion_mask"])
    diff = (new - old)[batch["completion_mask"].bool()].abs()
    return float(diff.mean()), float(diff.max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from dsalign.alignment.sampling_params import SamplingParams
    from dsalign.model import ModelConfig, Transformer

    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(3, cfg.vocab_size, (20,), generator=g).tolist() for _ in range(args.prompts)]
    params = [SamplingParams(max_new_tokens=args.new_tokens, n=args.group, seed=i, ignore_eos=True)
              for i in range(args.prompts)]  # fmt: skip
    ours_mean, ours_max = mismatch(model, prompts, params, rollout_bf16=True)
    base_mean, base_max = mismatch(model, prompts, params, rollout_bf16=False)
    print(f"bf16 rollout: mean |dlogp| {ours_mean:.3e}, max {ours_max:.3e}")
    print(f"fp32 rollout: mean |dlogp| {base_mean:.3e}, max {base_max:.3e}")
    for metric, ours, base in (("mean_abs_dlogp", ours_mean, base_mean), ("max_abs_dlogp", ours_max, base_max)):
        ratio = base / ours if ours > 0 else None  # none: the bf16 rollout matched exactly
        print(json.dumps({"metric": metric, "ours": ours, "baseline": base, "ratio": ratio,
                          "unit": "nats (ratio = baseline/ours)"}))


if __name__ == "__main__":
    main()
