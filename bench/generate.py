"""Generation benchmark: dsalign's rollout engine vs transformers' ``DeepseekV3ForCausalLM.generate``, same weights.

Run:  python bench/generate.py            (``bench`` preset, fp32, 2 threads, batch 4; about 10 minutes)

Measures, in one run:
1. decode tokens/s at 256 and 2048 tokens of context (greedy, ``batch`` sequences). A decode step is timed from
   one sampled token to the next; the first step (it includes the prefill) is excluded on both sides. Our weights
   are written with ``save_checkpoint`` and read by ``from_pretrained``, and the first generated tokens of both
   engines are compared.
2. latent-cache bytes per token vs ``(kv_lora_rank + qk_rope_head_dim) x layers x dtype`` (and transformers' cache).
3. MTP speculative decoding on a copy of the model trained briefly on a synthetic corpus of repeated motifs (so the
   next-next token is predictable): acceptance rate and tokens/s with vs without speculation.

The last lines are one JSON object per measurement: {"metric", "ours", "baseline", "ratio", "unit"}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# The 2 cores are shared: spinning OpenMP workers collapse under contention (a 10x slowdown measured with load 4),
# so workers sleep when idle. Set before torch loads its OpenMP runtime; applies to both engines alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from dsalign.alignment.rollout import RolloutEngine  # noqa: E402
from dsalign.alignment.sampling_params import SamplingParams  # noqa: E402
from dsalign.model import ModelConfig, Transformer, causal_lm_loss, save_checkpoint  # noqa: E402


def hf_decode_step_s(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]], int]:
    """Median seconds between consecutive tokens of ``hf.generate`` (greedy), its tokens, and its cache bytes."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Clock()]),
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    cache_bytes = 0
    for layer in getattr(out.past_key_values, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                cache_bytes += t.numel() * t.element_size()
    tokens = out.sequences[:, prompts.shape[1] :].tolist()
    cached = prompts.shape[0] * (out.sequences.shape[1] - 1)
    return steps[len(steps) // 2], tokens, cache_bytes // max(cached, 1)


def ours_decode_step_s(engine: RolloutEngine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """The median gap between one sequence's committed tokens (one per decode step; the first comes from the
    prefill): the same statistic as transformers' side, whose logits processor stamps every step."""
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    stamps: list[float] = []

    def on_token(request: int, sample: int, ids: list[int]) -> None:
        if request == 0 and sample == 0:
            stamps.append(time.perf_counter())

    out = engine.generate(prompts.tolist(), sp, on_token=on_token)
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return steps[len(steps) // 2], [c.token_ids for c in out]


def motif_corpus(vocab: int, motifs: int, motif_len: int, seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sequences made of randomly chosen fixed motifs: inside a motif the next two tokens are determined."""
    table = torch.randperm(vocab - 2, generator=torch.Generator().manual_seed(0))[: motifs * motif_len]
    table = table.view(motifs, motif_len) + 2  # the same motifs for every batch; only their order varies
    g = torch.Generator().manual_seed(seed)
    n = seq_len // motif_len + 1
    picks = torch.randint(0, motifs, (seqs, n), generator=g)
    return table[picks].reshape(seqs, -1)[:, :seq_len]


def train_for_mtp(model: Transformer, steps: int, batch: int, seq_len: int) -> tuple[float, float]:
    """A few dozen AdamW steps on the motif corpus with the MTP loss on (lambda 1): enough to make drafts count
    (the ideal cross-entropy is ln(16) / 8 = 0.35: only a motif's first token is unpredictable)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(steps):
        x = motif_corpus(model.cfg.vocab_size, 16, 8, batch, seq_len, seed=step)
        out = model(x)
        loss, metrics = causal_lm_loss(out, x, mtp_lambda=1.0)
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(metrics["ce"]), float(metrics.get("mtp_ce_1", 0.0))


def row(metric: str, ours: float, baseline: float, unit: str) -> dict:
    return {
        "metric": metric,
        "ours": round(ours, 4),
        "baseline": round(baseline, 4),
        "ratio": round(ours / baseline, 3),
        "unit": unit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--ours-tokens", type=int, default=32, help="decode steps timed for dsalign")
    ap.add_argument("--hf-tokens", type=int, default=12, help="decode steps timed for transformers")
    ap.add_argument("--mtp-train-steps", type=int, default=50)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    model = Transformer(cfg).eval()
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"# preset {args.preset}, fp32, {args.threads} threads, batch {args.batch}, load {os.getloadavg()}")
    results: list[dict] = []

    hf = None
    if not args.skip_hf:
        from transformers import DeepseekV3ForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(model, d)
            hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    engine = RolloutEngine(model, max_batch_size=args.batch, max_len=max(contexts) + args.ours_tokens + 1)
    g = torch.Generator().manual_seed(1)
    ours_steps = {}
    for ctx in contexts:
        prompts = torch.randint(2, cfg.vocab_size, (args.batch, ctx), generator=g)
        ours_decode_step_s(engine, prompts[:, :16], 4)  # warm-up
        step, toks = ours_decode_step_s(engine, prompts, args.ours_tokens)
        ours_steps[ctx] = step
        print(f"# ctx {ctx}: ours {step * 1e3:.1f} ms/step", flush=True)
        if hf is not None:
            hf_decode_step_s(hf, prompts[:, :16], 4)  # warm-up, as ours gets
            hf_step, hf_toks, hf_bytes = hf_decode_step_s(hf, prompts, args.hf_tokens)
            k = min(8, args.hf_tokens)
            same = sum(a[:k] == b[:k] for a, b in zip(toks, hf_toks))
            print(
                f"# ctx {ctx}: transformers {hf_step * 1e3:.1f} ms/step; first {k} tokens equal in {same}/{args.batch}"
            )
            results.append(
                row(f"decode_tokens_per_s@ctx{ctx}_b{args.batch}", args.batch / step, args.batch / hf_step, "tokens/s")
            )
    if len(contexts) > 1:
        a, b = ours_steps[contexts[0]], ours_steps[contexts[-1]]
        results.append(row(f"ours_step_time_ctx{contexts[-1]}_vs_ctx{contexts[0]}", b * 1e3, a * 1e3,
                           f"ms/step (baseline: ours at context {contexts[0]}; ratio = ours/baseline, the growth)"))

    formula = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    results.append(row("cache_bytes_per_token_fp32", engine.cache_bytes_per_token(), formula, "bytes (vs formula)"))
    fp8 = RolloutEngine(model, max_batch_size=1, max_len=8, cache_dtype="fp8")
    results.append(row("cache_bytes_per_token_fp8", fp8.cache_bytes_per_token(), formula, "bytes (vs fp32 formula)"))
    if hf is not None:
        results.append(
            row(
                "cache_bytes_per_token_vs_transformers",
                engine.cache_bytes_per_token(),
                hf_bytes,
                "bytes (baseline: transformers' cache)",
            )
        )
    del hf

    if args.mtp_train_steps:
        t0 = time.perf_counter()
        ce, mtp_ce = train_for_mtp(model, args.mtp_train_steps, batch=8, seq_len=48)
        print(
            f"# trained {args.mtp_train_steps} steps in {time.perf_counter() - t0:.0f}s: "
            f"CE {ce:.3f}, MTP CE {mtp_ce:.3f}"
        )
        prompts = motif_corpus(cfg.vocab_size, 16, 8, args.batch, 16, seed=10_000)
        plain = RolloutEngine(model, max_batch_size=args.batch, max_len=64)
        spec = RolloutEngine(model, max_batch_size=args.batch, max_len=64, speculative=True)
        for e in (plain, spec):
            ours_decode_step_s(e, prompts[:, :8], 4)  # warm-up
        sp = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        base = plain.generate(prompts.tolist(), sp)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = spec.generate(prompts.tolist(), sp)
        t_spec = time.perf_counter() - t0
        same = all(a.token_ids == b.token_ids for a, b in zip(base, fast))
        s = spec.last_stats
        print(
            f"# MTP: acceptance {s.acceptance_rate:.3f}, {s.decode_steps} verify steps for {s.generated_tokens} "
            f"tokens; greedy outputs identical: {same}"
        )
        n = plain.last_stats.generated_tokens
        results.append(row("mtp_speculative_tokens_per_s_greedy", n / t_spec, n / t_plain, "tokens/s"))
        # acceptance rates have no baseline: comment lines, not measurements against one
        sp = SamplingParams(max_new_tokens=32, temperature=1.0, seed=0, ignore_eos=True)
        spec.generate(prompts.tolist(), sp)
        print(f"# MTP acceptance with sampling at T = 1: {spec.last_stats.acceptance_rate:.4f}")
    print(f"# load at end {os.getloadavg()}")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
