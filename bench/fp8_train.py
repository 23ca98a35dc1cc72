"""FP8 vs high-precision training of the ``tiny`` model on a fixed synthetic corpus (issue 3, acceptance 4).

    python bench/fp8_train.py --steps 200 --seeds 4

Defaults: batch 32 x 64 tokens, AdamW lr 1e-3. The earlier protocol (batch 8, lr 3e-3) is chaotic on this model:
two runs whose GEMMs differ by FP8 rounding land anywhere from -15% to +20% apart per seed, so a 2% comparison
there measures the seed, not FP8 (docs/PERFORMANCE.md keeps both sweeps).

Both runs start from the same weights and see the same batches; the FP8 run sets ``ModelConfig.fp8`` so the
quantizable projections are ``kernels.FP8Linear`` (forward, dgrad and wgrad GEMMs in e4m3 with 1x128 / 128x128
scales). The baseline keeps every GEMM in the parameters' dtype (fp32 on CPU; bf16 autocast on CUDA).
Prints each run's training loss every 50 steps, its final loss on a fixed held-out batch, and, last, one JSON
line with the relative difference of the two held-out losses.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from dsalign.model.config import ModelConfig
from dsalign.model.transformer import Transformer, causal_lm_loss


def synthetic_corpus(vocab: int, n_seqs: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Learnable but not trivial: each sequence follows x_{t+1} = (a * x_t + b) mod vocab with per-sequence (a, b)
    drawn from a small set, plus 10% noise tokens."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(1, vocab, (8, 2), generator=g)
    rows = []
    for _ in range(n_seqs):
        a, b = ab[torch.randint(0, 8, (1,), generator=g)].squeeze(0).tolist()
        x = [int(torch.randint(0, vocab, (1,), generator=g))]
        for _ in range(seq_len - 1):
            x.append((a * x[-1] + b) % vocab)
        rows.append(torch.tensor(x))
    data = torch.stack(rows)
    noise = torch.rand(data.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, data.shape, generator=g), data)


def set_fp8_scope(model: Transformer, scope: str) -> None:
    """Attribution experiments: keep FP8 only in the dense projections (``linears``) or only in the routed experts
    (``experts``). The model's switch covers both (``all``); this flips the experts' flag after construction."""
    from dsalign.kernels.grouped_gemm import ExpertWeightCache
    from dsalign.model.moe import GroupedExperts

    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            mod.fp8 = scope in ("all", "experts")
            mod.fp8_caches = (ExpertWeightCache(), ExpertWeightCache()) if mod.fp8 else None


def train(fp8: bool, steps: int, batch: int, seq_len: int, device: str, log_every: int, seed: int = 0,
          scope: str = "all", lr: float = 1e-3) -> float:  # fmt: skip
    """Train from a fixed init; return the loss on a fixed held-out batch of 64 sequences (single-batch training
    losses swing by +-30% here, so they are printed but not compared)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny").replace(fp8=fp8 and scope in ("all", "linears"))
    model = Transformer(cfg).to(device)
    if fp8:
        set_fp8_scope(model, scope)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    corpus = synthetic_corpus(cfg.vocab_size, 576, seq_len).to(device)
    corpus, held_out = corpus[:512], corpus[512:]  # same rules, unseen sequences
    g = torch.Generator().manual_seed(1 + seed)
    t0 = time.perf_counter()
    for step in range(steps):
        ids = corpus[torch.randint(0, corpus.shape[0], (batch,), generator=g)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(ids)
            loss, _ = causal_lm_loss(out, ids, mtp_lambda=0.3)
        opt.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        opt.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"{'fp8 ' if fp8 else 'base'} step {step + 1:4d} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)  # fmt: skip
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        eval_loss, _ = causal_lm_loss(model(held_out, compute_mtp=False), held_out)
    print(f"{'fp8 ' if fp8 else 'base'} held-out loss {eval_loss.item():.4f}")
    return eval_loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seeds", type=int, default=1, help="repeat over init/data seeds and report the mean losses")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scope", default="all", choices=["all", "linears", "experts"], help="which GEMMs run in FP8")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = []
    for seed in range(args.seeds):
        base = train(False, args.steps, args.batch, args.seq_len, device, 50, seed, lr=args.lr)
        fp8 = train(True, args.steps, args.batch, args.seq_len, device, 50, seed, args.scope, args.lr)
        print(f"seed {seed}: base {base:.4f} fp8 {fp8:.4f} rel {(fp8 - base) / base:+.4f}", flush=True)
        pairs.append((base, fp8))
    base_final = sum(b for b, _ in pairs) / len(pairs)
    fp8_final = sum(f for _, f in pairs) / len(pairs)
    rel = abs(fp8_final - base_final) / base_final
    rels = [(f - b) / b for b, f in pairs]
    mean_rel = sum(rels) / len(rels)
    se = (sum((r - mean_rel) ** 2 for r in rels) / max(len(rels) - 1, 1) / len(rels)) ** 0.5
    se_text = f"standard error {se:.4f}" if len(rels) > 1 else "no standard error from one seed"
    print(f"# per-seed relative difference: mean {mean_rel:+.4f}, {se_text} over {len(rels)} seed(s); |mean loss "
          f"difference| / baseline {rel:.4f}")  # fmt: skip
    metric = f"tiny_fp8_{args.scope}_vs_base_final_loss_{args.steps}steps_{args.seeds}seeds"
    print(json.dumps({"metric": metric, "ours": round(fp8_final, 4), "baseline": round(base_final, 4),
                      "ratio": round(fp8_final / base_final, 4), "unit": "final loss (ratio = ours/baseline)"}))


if __name__ == "__main__":
    main()
