"""Shared prompts (``model/layout.py``): rows that repeat a prompt compute it once, with the plain forward's results.

The plain forward of the same right-padded batch is the reference: real tokens' logits (main and MTP), the balance
loss, the expert counts and every parameter's gradient must agree in fp32 (1e-5; only summation order differs).
"""

from __future__ import annotations

import pytest
import torch
from dsalign.model import Transformer, causal_lm_loss
from dsalign.model.layout import SharedPrompts, document_layout

from .conftest import tiny


def _batch(prompts: list[list[int]], completion_lens: list[list[int]], seed: int = 0):
    """Rows ``prompt + completion`` (random completion tokens), right-padded; group = the prompt's index."""
    g = torch.Generator().manual_seed(seed)
    rows, group, plen = [], [], []
    for i, (p, lens) in enumerate(zip(prompts, completion_lens)):
        for n in lens:
            rows.append(p + torch.randint(3, 60, (n,), generator=g).tolist())
            group.append(7 * i + 3)  # any ids
            plen.append(len(p))
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    return ids, mask, torch.tensor(group), torch.tensor(plen)


PROMPTS = [[1, 5, 7, 9, 11], [1, 2], [1, 3, 3, 3, 3, 3, 3, 3]]
LENS = [[3, 6, 1], [7, 2, 5, 4], [2, 0, 6]]  # a row may have no completion token


def _run(model, ids, mask, shared):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, compute_mtp=True, shared_prompts=shared)
    labels = ids.masked_fill(mask == 0, -100)
    loss, _ = causal_lm_loss(out, labels, 0.3)
    (loss + 100 * out.aux_loss).backward()  # the balance loss scaled up so its gradients count in the comparison
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model, ids, mask, group, plen, atol=1e-5):
    ref, ref_grads = _run(model, ids, mask, None)
    out, grads = _run(model, ids, mask, (group, plen))
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=atol, rtol=1e-5)
    for a, b in zip(out.mtp_logits, ref.mtp_logits, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-9, rtol=1e-5)
    assert torch.equal(out.expert_counts, ref.expert_counts)  # a prompt token counts once per row holding it
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("q_lora_rank", [None, 16])
@pytest.mark.parametrize("recompute", [False, True])
def test_shared_prompts_match_the_plain_forward(q_lora_rank, recompute):
    model = Transformer(tiny(q_lora_rank=q_lora_rank)).train()
    model.activation_checkpointing = recompute
    _assert_same(model, *_batch(PROMPTS, LENS))


def test_interleaved_groups_and_an_empty_prompt():
    ids, mask, group, plen = _batch([[1, 4, 4, 2], [], [1, 9]], [[2, 5], [3, 4], [6, 1, 1]])
    perm = torch.tensor([2, 0, 5, 3, 1, 6, 4])  # rows of a group need not be adjacent
    model = Transformer(tiny()).train()
    _assert_same(model, ids[perm], mask[perm], group[perm], plen[perm])


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def test_fp8_forward_matches_and_gradients_stay_within_fp8_noise():
    """FP8 quantizes activations per token (1x128 tiles) and weights per block, so the forward is the plain one's.
    The backward quantizes each token's output gradient: a shared prompt token gets the sum of its rows' gradients
    quantized once, where the plain forward quantizes each row's copy; the gradients then differ by FP8 rounding.
    Yardstick: the same model's FP8-vs-fp32 gradient error. Measured: 0.026 vs 0.070 (relative norm, all params)."""
    cfg = tiny(fp8=True)
    model = Transformer(cfg).train()
    exact = Transformer(cfg.replace(fp8=False)).train()
    exact.load_state_dict(model.state_dict())
    ids, mask, group, plen = _batch(PROMPTS, LENS, seed=1)
    ref, ref_grads = _run(model, ids, mask, None)
    out, grads = _run(model, ids, mask, (group, plen))
    _, exact_grads = _run(exact, ids, mask, None)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.expert_counts, ref.expert_counts)
    shared_gap = float((_flat(grads) - _flat(ref_grads)).norm() / _flat(ref_grads).norm())
    fp8_gap = float((_flat(ref_grads) - _flat(exact_grads)).norm() / _flat(exact_grads).norm())
    assert shared_gap < 0.6 * fp8_gap, (shared_gap, fp8_gap)


def test_layout_computes_each_prompt_once():
    ids, mask, group, plen = _batch([[1, 5, 7], [1, 2]], [[2, 1], [3]])
    layout = SharedPrompts.build(ids, mask, group, plen)
    assert layout.num_prompt_tokens == 5  # 3 + 2, not 3 + 3 + 2
    assert layout.stream_M.numel() == 5 + 2 + 1 + 3  # prompts once, then every row's own tokens
    T = ids.shape[1]
    stream_ids = ids.reshape(-1)[layout.stream_M]
    assert torch.equal(layout.to_batch(stream_ids)[mask.bool()], ids[mask.bool()])  # gathers back every real token
    assert layout.position_M.tolist() == [0, 1, 2, 0, 1, 3, 4, 3, 2, 3, 4]
    assert (layout.stream_M // T).tolist()[:5] == [0, 0, 0, 2, 2]  # each group's prompt from its first row


def test_attention_costs_what_the_plain_forward_costs():
    """A row's document is its prompt (read from the shared copy) plus its own tokens, bucketed by length as the
    plain per-document attention buckets the rows, so a long tail of completions costs no more scores or padding
    (no [B, Lc, Lp + Lc] mask either)."""
    ids, mask, group, plen = _batch([[1] * 40, [1, 2, 3]], [[2, 3, 4, 5, 200], [1, 2, 3]])
    shared = SharedPrompts.build(ids, mask, group, plen)
    plain = document_layout(mask.bool(), None)
    assert shared.attention.scores == plain.scores
    assert [b.index_NL.shape for b in shared.attention.buckets] == [b.index_NL.shape for b in plain.buckets]
    assert sorted(shared.attention.tokens_M.tolist()) == list(range(shared.stream_M.numel()))  # each output once


def test_nothing_shared_is_the_plain_forward():
    ids, mask, group, plen = _batch(PROMPTS, LENS)
    assert SharedPrompts.build(ids, mask, torch.arange(ids.shape[0]), plen) is None  # every row its own group
    assert SharedPrompts.build(ids, mask, group, torch.zeros_like(plen)) is None  # empty prompts: nothing to share
    assert SharedPrompts.build(ids, mask, group.tolist(), plen.tolist()) is not None  # lists are fine


def test_bad_groups_are_refused_naming_the_row():
    ids, mask, group, plen = _batch(PROMPTS, LENS)
    model = Transformer(tiny())
    bad = ids.clone()
    bad[4, 1] = 59  # row 4 is the second row of prompt 1: its prompt differs from row 3's
    with pytest.raises(ValueError, match="row 4 has different prompt tokens than the first row of its group"):
        model(bad, attention_mask=mask, shared_prompts=(group, plen))
    longer = plen.clone()
    longer[5] += 1
    with pytest.raises(ValueError, match="row 5 has a different prompt length"):
        model(ids, attention_mask=mask, shared_prompts=(group, longer))
    left = mask.flip(1)
    with pytest.raises(ValueError, match="padding before a real token"):
        model(ids, attention_mask=left, shared_prompts=(group, plen))
    with pytest.raises(ValueError, match="must be \\[10\\]"):
        model(ids, attention_mask=mask, shared_prompts=(group[:3], plen))
    with pytest.raises(ValueError, match="must be integers"):
        model(ids, attention_mask=mask, shared_prompts=(group.float(), plen))
    with pytest.raises(ValueError, match="cannot be combined with a cache, segment_ids or position_ids"):
        model(ids, attention_mask=mask, shared_prompts=(group, plen), segment_ids=mask)
