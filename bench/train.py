"""Training throughput of the ``bench`` preset: dsalign's trainer step vs transformers' DeepseekV3ForCausalLM.

    python bench/train.py [--steps 3] [--warmup 2] [--batch 4] [--seq-len 512] [--threads 2]
                          [--rounds 1] [--variant unfused_ce|torch_gemm|experts_bmm|no_retain]

Both sides start from the same weights (our model written in the HF format, loaded by each side), train in fp32
on the same random batch with ``torch.set_num_threads(threads)``, and make the same kind of step:
forward, next-token cross-entropy, backward, global-norm clip 1.0, AdamW.
  * ours: ``alignment.trainer.train_step`` with ``LocalRunner`` (AdamW, warmup+cosine, router-bias update, load
    metrics), ``lm_loss_fn(mtp_lambda=0)`` (no MTP: transformers has no MTP layers; the fused chunked head +
    cross-entropy, its default) plus the model's own sequence-wise balance loss (alpha 1e-4, which transformers
    lacks, so ours does slightly more work); its fp32 GEMMs (projections, LM head, routed experts) run through
    oneDNN (``kernels/cpu_gemm.py``) where the baseline's go through torch's BLAS (``--variant torch_gemm`` runs
    ours on torch's BLAS too, to separate the two);
  * baseline: transformers' model with its default kernels (SDPA attention; ``experts_implementation`` default,
    reported), ``labels=`` loss, ``torch.optim.AdamW``;
  * baseline_retain: the same, in a process given the host-memory policy our trainer sets for itself
    (``alignment.trainer.hostmem.retain_host_memory``: glibc keeps freed memory instead of page-faulting it in
    again every step). Our trainer applies it by default, so ``baseline`` is transformers as users run it and
    ``baseline_retain`` isolates what is left of our speedup once the allocator is the same on both sides; the
    JSON lines give both ratios.
``--variant`` adds experiments of ours, never the default path: ``unfused_ce`` (``lm_loss_fn(fused_ce=False)``:
full logits and ``F.cross_entropy``), ``torch_gemm`` (``DSALIGN_CPU_GEMM=torch``: every GEMM through torch's own
``mm`` / ``torch._grouped_mm``, i.e. the BLAS transformers uses, instead of oneDNN; ``kernels/cpu_gemm.py``),
``experts_bmm`` (torch GEMMs, and the routed experts through ``kernels.moe.grouped_mm_padded``, one padded ``bmm``,
instead of ``torch._grouped_mm``), ``no_retain`` (``TrainerConfig(retain_host_memory=False)``: glibc's default
allocator behaviour, per-step page faults).

Each side runs in its own process, alone (the other sides' processes are not alive meanwhile), so that its peak
resident memory (``ru_maxrss``: weights, gradients, optimizer state, activations and the runtime itself) is its own
and no other process's memory disturbs it. (An earlier version kept all sides alive and stepped them in turn: with
our idle 4 GB process next to it, transformers' step, which faults in several fresh 262 MB logits tensors per step,
spent far more time in the kernel and ran 6-10 s instead of 5-5.5 s, inflating our ratio to 1.3-1.6x.) ``--rounds
R`` repeats the sides R times, in reverse order every other round, and averages over all timed steps, so a drift of
the machine's background load falls on every side alike. Per step it records wall time and the process's CPU time
(all threads). On a shared machine neither is clean: with 2 OpenMP threads on 2 busy cores every parallel region
waits at its barrier for a descheduled thread, spinning, so wall and CPU time both grow several fold (7x seen at
load 3-4). Compare sides within one run, and trust runs at low load. Prints one line per side and one JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("unfused_ce", "experts_bmm", "no_retain", "torch_gemm")
BASELINES = ("baseline", "baseline_retain")


def _batch(vocab: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def _ours(ckpt: str, args: argparse.Namespace, variant: str | None):
    from dsalign.alignment.trainer import LocalRunner, TrainerConfig, lm_loss_fn, prepare_model, train_step
    from dsalign.kernels import cpu_gemm
    from dsalign.model import load_checkpoint

    if variant in ("torch_gemm", "experts_bmm"):
        cpu_gemm.set_cpu_gemm("torch")
    if variant == "experts_bmm":
        from dsalign.kernels import moe

        moe._GROUPED_MM_OK[("cpu", torch.float32)] = False  # the probe's cache: "does _grouped_mm run here"
    model = load_checkpoint(ckpt, missing_mtp="init")
    cfg = TrainerConfig(lr=1e-5, warmup_steps=0, total_steps=1000, retain_host_memory=variant != "no_retain")
    runner = LocalRunner(prepare_model(model, cfg), cfg)
    loss_fn = lm_loss_fn(mtp_lambda=0.0, fused_ce=variant != "unfused_ce")
    ids = _batch(model.cfg.vocab_size, args.batch, args.seq_len)

    def step() -> float:
        return train_step(runner, [{"input_ids": ids, "labels": ids}], loss_fn, cfg)["loss"]

    gemms = "oneDNN GEMMs" if cpu_gemm.get_cpu_gemm() != "torch" and cpu_gemm.onednn_available() else "torch GEMMs"
    impl = {None: f"fused CE, {gemms}", "unfused_ce": f"logits + F.cross_entropy, {gemms}",
            "experts_bmm": "fused CE, torch GEMMs, experts padded bmm",
            "torch_gemm": "fused CE, torch GEMMs (mm, experts _grouped_mm)",
            "no_retain": f"fused CE, {gemms}, allocator default"}[variant]  # fmt: skip
    return step, "dsalign: " + impl


def _baseline(ckpt: str, args: argparse.Namespace, retain: bool):
    from transformers import DeepseekV3ForCausalLM

    if retain:
        from dsalign.alignment.trainer import retain_host_memory

        if not retain_host_memory():
            raise RuntimeError("baseline_retain: this C library has no glibc mallopt; run without it")

    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    # fused, as ours and as transformers' Trainer / TRL default (adamw_torch_fused); torch's own CPU default is the
    # per-parameter loop (~0.3 s a step slower at this size), which would flatter the ratio
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = _batch(model.config.vocab_size, args.batch, args.seq_len)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    impl = f"attn={model.config._attn_implementation}, experts={model.config._experts_implementation_internal}"
    impl += ", allocator retains freed memory" if retain else ", allocator default"
    return step, impl


def child(side: str, ckpt: str, args: argparse.Namespace) -> None:
    """Runs in its own process: build the side, then run one step per ``step`` line read from stdin, answering
    with a JSON line; ``done`` answers with the peak resident memory and exits."""
    torch.set_num_threads(args.threads)
    if side in BASELINES:
        step, impl = _baseline(ckpt, args, retain=side == "baseline_retain")
    else:
        step, impl = _ours(ckpt, args, None if side == "ours" else side.removeprefix("ours_"))
    print("READY " + json.dumps({"impl": impl}), flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            print("RESULT " + json.dumps({"peak_mib": peak_mib}), flush=True)
            return
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu, "loss": loss}), flush=True)


class Side:
    """The driver's handle on one side's process."""

    def __init__(self, name: str, ckpt: str, args: argparse.Namespace):
        self.name = name
        cmd = [sys.executable, __file__, "--child", name, "--ckpt", ckpt, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.impl = self._read("READY ")["impl"]

    def _read(self, prefix: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise RuntimeError(f"{self.name} benchmark process exited with {self.proc.wait()} (its stderr is above)")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT ")

    def finish(self) -> float:
        peak = self.ask("done")["peak_mib"]
        self.proc.wait()
        return peak


def summarize(timed: list[dict], tokens_per_step: int) -> dict:
    wall = statistics.mean(s["wall_s"] for s in timed)
    cpu = statistics.mean(s["cpu_s"] for s in timed)
    return {"tokens_per_s": tokens_per_step / wall, "tokens_per_cpu_s": tokens_per_step / cpu, "s_per_step": wall,
            "cpu_s_per_step": cpu, "walls": [round(s["wall_s"], 2) for s in timed],
            "losses": [s["loss"] for s in timed]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (the first ones are slow)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat all sides, reversing the order every other round")
    p.add_argument("--variant", action="append", choices=VARIANTS, default=[], help="experiment of ours (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.ckpt, args)
        return

    from dsalign.model import ModelConfig, Transformer, save_checkpoint

    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "bench")
        save_checkpoint(Transformer(ModelConfig.preset("bench")), ckpt)
        names = ["ours", *BASELINES, *(f"ours_{v}" for v in args.variant)]
        timed: dict[str, list[dict]] = {name: [] for name in names}
        peaks: dict[str, float] = dict.fromkeys(names, 0.0)
        impls: dict[str, str] = {}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                side = Side(name, ckpt, args)
                steps = [side.ask("step") for _ in range(args.warmup + args.steps)]
                peaks[name] = max(peaks[name], side.finish())
                timed[name] += steps[args.warmup :]
                impls[name] = side.impl
    print(f"load average after: {os.getloadavg()}", flush=True)
    tokens = args.batch * args.seq_len
    results = {name: {**summarize(timed[name], tokens), "peak_mib": peaks[name]} for name in names}
    for name in names:
        r = results[name]
        print(f"{name:16s} {r['tokens_per_s']:7.1f} tok/s {r['s_per_step']:6.2f} s/step (steps {r['walls']})"
              f"  {r['tokens_per_cpu_s']:6.1f} tok/cpu-s  peak {r['peak_mib']:6.0f} MiB"
              f"  losses {[round(x, 4) for x in r['losses']]}  ({impls[name]})")  # fmt: skip
    shape = f"bench_{args.batch}x{args.seq_len}_fp32_{args.threads}threads"
    # Against transformers as users run it (the goal's ratio), then against the same allocator policy as ours.
    for base_name, base_tag in [("baseline", ""), ("baseline_retain", "vs_retaining_baseline_")]:
        base = results[base_name]
        for name, r in results.items():
            if name in BASELINES:
                continue
            tag = base_tag + ("" if name == "ours" else name.removeprefix("ours_") + "_")
            for metric, key, unit in [("train_tokens_per_s_", "tokens_per_s", "tokens/s"),
                                      ("train_tokens_per_cpu_s_", "tokens_per_cpu_s", "tokens/CPU-s"),
                                      ("train_peak_rss_", "peak_mib", "MiB (ratio = ours/baseline, < 1: ours smaller)")
                                      ]:  # fmt: skip
                o, b = r[key], base[key]
                print(json.dumps({"metric": metric + tag + shape, "ours": round(o, 2), "baseline": round(b, 2),
                                  "ratio": round(o / b, 3), "unit": unit}))  # fmt: skip


if __name__ == "__main__":
    main()
