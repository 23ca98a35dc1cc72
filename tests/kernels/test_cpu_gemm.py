"""kernels/cpu_gemm.py: oneDNN fp32 GEMMs against torch (fp64 references, fp32 tolerances)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsalign.kernels import cpu_gemm
from dsalign.kernels.grouped_gemm import grouped_gemm_loop_ref
from dsalign.kernels.moe import grouped_mm

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN linear op")


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """Route every fp32 CPU GEMM, however small, through oneDNN, and count the calls."""
    calls = []
    real = cpu_gemm._linear_op

    def counting(x, w, b):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    monkeypatch.setattr(cpu_gemm, "_linear_op", counting)
    with cpu_gemm.cpu_gemm("onednn"):
        yield calls


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_mm_matches_fp64(onednn_everywhere, transpose_a, transpose_b):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 45, generator=g)
    b = torch.randn(45, 33, generator=g)
    a_in = a.t().contiguous().t() if transpose_a else a  # same values, column-major strides
    b_in = b.t().contiguous().t() if transpose_b else b
    out = cpu_gemm.mm(a_in, b_in)
    assert onednn_everywhere, "oneDNN was not called"
    assert out.shape == (70, 33) and out.dtype == torch.float32
    assert _rel_err(out, a.double() @ b.double()) < 1e-6


def test_linear_forward_backward_match_f_linear(onednn_everywhere):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 40, generator=g, requires_grad=True)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    upstream = torch.randn(3, 17, 24, generator=g)
    y = cpu_gemm.linear(x, w, b)
    (y * upstream).sum().backward()
    assert len(onednn_everywhere) == 3  # forward, input gradient, weight gradient
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    y_ref = F.linear(x.double(), w.double(), b.double())
    (y_ref * upstream.double()).sum().backward()
    assert _rel_err(y, y_ref.detach()) < 1e-6
    for got, t in zip(grads, (x, w, b)):
        assert _rel_err(got, t.grad) < 1e-6


def test_linear_backward_of_a_sum(onednn_everywhere):
    """``y.sum()`` hands backward an expanded (stride-0) gradient."""
    x = torch.randn(2, 9, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    cpu_gemm.linear(x, w).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(x, w).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["strided", "expanded", "scalar", "one", "matrix"])
def test_linear_bias_of_any_layout_matches_f_linear(onednn_everywhere, kind):
    """oneDNN reads a bias as a contiguous [out] vector: anything else must give F.linear's result all the same."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(16, 40, generator=g), torch.randn(24, 40, generator=g)
    bias = {
        "strided": torch.randn(48, generator=g)[::2],
        "expanded": torch.tensor(0.5).expand(24),
        "scalar": torch.tensor(-0.5),
        "one": torch.tensor([0.25]),
        "matrix": torch.randn(16, 24, generator=g),
    }[kind]
    torch.testing.assert_close(cpu_gemm.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_double_backward_keeps_the_gemms_in_the_graph(onednn_everywhere):
    """create_graph=True: the backward's GEMMs run in torch so the second derivative is right."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 40, generator=g, requires_grad=True)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    counts = torch.tensor([5, 7])
    we = torch.randn(2, 24, 40, generator=g, requires_grad=True)

    def second_order(f, weight):
        (gx,) = torch.autograd.grad(f(x, weight).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), weight)[0]

    def rel(got, want):  # a dropped backward GEMM gives ~1
        return float((got - want).norm() / want.norm())

    want = second_order(lambda a, b: F.linear(a.double(), b.double()).float(), w)
    assert rel(second_order(cpu_gemm.linear, w), want) < 1e-5
    want = second_order(lambda a, b: grouped_gemm_loop_ref(a.double(), b.double(), counts).float(), we)
    assert rel(second_order(lambda a, b: grouped_mm(a, b, counts), we), want) < 1e-5


def test_torch_func_and_forward_ad_fall_back(onednn_everywhere):
    x, w = torch.randn(16, 40), torch.randn(24, 40)
    grad_w = torch.func.grad(lambda weight: cpu_gemm.linear(x, weight).square().sum())(w)
    torch.testing.assert_close(grad_w, 2 * (x @ w.t()).t() @ x, rtol=1e-4, atol=1e-4)
    batched = torch.func.vmap(lambda row: cpu_gemm.linear(row[None], w)[0])(x)
    torch.testing.assert_close(batched, x @ w.t(), rtol=1e-5, atol=1e-5)
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = cpu_gemm.linear(fwAD.make_dual(x, tangent), w)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tangent @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_weight_gradient_is_contiguous(onednn_everywhere):
    x = torch.randn(16, 8)
    w = torch.randn(64, 8, requires_grad=True)  # in < out: mm computes (x^T g)^T, a transposed view
    (gw,) = torch.autograd.grad(cpu_gemm.linear(x, w).sum(), w)
    assert gw.is_contiguous()


def test_linear_is_deterministic(onednn_everywhere):
    x, w = torch.randn(64, 96), torch.randn(80, 96)
    assert torch.equal(cpu_gemm.linear(x, w), cpu_gemm.linear(x, w))


def test_what_stays_on_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gemm, "_linear_op", lambda *a: calls.append(1))
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with cpu_gemm.cpu_gemm("auto"):
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))  # below MIN_MACS
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    with cpu_gemm.cpu_gemm("auto"):
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))  # 8 rows over a reduction of 16
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    with cpu_gemm.cpu_gemm("torch"):
        cpu_gemm.linear(x, w)  # policy
    with cpu_gemm.cpu_gemm("onednn"):
        cpu_gemm.linear(x.double(), w.double())  # dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_gemm.linear(x, w).dtype == torch.bfloat16  # autocast keeps its own rules
    assert calls == []


def test_bad_policy_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        cpu_gemm.set_cpu_gemm("fast")


@pytest.mark.parametrize("counts", [[0, 5, 64, 0, 70, 1], [32, 31, 33, 0]])
def test_grouped_mm_matches_loop(onednn_everywhere, counts):
    """Row counts with remainders, exact multiples of ROW_QUANTUM and empty experts; gradients too."""
    g = torch.Generator().manual_seed(2)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 48, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 40, 48, generator=g, requires_grad=True)
    upstream = torch.randn(x.shape[0], 40, generator=g)
    y = grouped_mm(x, w, counts_E)
    assert onednn_everywhere
    (y * upstream).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = grouped_gemm_loop_ref(x.double(), w.double(), counts_E)
    (y_ref * upstream.double()).sum().backward()
    assert _rel_err(y, y_ref.detach()) < 1e-6
    assert _rel_err(gx, x.grad) < 1e-6
    assert _rel_err(gw, w.grad) < 1e-6
    assert torch.equal(gw[torch.tensor(counts) == 0], torch.zeros_like(gw[torch.tensor(counts) == 0]))


def test_model_step_matches_torch_gemms(monkeypatch):
    """A tiny model's loss and every gradient agree between oneDNN GEMMs (all of them) and torch's (fp32)."""
    from dsalign.model import ModelConfig, Transformer, causal_lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=128)).train()
    model.init_weights()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, return_logits=False)
        loss, _ = causal_lm_loss(out, ids, mtp_lambda=0.3, head_weight=model.lm_head.weight)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    with cpu_gemm.cpu_gemm("torch"):
        loss_ref, grads_ref = run()
    with cpu_gemm.cpu_gemm("onednn"):
        loss, grads = run()
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6), name
