"""One GRPO iteration of the ``small`` preset: dsalign's pipeline path vs TRL's ``GRPOTrainer``, same weights.

    python bench/grpo.py [--prompts 8] [--group 8] [--max-new-tokens 64 512] [--iters 5] [--warmup 2] [--threads 2]
                         [--omp-wait-policy passive|active|default] [--bf16] [--malloc-keep]

An iteration is what one step of the pipeline's GRPO stage does: sample G completions for each of P prompts,
score them, and make one optimizer step on the P*G completions. The comparison runs once per completion length; the
default lengths are the demo's (64 tokens: the arithmetic task's answers are short) and TRL's own default
``max_completion_length`` (512, with its default ``num_generations`` 8: the shape a TRL user gets out of the box, and
closer to reasoning RL, whose completions run to thousands of tokens). Which costs dominate moves with the length:
at 64 tokens the decode steps are overhead-bound and the update is GEMMs on few tokens; at 512 the cache reads and
the attention over long rows are what each side does well or not.

Setup (shared): the demo task's prompts (``make_prompts``, sums of small numbers, chat-formatted) and the demo
tokenizer (trained locally, saved in the HF format next to the weights, so TRL loads it with ``AutoTokenizer``);
the ``small`` preset sized to that tokenizer exactly as the pipeline's ``load_source`` sizes it, randomly initialized
(seed 0) and written with ``save_checkpoint``. Each side loads that checkpoint in its own fresh process (so peak
RSS is its own) and runs ``warmup`` untimed then ``iters`` timed iterations, on the same prompts in the same order
(checked), with ``torch.set_num_threads(threads)``, in fp32 (``--bf16``: both sides under bf16 autocast with fp32
master weights; ours ``training.compute_dtype: bf16``, whose autocast also covers the colocated generation as in
the pipeline; TRL ``bf16=True``, whose accelerate autocast wraps the model's forward, which ``generate`` calls too);
figures are medians over the timed iterations. Besides wall time, each iteration's process CPU time (all threads)
is reported: on cores shared with other jobs it moves less than wall time does, so when the two disagree, the
machine was busy. The comment lines also give each side's kernel time and minor page faults per iteration: with
glibc's default allocator, tensors above its mmap threshold go back to the OS when freed and are faulted in afresh
the next time, which on this VM (~1.7 us per 4 KiB page) cost TRL's update about half its time at 512 new tokens.
Our trainer keeps freed memory in the process itself (``alignment/trainer/hostmem.py``, from ``prepare_model``);
``--malloc-keep`` gives both sides' processes glibc tunables to the same effect, so the comparison is of the
computation alone.
  * ours: the code ``pipelines/stages.py::run_grpo`` runs: ``RolloutEngine`` colocated on the trainer's model,
    ``make_rl_batch`` (``build_rl_batch`` + group advantages; prompt groups, so the update computes each prompt once
    as the pipeline does by default, ``--no-shared-prompts`` turns that off), ``grpo_loss_fn`` (PPO-clip, eps 0.2/0.28,
    token-mean), ``prepare_model`` + ``build_runner`` (a ``LocalRunner`` here) + ``train_step`` (AdamW, clip 1.0,
    router-bias update), rewards ``math_accuracy`` (weight 1) + ``think_format`` (0.2) through ``RewardCombiner``.
  * baseline: ``trl.GRPOTrainer`` on transformers' ``DeepseekV3ForCausalLM`` (default kernels), the same reward
    functions with ``reward_weights=[1, 0.2]``, configured to do the same work: ``num_generations=G``,
    ``per_device_train_batch_size * gradient_accumulation_steps = P*G`` (so ``generation_batch_size = P*G`` and
    exactly one optimizer step per generation; no old-log-prob recomputation since nothing is off-policy),
    ``beta=0`` (no reference model, as ours), ``loss_type="dapo"`` (token mean over the batch, as ours),
    ``epsilon=0.2, epsilon_high=0.28``, ``scale_rewards="group"``, same lr / AdamW betas / weight decay / clip,
    ``activation_checkpointing=False`` (TRL turns it on by default; ours does not recompute), ``bf16=False``,
    ``use_cpu=True``, no vLLM, logging and saving off. Timed from ``on_step_begin`` to ``on_step_end``, which
    spans prompt tokenization, generation, rewards, the loss, backward and the optimizer step.
Equal work: by default both sides generate exactly ``max_new_tokens`` per completion (ours: ``ignore_eos``; TRL:
``generation_kwargs={"min_new_tokens": ...}``, which forbids EOS until the cap), so the generated token counts are
equal and the iteration times compare directly. ``--stop-at-eos`` keeps each side's own stopping rule instead (the
random-init model samples EOS now and then); the counts then differ, and the per-generated-token figure is the one
to read. ``mask_truncated`` is off on both sides (every completion is "truncated" at the cap; masking them all
would zero the loss but not the work). One micro-batch of P*G rows by default (``--micro-batch`` splits it on both
sides alike).

The last lines are one JSON object per measurement: {"metric", "ours", "baseline", "ratio", "unit"}; for times
``ratio = baseline / ours`` (a speedup), for throughputs ``ratio = ours / baseline``: above 1 means ours is better.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REWARDS = (("math_accuracy", 1.0), ("think_format", 0.2))
# --malloc-keep: glibc keeps freed memory in the process (no mmap'd chunks, no trimming) instead of returning it
MALLOC_KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, EPS_LOW, EPS_HIGH = 5e-5, (0.9, 0.95), 0.0, 1.0, 0.2, 0.28


def prompt_rows(args: argparse.Namespace) -> list[dict]:
    """``P`` fresh demo prompts per iteration (warm-up included); identical in both processes."""
    from dsalign.pipelines.demo_task import AdditionTask, make_prompts

    return make_prompts(AdditionTask(), args.prompts * (args.warmup + args.iters), seed=args.seed)


def kernel_time() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far: the kernel's share of an iteration is mostly
    faulting in fresh pages for large tensors that the allocator returned to the OS after the previous one."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_minflt


def write_checkpoint(path: str, preset: str) -> None:
    """The demo tokenizer and a ``preset`` model sized to it (as ``load_source`` does), in one HF directory."""
    from dsalign.model import ModelConfig, Transformer, save_checkpoint
    from dsalign.pipelines.demo_task import AdditionTask
    from dsalign.pipelines.demo_tokenizer import task_tokenizer
    from dsalign.pipelines.stages import padded_vocab

    tok = task_tokenizer(AdditionTask())
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = ModelConfig.preset(preset).replace(vocab_size=padded_vocab(tok), **ids)
    torch.manual_seed(0)

    def extra(tmp) -> None:
        tok.save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")

    save_checkpoint(Transformer(cfg), path, write_extra=extra)


# ---------------------------------------------------------------------------------------------------- ours
def _ours(ckpt: str, args: argparse.Namespace, rows: list[dict]):
    from dsalign.alignment.chat import tokenize_prompt
    from dsalign.alignment.policy_loss import PolicyLossConfig
    from dsalign.alignment.rl import grpo_loss_fn
    from dsalign.alignment.rollout import RolloutEngine
    from dsalign.alignment.sampling_params import SamplingParams
    from dsalign.alignment.trainer import TrainerConfig, prepare_model, train_step
    from dsalign.alignment.trainer.distributed import build_runner
    from dsalign.alignment.trainer.step import autocast_context
    from dsalign.model import load_checkpoint
    from dsalign.pipelines.config import GRPOParams, OptimConfig, RewardEntry
    from dsalign.pipelines.stages import (
        build_combiner,
        completion_texts,
        load_tokenizer,
        make_rl_batch,
        score_samples,
        split_micro,
    )

    P, G = args.prompts, args.group
    p = GRPOParams(prompts_per_iter=P, group_size=G, max_new_tokens=args.max_new_tokens, mask_truncated=False,
                   eps_low=EPS_LOW, eps_high=EPS_HIGH, micro_batch_size=args.micro_batch or P * G,
                   shared_prompts=not args.no_shared_prompts,
                   optim=OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=0, grad_clip=GRAD_CLIP,
                                     betas=list(BETAS)))  # fmt: skip
    tok = load_tokenizer(ckpt)
    model = load_checkpoint(ckpt)
    cfg = TrainerConfig(lr=p.optim.lr, weight_decay=p.optim.weight_decay, beta1=p.optim.betas[0],
                        beta2=p.optim.betas[1], warmup_steps=0, total_steps=args.warmup + args.iters,
                        grad_clip=p.optim.grad_clip, mtp_lambda=p.mtp_lambda, bias_update_gamma=p.bias_update_gamma,
                        seed=args.seed, compute_dtype="bf16" if args.bf16 else "fp32")  # fmt: skip
    loss_cfg = PolicyLossConfig(policy_loss=p.policy_loss, eps_low=p.eps_low, eps_high=p.eps_high, agg=p.loss_agg,
                                kl_beta=p.kl_beta)  # fmt: skip
    loss_fn = grpo_loss_fn(loss_cfg, temperature=p.temperature, mtp_lambda=p.mtp_lambda)
    combiner = build_combiner([RewardEntry(fn=name, weight=w) for name, w in REWARDS])
    torch.manual_seed(args.seed)
    model = prepare_model(model, cfg)
    runner = build_runner(model, cfg)
    engine = RolloutEngine(model, tok, max_batch_size=P * G, max_len=max(256, 64 + args.max_new_tokens))

    def iteration(it: int) -> dict:
        t0, c0, (k0, f0) = time.perf_counter(), time.process_time(), kernel_time()
        it_rows = rows[it * P : (it + 1) * P]
        # stages.rollout, plus ignore_eos when fixed-length completions are asked for (the pipeline stops at EOS)
        prompt_ids = [tokenize_prompt(tok, r["prompt"]) for r in it_rows]
        params = [SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, n=G,
                                 seed=args.seed * 1_000_003 + it * P + i, ignore_eos=not args.stop_at_eos)
                  for i in range(len(it_rows))]  # fmt: skip
        with autocast_context(cfg, torch.device("cpu")):  # stages.LocalRollout: the update's precision
            comps = engine.generate(prompt_ids, params)
        t_gen = time.perf_counter()
        texts = completion_texts(tok, comps)
        scored = score_samples(combiner, it_rows, G, texts, comps)  # TRL's call, as stages.run_grpo makes it
        batch = make_rl_batch(tok, prompt_ids, comps, scored.rewards, G, p)
        model.train()
        micro = split_micro(batch, p.micro_batch_size)
        cfg.micro_batches = len(micro)
        metrics = train_step(runner, micro, loss_fn, cfg)
        t1, (k1, f1) = time.perf_counter(), kernel_time()
        return {"s": t1 - t0, "cpu_s": time.process_time() - c0, "generate_s": t_gen - t0, "sys_s": k1 - k0,
                "faults": f1 - f0,
                "tokens": sum(len(c.token_ids) for c in comps), "loss": float(metrics["loss"]),
                "prompt_tokens": G * sum(map(len, prompt_ids)),  # in the update's rows (shared prompts: 1/G of it)
                "answers": [r["answer"] for r in it_rows]}  # fmt: skip

    def run() -> list[dict]:
        return [iteration(it) for it in range(args.warmup + args.iters)]

    micro_batches = -(-P * G // p.micro_batch_size)
    return run, f"dsalign RolloutEngine + {type(runner).__name__}, {micro_batches} micro-batch(es) per step"


# ---------------------------------------------------------------------------------------------------- TRL
def _baseline(ckpt: str, args: argparse.Namespace, rows: list[dict]):
    import trl
    from datasets import Dataset
    from dsalign.rewards import get_reward
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    P, G = args.prompts, args.group
    micro = args.micro_batch or P * G
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tokens: list[int] = []
    answers: list[list[str]] = []
    gen_s: list[float] = []

    def counted(fn):  # the first reward sees every batch's completion ids: count the generated tokens there
        @functools.wraps(fn)
        def wrapped(prompts, completions, completion_ids=None, **kw):
            tokens.append(sum(len(c) for c in completion_ids))
            answers.append(list(kw["answer"][:: args.group]))
            return fn(prompts, completions, completion_ids, **kw)

        return wrapped

    funcs = [get_reward(name) for name, _ in REWARDS]
    funcs[0] = counted(funcs[0])
    out_dir = tempfile.mkdtemp(prefix="trl_", dir=os.path.dirname(ckpt))  # removed with the checkpoint
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=args.bf16, fp16=False, activation_checkpointing=False, use_vllm=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=P * G // micro, num_generations=G,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs=None if args.stop_at_eos else {"min_new_tokens": args.max_new_tokens},
        beta=0.0, loss_type="dapo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH, scale_rewards="group",
        mask_truncated_completions=False, reward_weights=[w for _, w in REWARDS], num_iterations=1,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
        max_grad_norm=GRAD_CLIP, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.warmup + args.iters, shuffle_dataset=False, seed=args.seed, dataloader_num_workers=0,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=data, processing_class=tok)

    generate = trainer._generate_single_turn  # timed for the breakdown only; the call itself is unchanged

    @functools.wraps(generate)
    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_s.append(time.perf_counter() - t0)

    trainer._generate_single_turn = timed_generate
    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.c0, self.k0 = time.perf_counter(), time.process_time(), kernel_time()

        def on_step_end(self, a, state, control, **kw):
            k1 = kernel_time()
            steps.append((time.perf_counter() - self.t0, time.process_time() - self.c0, k1[0] - self.k0[0],
                          k1[1] - self.k0[1]))

    trainer.add_callback(Clock())

    def run() -> list[dict]:
        trainer.train()
        if len(steps) != args.warmup + args.iters or len(tokens) != len(steps):
            raise RuntimeError(f"TRL made {len(steps)} steps and {len(tokens)} generations; expected "
                               f"{args.warmup + args.iters} of each (one generation per optimizer step)")  # fmt: skip
        return [
            {"s": s, "cpu_s": c, "sys_s": k, "faults": f, "generate_s": g, "tokens": n, "answers": a}
            for (s, c, k, f), g, n, a in zip(steps, gen_s, tokens, answers)
        ]

    experts = getattr(model.config, "_experts_implementation_internal", "?")
    recompute = getattr(model, "is_activation_checkpointing", None)
    return run, (f"trl {trl.__version__} GRPOTrainer, attn={model.config._attn_implementation}, experts={experts}, "
                 f"activation checkpointing={recompute}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- driver
def measure(side: str, ckpt: str, args: argparse.Namespace) -> dict:
    """All iterations of one side (warm-up first) and medians over the timed ones (the cores are shared with other
    work; a median shrugs off an iteration that a neighbour's burst slowed down)."""
    run, impl = (_baseline if side == "baseline" else _ours)(ckpt, args, prompt_rows(args))
    its = run()
    timed = its[args.warmup :]

    def median(key) -> float:
        return statistics.median(key(i) for i in timed)

    return {
        "iterations": its,
        "impl": impl,
        "s": median(lambda i: i["s"]),
        "cpu_s": median(lambda i: i["cpu_s"]),
        "sys_s": median(lambda i: i["sys_s"]),
        "faults": median(lambda i: i["faults"]),
        "generate_s": median(lambda i: i["generate_s"]),
        "update_s": median(lambda i: i["s"] - i["generate_s"]),
        "tokens": median(lambda i: i["tokens"]),
        "tokens_per_s": median(lambda i: i["tokens"] / i["s"]),
    }


def child(side: str, ckpt: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process, so that the peak resident memory is this side's own; one JSON result line."""
    torch.set_num_threads(args.threads)
    result = measure(side, ckpt, args)
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(result))


def in_process(side: str, ckpt: str, args: argparse.Namespace) -> dict:
    """``--in-process``: both sides share this process (a quick check; no per-side peak memory)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(side, ckpt, args)
    finally:
        torch.set_num_threads(threads)


def run_side(side: str, ckpt: str, args: argparse.Namespace) -> dict:
    flags = ["--prompts", args.prompts, "--group", args.group, "--max-new-tokens", args.max_new_tokens, "--iters",
             args.iters, "--warmup", args.warmup, "--threads", args.threads, "--micro-batch", args.micro_batch,
             "--seed", args.seed] + (["--stop-at-eos"] if args.stop_at_eos else [])  # fmt: skip
    flags += ["--no-shared-prompts"] if args.no_shared_prompts else []
    flags += ["--bf16"] if args.bf16 else []
    flags += ["--malloc-keep"] if args.malloc_keep else []
    cmd = [sys.executable, __file__, "--child", side, "--ckpt", ckpt, *map(str, flags)]
    # OpenMP reads OMP_WAIT_POLICY when torch loads it, so the side's process gets it through its environment.
    # ``default`` is the runtime's own (spin a while, then sleep), as the pipeline's workers run; ``passive`` (idle
    # workers sleep) is kinder to cores shared with other jobs, but every small op of a decode step then pays a thread
    # wake-up (our generation ran 2x slower with 2 passive threads than with 1).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.omp_wait_policy == "default":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.malloc_keep:  # glibc reads its tunables at process start
        env["GLIBC_TUNABLES"] = MALLOC_KEEP
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} benchmark process failed:\n{proc.stderr[-4000:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{side} benchmark process printed no RESULT line:\n{proc.stdout[-2000:]}")
    return json.loads(line[len("RESULT ") :])


def rows_of(ours: dict, base: dict, shape: str) -> list[dict]:
    def row(metric: str, o: float, b: float, unit: str, speedup: bool) -> dict:
        ratio = b / o if speedup else o / b
        return {"metric": metric, "ours": round(o, 4), "baseline": round(b, 4), "ratio": round(ratio, 3),
                "unit": unit}  # fmt: skip

    return [
        row(f"grpo_iteration_s_{shape}", ours["s"], base["s"], "s/iteration, median (ratio = baseline/ours)",
            speedup=True),
        row(f"grpo_iteration_cpu_s_{shape}", ours["cpu_s"], base["cpu_s"],
            "process CPU s/iteration, all threads, median (ratio = baseline/ours)", speedup=True),
        row(f"grpo_generated_tokens_per_s_{shape}", ours["tokens_per_s"], base["tokens_per_s"],
            "generated tokens per second of whole iteration, median (ratio = ours/baseline)", speedup=False),
        row(f"grpo_generate_s_{shape}", ours["generate_s"], base["generate_s"],
            "s/iteration in generation, median (ratio = baseline/ours)", speedup=True),
        row(f"grpo_score_and_update_s_{shape}", ours["update_s"], base["update_s"],
            "s/iteration in rewards + loss + backward + optimizer, median (ratio = baseline/ours)", speedup=True),
        row(f"grpo_generated_tokens_{shape}", ours["tokens"], base["tokens"],
            "generated tokens per iteration, median (ratio = ours/baseline)", speedup=False),
    ] + ([row(f"grpo_peak_rss_{shape}", ours["peak_mib"], base["peak_mib"], "MiB (ratio = baseline/ours)",
               speedup=True)] if "peak_mib" in ours else [])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset (sized to the demo tokenizer)")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per iteration")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 512],
                   help="completion length(s); one comparison per value (default: the demo's 64 and TRL's default "
                        "max_completion_length, 512)")  # fmt: skip
    p.add_argument("--iters", type=int, default=5, help="timed iterations per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=0, help="rows per forward/backward (0 = all P*G)")
    p.add_argument("--stop-at-eos", action="store_true", help="each side stops at EOS (unequal token counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shared-prompts", action="store_true",
                   help="ours: every row recomputes its prompt in the update (grpo.shared_prompts: false)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="default",
                   help="both sides' OMP_WAIT_POLICY (passive: idle threads sleep, kind to shared cores but every "
                        "small op pays a wake-up; default: unset, as the pipeline's workers run); not with "
                        "--in-process")  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast (fp32 master weights)")
    p.add_argument("--malloc-keep", action="store_true",
                   help=f"both sides with GLIBC_TUNABLES={MALLOC_KEEP}: freed memory stays in the process, so large "
                        "tensors do not fault in fresh pages every iteration (not with --in-process)")  # fmt: skip
    p.add_argument("--in-process", action="store_true", help="quick check: both sides in this process, no peak RSS")
    p.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.malloc_keep and args.in_process:
        p.error("--malloc-keep sets glibc's tunables for the sides' own processes; not with --in-process")
    if args.micro_batch and (args.prompts * args.group) % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide P*G = {args.prompts * args.group}")
    if args.child:
        (args.max_new_tokens,) = args.max_new_tokens  # run_side passes exactly one
        child(args.child, args.ckpt, args)
        return []

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, args.preset)
        write_checkpoint(ckpt, args.preset)
        for new_tokens in args.max_new_tokens:  # one comparison per completion length, same checkpoint
            results += compare(ckpt, argparse.Namespace(**{**vars(args), "max_new_tokens": new_tokens}))
    for r in results:
        print(json.dumps(r))
    return results


def compare(ckpt: str, args: argparse.Namespace) -> list[dict]:
    """Both sides at one completion length (``args.max_new_tokens`` is one number here): the JSON rows, and a
    comment line with the iteration ratio as soon as it is known."""
    print(f"# {args.max_new_tokens} new tokens per completion; load average before: {os.getloadavg()}", flush=True)
    side = in_process if args.in_process else run_side
    base = side("baseline", ckpt, args)
    ours = side("ours", ckpt, args)
    print(f"# load average after: {os.getloadavg()}", flush=True)
    if [i["answers"] for i in ours["iterations"]] != [i["answers"] for i in base["iterations"]]:
        raise RuntimeError("the two sides saw different prompts (TRL's sampler order changed?); the comparison is off")
    for name, r in (("ours", ours), ("baseline", base)):
        per_it = [(round(i["s"], 2), round(i["generate_s"], 2), i["tokens"]) for i in r["iterations"]]
        peak = f"peak {r['peak_mib']:.0f} MiB, OMP_WAIT_POLICY {r['omp_wait_policy']} " if "peak_mib" in r else ""
        print(f"# {name:8s} (s, generate s, tokens) per iteration, warm-up first: {per_it}; {peak}({r['impl']}); "
              f"kernel time {r['sys_s']:.2f} s and {r['faults'] / 1e3:.0f}k minor page faults per iteration "
              "(median)")
    if "prompt_tokens" in ours["iterations"][0]:  # what sharing prompts can save in the update is their share
        p_tok = statistics.median(i["prompt_tokens"] for i in ours["iterations"])
        print(f"# update rows per iteration: {p_tok:.0f} prompt + {ours['tokens']:.0f} completion tokens (median)")
    dtype = "bf16" if args.bf16 else "fp32"
    shape = f"{args.preset}_P{args.prompts}xG{args.group}_new{args.max_new_tokens}_{dtype}_{args.threads}threads"
    if args.omp_wait_policy != "default" and not args.in_process:
        shape += f"_omp_{args.omp_wait_policy}"
    if args.malloc_keep:
        shape += "_malloc_keep"
    results = rows_of(ours, base, shape)
    print(f"# {args.max_new_tokens} new tokens: iteration {results[0]['ratio']}x (ours {results[0]['ours']} s, TRL "
          f"{results[0]['baseline']} s)", flush=True)
    return results


if __name__ == "__main__":
    main()
