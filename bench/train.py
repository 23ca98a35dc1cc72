"""Training throughput of the ``bench`` preset: dsalign's trainer step vs transformers' DeepseekV3ForCausalLM.

    python bench/train.py [--steps 3] [--warmup 1] [--batch 4] [--seq-len 512] [--threads 2] [--ours-experts-bmm]

Both sides start from the same weights (our model written in the HF format, loaded by each side), train in fp32
on the same random batch with ``torch.set_num_threads(threads)``, and make the same kind of step:
forward, next-token cross-entropy, backward, global-norm clip 1.0, AdamW.
  * ours: ``alignment.trainer.train_step`` with ``LocalRunner`` (AdamW, warmup+cosine, router-bias update, load
    metrics), ``lm_loss_fn(mtp_lambda=0)`` (no MTP: transformers has no MTP layers) plus the model's own
    sequence-wise balance loss (alpha 1e-4, which transformers lacks, so ours does slightly more work);
  * baseline: transformers' model with its default kernels (SDPA attention; ``experts_implementation`` default,
    reported), ``labels=`` loss, ``torch.optim.AdamW``.
``--ours-experts-bmm`` adds an experiment, not the default path: a third process where our CPU grouped expert GEMM
takes ``kernels.moe.grouped_mm_padded`` (one padded ``bmm``) instead of ``torch._grouped_mm``.
Each side runs in its own fresh process so that its peak resident memory (``ru_maxrss``: weights, gradients,
optimizer state, activations and the runtime itself) is its own. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _batch(vocab: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def _ours(ckpt: str, args: argparse.Namespace):
    from dsalign.alignment.trainer import LocalRunner, TrainerConfig, lm_loss_fn, prepare_model, train_step
    from dsalign.model import load_checkpoint

    model = load_checkpoint(ckpt, missing_mtp="init")
    cfg = TrainerConfig(lr=1e-5, warmup_steps=0, total_steps=1000)
    runner = LocalRunner(prepare_model(model, cfg), cfg)
    loss_fn = lm_loss_fn(mtp_lambda=0.0)
    ids = _batch(model.cfg.vocab_size, args.batch, args.seq_len)

    def step() -> float:
        return train_step(runner, [{"input_ids": ids, "labels": ids}], loss_fn, cfg)["loss"]

    return step, "dsalign, experts=" + ("padded bmm" if args.child == "ours_bmm" else "kernels default (_grouped_mm)")


def _baseline(ckpt: str, args: argparse.Namespace):
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    ids = _batch(model.config.vocab_size, args.batch, args.seq_len)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    impl = f"attn={model.config._attn_implementation}, experts={model.config._experts_implementation_internal}"
    return step, impl


def child(side: str, ckpt: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process: warm up, time ``steps`` steps, print one JSON result line."""
    torch.set_num_threads(args.threads)
    if side == "ours_bmm":
        from dsalign.kernels import moe

        moe._GROUPED_MM_OK[("cpu", torch.float32)] = False  # the probe's cache: "does _grouped_mm run here"
    step, impl = (_baseline if side == "baseline" else _ours)(ckpt, args)
    losses = [step() for _ in range(args.warmup)]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq_len * args.steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps({"tokens_per_s": tokens / elapsed, "peak_mib": peak_mib, "losses": losses,
                                  "impl": impl, "s_per_step": elapsed / args.steps}))  # fmt: skip


def run_side(side: str, ckpt: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--ckpt", ckpt, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} benchmark process failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours-experts-bmm", action="store_true", help="experiment: padded-bmm CPU expert GEMM (ours)")
    p.add_argument("--child", choices=["ours", "ours_bmm", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.ckpt, args)
        return

    from dsalign.model import ModelConfig, Transformer, save_checkpoint

    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(Transformer(ModelConfig.preset("bench")), os.path.join(tmp, "bench"))
        ckpt = os.path.join(tmp, "bench")
        base = run_side("baseline", ckpt, args)
        ours = run_side("ours", ckpt, args)
        ours_bmm = run_side("ours_bmm", ckpt, args) if args.ours_experts_bmm else None
    print(f"load average after: {os.getloadavg()}", flush=True)
    sides = [("ours", ours), ("baseline", base)] + ([("ours_bmm", ours_bmm)] if ours_bmm else [])
    for name, r in sides:
        print(f"{name:8s} {r['tokens_per_s']:8.1f} tok/s  {r['s_per_step']:6.2f} s/step  peak {r['peak_mib']:7.0f} MiB"
              f"  losses {[round(x, 4) for x in r['losses']]}  ({r['impl']})")  # fmt: skip
    shape = f"bench_{args.batch}x{args.seq_len}_fp32_{args.threads}threads"
    rows = [
        ("train_tokens_per_s_" + shape, ours["tokens_per_s"], base["tokens_per_s"], "tokens/s"),
        ("train_peak_rss_" + shape, ours["peak_mib"], base["peak_mib"], "MiB"),
    ]
    if ours_bmm:
        rows += [
            ("train_tokens_per_s_experts_bmm_" + shape, ours_bmm["tokens_per_s"], base["tokens_per_s"], "tokens/s"),
            ("train_peak_rss_experts_bmm_" + shape, ours_bmm["peak_mib"], base["peak_mib"], "MiB"),
        ]
    for metric, o, b, unit in rows:
        print(json.dumps({"metric": metric, "ours": round(o, 2), "baseline": round(b, 2), "ratio": round(o / b, 3),
                          "unit": unit}))  # fmt: skip


if __name__ == "__main__":
    main()
