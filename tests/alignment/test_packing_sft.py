"""Packing layout, packed-vs-separate logits on the real model, and the SFT loss on packed conversations."""

import dataclasses

import pytest
import torch
from dsalign.alignment.packing import collate_padded, pack_examples, plan_bins
from dsalign.alignment.sft import SFTConfig, build_sft_examples, sft_loss
from dsalign.model import ModelConfig, Transformer


def test_plan_bins_first_fit_decreasing():
    # decreasing: 9 -> row A (3 left), 7 -> row B (5 left), 5 -> B, 3 -> A, 2 -> new row C
    assert plan_bins([5, 9, 3, 7, 2], 12) == [[1, 2], [0, 3], [4]]
    with pytest.raises(ValueError, match="example 1 has 13 tokens"):
        plan_bins([3, 13], 12)


def test_packed_layout():
    ex = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}, {"input_ids": [21, 22], "labels": [21, 22]}]
    b = pack_examples(ex, max_length=7, pad_token_id=0)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 0, 0]]
    # the first label of every sample is dropped: the previous sample's last token must not predict it
    assert b.labels.tolist() == [[-100, 12, 13, -100, 22, -100, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert b.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0]]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=512)
    return Transformer(cfg).eval()


def test_packed_logits_equal_separate_runs(tiny_model):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7]
    samples = [torch.randint(1, 512, (n,), generator=gen) for n in lengths]
    batch = pack_examples([{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples], max_length=16)
    assert batch.input_ids.shape[0] < len(samples)  # something actually got packed together
    with torch.no_grad():
        packed = tiny_model(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            segment_ids=batch.segment_ids,
            compute_mtp=True,
        )
        checked = 0
        for row in range(batch.input_ids.shape[0]):
            for seg in batch.segment_ids[row].unique().tolist():
                if seg == 0:
                    continue
                cols = (batch.segment_ids[row] == seg).nonzero().squeeze(-1)
                ids = batch.input_ids[row, cols][None]
                alone = tiny_model(ids, compute_mtp=True)
                torch.testing.assert_close(packed.logits[row, cols], alone.logits[0], atol=2e-5, rtol=1e-4)
                # MTP depth k at position i reads token i + k: only the last k positions look past the sample
                for k, (p_k, a_k) in enumerate(zip(packed.mtp_logits, alone.mtp_logits), start=1):
                    torch.testing.assert_close(p_k[row, cols[:-k]], a_k[0, :-k], atol=2e-5, rtol=1e-4)
                checked += 1
    assert checked == len(samples)
    # and the isolation is not vacuous: without segment ids the second sample of a row sees the first
    with torch.no_grad():
        leaky = tiny_model(batch.input_ids, position_ids=batch.position_ids)
    second = batch.segment_ids == 2
    assert not torch.allclose(leaky.logits[second], packed.logits[second], atol=1e-3)


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "two plus two is four"},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Eleven is prime."},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "Waves fold."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
]


def test_sft_loss_packed_equals_unpacked(tiny_model, tokenizer):
    cfg = SFTConfig(max_length=64, mtp_lambda=0.3, aux_loss_coef=0.0)
    examples, skipped = build_sft_examples([{"messages": c} for c in CONVERSATIONS], tokenizer, cfg)
    assert skipped == 0 and all(len(e["input_ids"]) <= 64 for e in examples)
    packed = pack_examples(examples, max_length=64, pad_token_id=tokenizer.pad_token_id)
    padded = collate_padded(examples, pad_token_id=tokenizer.pad_token_id)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert (packed.labels != -100).sum() == (padded.labels != -100).sum() > 0
    with torch.no_grad():
        loss_p, m_p = sft_loss(tiny_model, packed, cfg.mtp_lambda, cfg.aux_loss_coef)
        loss_u, m_u = sft_loss(tiny_model, padded, cfg.mtp_lambda, cfg.aux_loss_coef)
    assert "mtp_ce_1" in m_p
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)
    # the MTP term is really in the loss: ce + 0.3 * mtp_ce_1
    assert loss_p.item() == pytest.approx(m_p["ce"] + 0.3 * m_p["mtp_ce_1"], rel=1e-5)
