"""Decode steps over live rows only (slot compaction) vs every slot, on completions of different lengths.

    python bench/rollout_compaction.py [--preset small] [--requests 16] [--n 8] [--min-new 8] [--max-new 64]

``RolloutEngine._step`` moves the live sequences into the lowest slots and runs the model on those rows only; the
baseline is the same engine with the step it had before, which ran all ``max_batch_size`` slots through the model
every step, finished ones included (a copy of that step is below, so both sides run in one process on one model).
Completions end at different lengths, as GRPO's do when they stop at EOS: request i asks for a length drawn
uniformly from ``--min-new .. --max-new`` (``ignore_eos``, so both sides do exactly the same work per sequence).
Random-init fp32 model, one engine per side with ``max_batch_size = requests * n`` (all samples of the call at once,
as the GRPO stage sizes it), sides alternate within each round, best of ``--rounds``. Outputs are checked equal.
Prints one JSON line: {"metric", "ours", "baseline", "ratio", "unit"} with ratio = baseline / ours (a speedup).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from dsalign.alignment.rollout import RolloutEngine
from dsalign.alignment.sampling_params import SamplingParams, draw, policy_logprobs, sampling_probs


class AllSlotsEngine(RolloutEngine):
    """The baseline: every decode step runs all slots, empty ones as padding (the engine's step before compaction)."""

    def _step(self, slots, done) -> None:
        live = [i for i, s in enumerate(slots) if s is not None]
        x = torch.tensor([[s.tokens[-1] if s is not None else 0] for s in slots], device=self.device)
        valid = torch.tensor([[int(s is not None)] for s in slots], device=self.device)
        logits = self.model(x, attention_mask=valid, cache=self.cache).logits[:, 0]
        seqs = [slots[i] for i in live]
        idx = torch.tensor(live, device=self.device)
        knobs = self._knobs(seqs)
        probs = sampling_probs(logits[idx], *knobs)
        toks = draw(probs, self._uniforms(seqs))
        lps = policy_logprobs(logits[idx], knobs[0], toks).tolist()
        for j, (i, tok) in enumerate(zip(live, toks.tolist())):
            self._append(slots[i], [tok], [lps[j]], done)
            self._free_if_done(slots, i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="samples per request")
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dsalign.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset)).eval()
    vocab = model.cfg.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = [SamplingParams(max_new_tokens=rng.randint(args.min_new, args.max_new), temperature=1.0, n=args.n,
                             seed=i, ignore_eos=True) for i in range(args.requests)]  # fmt: skip
    slots = args.requests * args.n
    max_len = args.prompt_len + args.max_new + 1
    engines = {"ours": RolloutEngine(model, max_batch_size=slots, max_len=max_len),
               "baseline": AllSlotsEngine(model, max_batch_size=slots, max_len=max_len)}  # fmt: skip
    best = {side: float("inf") for side in engines}
    outputs = {}
    for _ in range(args.rounds):
        for side, engine in engines.items():
            engine.generate(prompts[:2], params[:2])  # warm-up
            t0 = time.perf_counter()
            outputs[side] = engine.generate(prompts, params)
            best[side] = min(best[side], time.perf_counter() - t0)
    same = [c.token_ids for c in outputs["ours"]] == [c.token_ids for c in outputs["baseline"]]
    if not same:
        raise SystemExit("the two engines sampled different tokens: the comparison is void")
    tokens = sum(len(c.token_ids) for c in outputs["ours"])
    print(f"{args.preset}: {args.requests} requests x {args.n} samples, {tokens} tokens, lengths "
          f"{args.min_new}..{args.max_new}; ours {best['ours']:.3f} s, all-slots baseline {best['baseline']:.3f} s")
    print(json.dumps({"metric": f"generate_{args.preset}_{args.requests}x{args.n}_new{args.min_new}-{args.max_new}",
                      "ours": round(best["ours"], 4), "baseline": round(best["baseline"], 4),
                      "ratio": round(best["baseline"] / best["ours"], 3),
                      "unit": "s (ratio = baseline/ours)"}))  # fmt: skip


if __name__ == "__main__":
    main()
