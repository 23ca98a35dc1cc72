"""Fused chunked linear + cross-entropy vs the plain torch reference (full logits, ``F.cross_entropy``): loss and
gradients with respect to the hidden states and the head weight, on odd shapes, chunk boundaries, ignored rows."""

import pytest
import torch
from dsalign.kernels.fused_ce import (
    default_chunk_rows,
    fused_linear_cross_entropy,
    fused_linear_logprobs,
    linear_cross_entropy_ref,
    linear_logprobs_ref,
)

# (N rows, D hidden, V vocab, chunk_rows): chunks that divide N, that do not, a single row per chunk, one chunk
# larger than N, and the default chunking.
SHAPES = [(37, 19, 101, 8), (64, 32, 50, 16), (7, 5, 13, 1), (5, 7, 11, 100), (130, 24, 257, None)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _loss_and_grads(fn, h, w, upstream: float = 1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w)
    return (loss.detach(), *torch.autograd.grad(loss * upstream, (h, w)))


def _targets(n: int, v: int, ignore_every: int | None) -> torch.Tensor:
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    if ignore_every:
        y[::ignore_every] = -100
    return y


@pytest.mark.parametrize("n, d, v, chunk", SHAPES)
@pytest.mark.parametrize("ignore_every", [None, 3])
@pytest.mark.parametrize("logit_scale, reduction", [(1.0, "mean"), (1 / 0.7, "mean"), (1.0, "sum")])
def test_matches_reference_fp32(n, d, v, chunk, ignore_every, logit_scale, reduction):
    torch.manual_seed(0)
    h, w = torch.randn(n, d), torch.randn(v, d) * d**-0.5 * 3  # logits of O(3): a peaked softmax
    y = _targets(n, v, ignore_every)
    kw = dict(logit_scale=logit_scale, reduction=reduction)
    got = _loss_and_grads(lambda h, w: fused_linear_cross_entropy(h, w, y, chunk_rows=chunk, **kw), h, w, 2.5)
    ref = _loss_and_grads(lambda h, w: linear_cross_entropy_ref(h, w, y, **kw), h, w, 2.5)
    for g, r, what in zip(got, ref, ("loss", "grad hidden", "grad weight")):
        assert g.dtype == r.dtype
        assert _rel(g, r) < 1e-5, what


def test_matches_float64_reference_at_bench_vocab():
    """The bench vocabulary (32000; the default chunking makes 2 chunks of 1000 rows here): fp32 fused vs an fp64
    reference, within the fp32 reference's own error."""
    torch.manual_seed(0)
    n, d, v = 2000, 48, 32000
    h, w = torch.randn(n, d), torch.randn(v, d) * 0.02
    y = _targets(n, v, 5)
    got = _loss_and_grads(lambda h, w: fused_linear_cross_entropy(h, w, y), h, w)
    ref64 = _loss_and_grads(lambda h, w: linear_cross_entropy_ref(h, w, y), h.double(), w.double())
    ref32 = _loss_and_grads(lambda h, w: linear_cross_entropy_ref(h, w, y), h, w)
    assert default_chunk_rows(n, v) == 1000
    for g, r64, r32 in zip(got, ref64, ref32):
        assert _rel(g.double(), r64) < max(2 * _rel(r32.double(), r64), 1e-6)


def test_default_chunks_capped_in_rows_at_small_vocabularies():
    """A small vocabulary is cut at 4,096 rows per chunk (even chunks), not left as one chunk of the whole batch;
    large vocabularies are cut by the element budget as before."""
    assert default_chunk_rows(16384, 320) == 4096
    assert default_chunk_rows(5000, 320) == 2500  # two even chunks
    assert default_chunk_rows(3000, 320) == 3000
    assert default_chunk_rows(2000, 32000) == 1000
    assert default_chunk_rows(10, 129280) == 10


def test_all_rows_ignored_gives_zero_loss_and_zero_grads():
    h, w = torch.randn(6, 4), torch.randn(9, 4)
    loss, gh, gw = _loss_and_grads(lambda h, w: fused_linear_cross_entropy(h, w, torch.full((6,), -100)), h, w)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_frozen_weight_no_grad_and_empty_input():
    torch.manual_seed(0)
    h, w, y = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8), _targets(10, 30, None)
    fused_linear_cross_entropy(h, w, y, chunk_rows=4).backward()  # weight without grad: only the hidden's
    ref_h = h.detach().clone().requires_grad_()
    linear_cross_entropy_ref(ref_h, w, y).backward()
    assert _rel(h.grad, ref_h.grad) < 1e-5 and w.grad is None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y)
    assert abs(loss.item() - linear_cross_entropy_ref(h, w, y).item()) < 1e-5 and not loss.requires_grad
    empty = torch.zeros(0, 8, requires_grad=True)
    assert fused_linear_cross_entropy(empty, w, y[:0]).item() == 0.0


def test_bf16_autocast_tracks_the_unfused_autocast_loss():
    """Under autocast the GEMMs run in bf16 and the softmax in fp32, like ``F.cross_entropy(lm_head(h).float())``."""
    torch.manual_seed(0)
    h, w, y = torch.randn(40, 64), torch.randn(300, 64) * 0.1, _targets(40, 300, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(lambda h, w: fused_linear_cross_entropy(h, w, y, chunk_rows=16), h, w)
        ref = _loss_and_grads(lambda h, w: linear_cross_entropy_ref(h, w, y), h, w)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == torch.float32
        assert _rel(g, r) < 2e-2


def test_second_backward_is_refused_and_bad_shapes_are_explained():
    h, w, y = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="hidden \\[N, D\\] and weight \\[V, D\\]"):
        fused_linear_cross_entropy(h, w.t(), y)


@pytest.mark.parametrize("n, d, v, chunk", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("grads_of", ["logp", "entropy", "both"])
def test_logprobs_and_entropy_match_reference(n, d, v, chunk, temperature, grads_of):
    """Per-row upstream gradients (as a policy loss gives them) on the log-probs, the entropy, or both."""
    torch.manual_seed(0)
    h, w, y = torch.randn(n, d), torch.randn(v, d) * d**-0.5 * 3, _targets(n, v, None)
    g_logp, g_ent = torch.randn(n), torch.randn(n)

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = fn(hh, ww)
        objective = {"logp": (logp * g_logp).sum(), "entropy": (ent * g_ent).sum()}
        total = sum(objective.values()) if grads_of == "both" else objective[grads_of]
        return (logp, ent, *torch.autograd.grad(total, (hh, ww)))

    kw = dict(logit_scale=1 / temperature)
    got = run(lambda hh, ww: fused_linear_logprobs(hh, ww, y, chunk_rows=chunk, **kw))
    ref = run(lambda hh, ww: linear_logprobs_ref(hh, ww, y, **kw))
    for g, r, what in zip(got, ref, ("logp", "entropy", "grad hidden", "grad weight")):
        assert _rel(g, r) < 1e-5, what


def test_fused_ce_refuses_targets_outside_the_vocabulary():
    """-1 (another padding convention than ignore_index -100) would index the last class; F.cross_entropy refuses
    it and so does the fused loss."""
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"target\[2\] = -1 is outside \[0, 10\) and is not ignore_index \(-100\)"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([1, -100, -1, 3]))
    with pytest.raises(ValueError, match=r"target\[0\] = 10 is outside"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([10, 1, 2, 3]))
