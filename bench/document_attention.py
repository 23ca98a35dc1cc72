"""Attention per document vs the padding/segment mask, on the demo's two training shapes.

    python bench/document_attention.py [--preset small] [--rounds 6] [--threads 2]

A packed or padded batch without a cache attends per document by default (``model.layout.DocumentLayout``: each
sample's tokens gathered into a row of their own, plain causal attention); the baseline is the same model with
``model.document_attention = False``, which builds the ``[B, T, T]`` mask (causal & same segment & real key) and
runs SDPA over whole rows. Two measurements, forward + backward in fp32 with the trainer's host-memory policy on:

- ``sft``: ``alignment.sft.sft_loss`` (MTP on, lambda 0.3) on a packed batch shaped like the demo's SFT step:
  32 samples of 40-90 tokens packed into rows of 384 (``sft.max_length`` 96 x 4, as ``pipelines.stages`` packs).
- ``grpo``: ``alignment.rl.token_logprobs`` on a GRPO batch shaped like the demo's: 64 rows, prompts of 30 tokens,
  completions of 32-64 tokens, right-padded (``bench/rl_logprobs.py``'s batch and step). Right padding only and
  rows of similar length:
  the model runs plain causal attention over the whole rows here (``Transformer._attention_plan``), no gather.

Sides alternate within each round (one warm-up call before each timed call); figures are the best of ``--rounds``.
Ends with one JSON line per measurement: {"metric", "ours", "baseline", "ratio", "unit"}, ratio = baseline / ours.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def sft_batch(vocab: int, seed: int = 0):
    from dsalign.alignment.packing import pack_examples

    rng = random.Random(seed)
    examples = []
    for _ in range(32):
        n = rng.randint(40, 90)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randint(10, 25)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return pack_examples(examples, max_length=384)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from dsalign.alignment.sft import sft_loss
    from dsalign.alignment.trainer import retain_host_memory
    from dsalign.model import ModelConfig, Transformer
    from rl_logprobs import grpo_batch, logprobs_fwd_bwd  # bench/, this script's directory

    torch.set_num_threads(args.threads)
    retain_host_memory()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset)).train()
    V = model.cfg.vocab_size
    packed, rl = sft_batch(V), grpo_batch(V)

    def sft_step() -> None:
        loss, _ = sft_loss(model, packed, mtp_lambda=0.3)
        loss.backward()

    def grpo_step() -> None:
        logprobs_fwd_bwd(model, rl, rl["completion_mask"])

    def timed(fn, per_document: bool) -> float:
        model.document_attention = per_document
        model.zero_grad(set_to_none=True)
        fn()  # warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = []
    for name, fn, batch_shape in (("sft", sft_step, tuple(packed.input_ids.shape)),
                                  ("grpo", grpo_step, tuple(rl["input_ids"].shape))):  # fmt: skip
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for per_document in (True, False):
                times[per_document].append(timed(fn, per_document))
        ours, base = min(times[True]), min(times[False])
        print(f"# {name} {batch_shape}: per document {[round(t, 3) for t in times[True]]} s; "
              f"mask {[round(t, 3) for t in times[False]]} s")  # fmt: skip
        shape = f"{args.preset}_{batch_shape[0]}x{batch_shape[1]}_fp32_{args.threads}threads"
        rows.append({"metric": f"{name}_fwd_bwd_s_{shape}", "ours": round(ours, 4), "baseline": round(base, 4),
                     "ratio": round(base / ours, 3), "unit": "s (best of rounds; ratio = baseline/ours)"})  # fmt: skip
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
