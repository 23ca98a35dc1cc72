"""Trains the tiny model for the resume test (run as a subprocess so it can really be killed).

Usage: python _resume_worker.py OUT_DIR CKPT_DIR STEPS [--kill-after N] [--resume]
Writes OUT_DIR/losses_<tag>.json lines and OUT_DIR/params_<tag>.pt at the end.
"""

import argparse
import json
import os
import signal

import torch
from dsalign.alignment.trainer import (
    LocalRunner,
    TrainerConfig,
    lm_loss_fn,
    load_training_checkpoint,
    prepare_model,
    save_training_checkpoint,
    train_step,
)
from dsalign.model import ModelConfig, Transformer

DATASET = 8  # sequences in the synthetic dataset (repeated, so the loss can fall)
B, T = 2, 16


def dataset(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (DATASET, T), generator=torch.Generator().manual_seed(7))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("ckpt_dir")
    ap.add_argument("steps", type=int)
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = TrainerConfig(lr=1e-2, warmup_steps=2, total_steps=10, micro_batches=2, bias_update_gamma=0.01,
                        moment_dtype="bf16")  # fmt: skip
    model = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
    runner = LocalRunner(model, cfg)
    data = dataset(model.cfg.vocab_size)
    step, cursor = 0, 0
    if args.resume:
        step, data_state = load_training_checkpoint(args.ckpt_dir, runner)
        cursor = data_state["cursor"]
    loss_fn = lm_loss_fn(mtp_lambda=0.3)
    log_path = os.path.join(args.out_dir, f"losses_{args.tag}.jsonl")
    while step < args.steps:
        micro = []
        for _ in range(cfg.micro_batches):
            ids = data[torch.arange(cursor, cursor + B) % DATASET]
            cursor += B
            labels = ids.clone()
            labels[torch.rand(ids.shape) < 0.2] = -100  # draws from the global RNG: resume must restore it
            micro.append({"input_ids": ids, "labels": labels})
        metrics = train_step(runner, micro, loss_fn, cfg)
        step += 1
        with open(log_path, "a") as log:
            log.write(json.dumps({"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}) + "\n")
        if step % 5 == 0:
            save_training_checkpoint(args.ckpt_dir, step, runner, {"cursor": cursor}, keep_last=2)
        if step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save(
        {k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out_dir, f"params_{args.tag}.pt")
    )


if __name__ == "__main__":
    main()
