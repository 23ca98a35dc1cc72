"""Attention per document (``layout.DocumentLayout``) vs the mask path it replaces for padded and packed batches.

The mask path (``model.document_attention = False``) builds ``build_attention_mask`` and runs SDPA over whole rows;
per-document attention gathers each sample into its own row. Real tokens must get the same outputs and every
parameter the same gradient (fp32, 1e-5); padding tokens are free to differ (they reach no real token).
"""

from __future__ import annotations

import pytest
import torch
from dsalign.alignment.packing import pack_examples
from dsalign.model import Transformer, causal_lm_loss
from dsalign.model.layout import document_layout

from .conftest import tiny


def _bucket_indices(layout) -> list[list[list[int]]]:
    return [b.index_NL.tolist() for b in layout.buckets]


def test_layout_of_a_packed_batch():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
    valid = segment_ids > 0
    layout = document_layout(valid, segment_ids)
    assert _bucket_indices(layout) == [[[0, 1, 2], [3, 4, 0], [6, 7, 0]]]  # 3 documents, empty slots read token 0
    assert layout.tokens_M.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert layout.buckets[0].slots_M.tolist() == [0, 1, 2, 3, 4, 6, 7]
    # padded rows without segments: a document is a row's real tokens, left and right padding dropped
    valid = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert _bucket_indices(document_layout(valid, None)) == [[[1, 2, 3], [5, 6, 0]]]
    # a segment id that comes back later in its row is still one document, in row order
    assert _bucket_indices(document_layout(None, torch.tensor([[1, 2, 1, 2]]))) == [[[0, 2], [1, 3]]]


def test_long_tail_goes_to_its_own_bucket():
    # one 100-token document and ten of 8: one [11, 100] batch would hold 11x the scores of the long one
    segment_ids = torch.tensor([[1] * 100 + [s for s in range(2, 12) for _ in range(8)]])
    layout = document_layout(None, segment_ids)
    assert [tuple(b.index_NL.shape) for b in layout.buckets] == [(10, 8), (1, 100)]
    assert layout.buckets[0].index_NL[0].tolist() == list(range(100, 108))
    assert layout.buckets[1].index_NL[0].tolist() == list(range(100))
    assert sorted(layout.tokens_M.tolist()) == list(range(180))


def test_layout_falls_back_when_it_saves_nothing():
    assert document_layout(torch.zeros(2, 4, dtype=torch.bool), None) is None  # no real token
    # a 12-token document and eight of one token in a row of 20: two buckets cost more calls than they save, one
    # [9, 12] bucket holds more scores than the [1, 20] mask
    assert document_layout(None, torch.tensor([[1] * 12 + list(range(2, 10))])) is None


def _forward_backward(model: Transformer, per_document: bool, **batch):
    model.document_attention = per_document
    model.zero_grad(set_to_none=True)
    labels = batch.pop("labels")
    out = model(**batch, compute_mtp=True)
    loss, _ = causal_lm_loss(out, labels, 0.3, batch.get("segment_ids"))
    (loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("q_lora_rank, lengths, max_length, buckets", [
    (None, (7, 12, 5, 9, 3, 11, 6), 24, 1),
    (16, (7, 12, 5, 9, 3, 11, 6), 24, 1),
    (None, (70, 3, 4, 5, 2, 6, 9), 96, 2),  # a long document and short ones: two buckets
])  # fmt: skip
def test_packed_batch_matches_mask_path(q_lora_rank, lengths, max_length, buckets):
    torch.manual_seed(0)
    model = Transformer(tiny(q_lora_rank=q_lora_rank)).train()
    gen = torch.Generator().manual_seed(1)
    examples = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in lengths]
    batch = pack_examples([{"input_ids": e, "labels": e} for e in examples], max_length=max_length)
    assert (batch.segment_ids == 0).any() and (batch.segment_ids == 2).any()  # padding and packing both present
    layout = document_layout(batch.attention_mask.bool(), batch.segment_ids)
    assert layout is not None and len(layout.buckets) == buckets
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  segment_ids=batch.segment_ids, labels=batch.labels)  # fmt: skip
    ours, g_ours = _forward_backward(model, True, **dict(kwargs))
    ref, g_ref = _forward_backward(model, False, **dict(kwargs))
    real = batch.segment_ids > 0
    torch.testing.assert_close(ours.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours.mtp_logits, ref.mtp_logits):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.expert_counts, ref.expert_counts)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_padded_rows_match_mask_path():
    """GRPO's layout: left-padded prompts, right-padded completions, no segments."""
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    B, T = 4, 14
    input_ids = torch.randint(1, 256, (B, T), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(B, T, dtype=torch.long)
    valid[0, :3] = 0
    valid[1, 10:] = 0
    valid[2, :2] = 0
    valid[2, 12:] = 0
    position_ids = (valid.cumsum(1) - 1).clamp(min=0)
    labels = input_ids.masked_fill(valid == 0, -100)
    kwargs = dict(input_ids=input_ids, attention_mask=valid, position_ids=position_ids, labels=labels)
    ours, g_ours = _forward_backward(model, True, **dict(kwargs))
    ref, g_ref = _forward_backward(model, False, **dict(kwargs))
    torch.testing.assert_close(ours.logits[valid.bool()], ref.logits[valid.bool()], atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.isfinite(ours.logits).all()  # padding outputs stay finite


def test_right_padded_rows_run_plain_causal():
    """GRPO's batches are right-padded only: plain causal attention over the whole rows gives real tokens the mask's
    view without a gather, unless gathering at least halves the scores (one long row among short ones)."""
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    B, T = 4, 14
    input_ids = torch.randint(1, 256, (B, T), generator=torch.Generator().manual_seed(3))
    valid = (torch.arange(T)[None] < torch.tensor([14, 11, 9, 12])[:, None]).long()
    assert model._attention_plan(None, valid.bool(), None) is None
    labels = input_ids.masked_fill(valid == 0, -100)
    kwargs = dict(input_ids=input_ids, attention_mask=valid, labels=labels)
    ours, g_ours = _forward_backward(model, True, **dict(kwargs))
    ref, g_ref = _forward_backward(model, False, **dict(kwargs))
    torch.testing.assert_close(ours.logits[valid.bool()], ref.logits[valid.bool()], atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    model.document_attention = True
    short = (torch.arange(64)[None] < torch.tensor([64] + [8] * 7)[:, None]).bool()
    assert model._attention_plan(None, short, None) is not None  # 64^2 + 7 x 8^2 scores against 8 x 64^2
