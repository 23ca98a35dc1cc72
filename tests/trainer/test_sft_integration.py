"""The trainer with the SFT loss of ``alignment.sft`` on packed batches (what the SFT pipeline runs)."""

import functools

import torch
from dsalign.alignment.packing import pack_examples
from dsalign.alignment.sft import sft_loss
from dsalign.alignment.trainer import ExpertLoadTracker, LocalRunner, TrainerConfig, prepare_model, train_step
from dsalign.model import ModelConfig, Transformer


def _packed_batches(vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ([9, 5, 12, 3], [7, 11, 6]):
        examples = []
        for n in lengths:
            ids = torch.randint(1, vocab, (n,), generator=g).tolist()
            examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})  # "assistant" half
        batches.append(pack_examples(examples, max_length=16))
    return batches


def test_sft_loss_trains_through_the_step_api():
    torch.manual_seed(0)
    cfg = TrainerConfig(lr=5e-3, total_steps=8, micro_batches=2, mtp_lambda=0.3)
    model = prepare_model(Transformer(ModelConfig.preset("tiny")), cfg)
    runner = LocalRunner(model, cfg)
    batches = _packed_batches(model.cfg.vocab_size)
    assert any((b.attention_mask == 0).any() for b in batches)  # padding present

    tracker = ExpertLoadTracker(model)
    model(batches[0].input_ids, attention_mask=batches[0].attention_mask, compute_mtp=False)
    counts = tracker.take()
    tracker.remove()
    k = model.cfg.num_experts_per_tok
    assert (counts.sum(-1) == batches[0].attention_mask.sum() * k).all()  # padding never counts toward balance

    loss_fn = functools.partial(sft_loss, mtp_lambda=cfg.mtp_lambda)
    history = [train_step(runner, batches, loss_fn, cfg) for _ in range(cfg.total_steps)]
    assert {"loss", "ce", "mtp_ce_1", "aux_loss", "target_tokens", "grad_norm", "lr"} <= set(history[0])
    assert history[-1]["ce"] < 0.8 * history[0]["ce"]
