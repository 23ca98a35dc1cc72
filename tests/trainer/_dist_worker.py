"""One rank of the distributed trainer test (launched by test_distributed.py): DeepSpeed ZeRO over gloo.

Usage: python _dist_worker.py RANK WORLD PORT OUT_DIR EP_SIZE ZERO_STAGE [MODE] [lora]
MODE: "straight" (default, STEPS steps), "save" (2 steps, then a training checkpoint in OUT_DIR/ckpt, then exit),
"resume" (load OUT_DIR/ckpt, run the remaining steps), "uneven" (each rank's rows as one micro-batch per row, both
rows in one in the second step, with very different numbers of targets (``uneven_batch``), the micro-batch count set
after the runner is built and changing between steps, as the GRPO stage's may). ``lora``: train LoRA adapters
(``LORA``) instead.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

STEPS, GLOBAL_B, T = 3, 4, 16


def trainer_config(ep_size: int = 1, zero_stage: int = 2, uneven: bool = False):
    from dsalign.alignment.trainer import TrainerConfig

    return TrainerConfig(lr=2e-3, warmup_steps=1, total_steps=STEPS, bias_update_gamma=0.01, grad_clip=1.0,
                         ep_size=ep_size, zero_stage=zero_stage, aux_loss_alpha=0.0 if uneven else None,
                         weight_decay=0.0 if uneven else 0.1)  # fmt: skip


def uneven_batch(step: int, vocab: int) -> dict:
    """The global batch with 2, 15, 4 and 11 targets in its rows (labels -100 past them)."""
    ids = global_batch(step, vocab)
    labels = ids.clone()
    for row, n in enumerate((2, 15, 4, 11)):
        labels[row, n + 1 :] = -100
    return {"input_ids": ids, "labels": labels}


def make_model():
    from dsalign.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny"))


def apply_test_lora(model):
    """Adapters on every MLA projection (seeded: the same initial adapters on every rank and in the reference)."""
    from dsalign.alignment.trainer.lora import LoraSettings, apply_lora

    torch.manual_seed(1)
    return apply_lora(model, LoraSettings(r=4, alpha=8.0))


def global_batch(step: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (GLOBAL_B, T), generator=torch.Generator().manual_seed(100 + step))


def main() -> None:
    from dsalign.alignment.trainer import (
        lm_loss_fn,
        load_training_checkpoint,
        prepare_model,
        save_training_checkpoint,
        train_step,
    )
    from dsalign.alignment.trainer.distributed import build_runner, gathered_state_dict, init_distributed

    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ep_size, zero_stage = int(sys.argv[5]), int(sys.argv[6])
    mode = sys.argv[7] if len(sys.argv) > 7 else "straight"
    lora = len(sys.argv) > 8 and sys.argv[8] == "lora"
    uneven = mode == "uneven"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("gloo")
    cfg = trainer_config(ep_size, zero_stage, uneven)
    model = prepare_model(make_model(), cfg)
    if lora:
        apply_test_lora(model)
    runner = build_runner(model, cfg)
    loss_fn = lm_loss_fn(mtp_lambda=0.0 if uneven else 0.3)
    per = GLOBAL_B // world
    ckpt = os.path.join(out_dir, "ckpt")
    first, last = 0, STEPS
    if mode == "save":
        last = 2
    elif mode == "resume":
        first, data_state = load_training_checkpoint(ckpt, runner)
        assert data_state == {"next_step": first, "rank": rank}, data_state
    history = []
    for step in range(first, last):
        if uneven:
            mine = {k: v[rank * per : (rank + 1) * per] for k, v in uneven_batch(step, model.cfg.vocab_size).items()}
            # 2, 1, 2 micro-batches: DeepSpeed's step counter runs across steps, so a count that changes once the
            # counter is past zero misplaces its accumulation boundary unless the runner sets it
            rows = per if step == 1 else 1
            micro = [{k: v[i : i + rows] for k, v in mine.items()} for i in range(0, per, rows)]
            cfg.micro_batches = len(micro)  # after build_runner, as the GRPO stage learns its count
            history.append(train_step(runner, micro, loss_fn, cfg))
            continue
        ids = global_batch(step, model.cfg.vocab_size)[rank * per : (rank + 1) * per]
        metrics = train_step(runner, [{"input_ids": ids, "labels": ids}], loss_fn, cfg)
        history.append(metrics)
    if mode == "save":
        save_training_checkpoint(ckpt, last, runner, {"next_step": last, "rank": rank})
        dist.destroy_process_group()
        return
    state = gathered_state_dict(model)
    if rank == 0:
        torch.save(state, os.path.join(out_dir, f"params_{mode}.pt"))
        with open(os.path.join(out_dir, f"metrics_{mode}.json"), "w") as f:
            json.dump(history, f)
        if lora:
            frozen = make_model().state_dict()
            base = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
            changed = [k for k, v in base.items() if not torch.equal(v, frozen[k])]
            with open(os.path.join(out_dir, "lora_changed_base.json"), "w") as f:
                json.dump(changed, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed. Skip the interpreter's teardown: about once in 90 runs
    # a native thread of the gloo / DeepSpeed CPU communication stack was destroyed while joinable there ("terminate
    # called without an active exception", SIGABRT after the results were complete), failing a run that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
