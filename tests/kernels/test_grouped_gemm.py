"""Grouped expert GEMM (bf16/fp32 and FP8) and the MoE expert block: Triton vs torch references, fwd and grads."""

import pytest
import torch
from dsalign.kernels.grouped_gemm import (
    ExpertWeightCache,
    grouped_gemm,
    grouped_gemm_loop_ref,
    segment_tile_dequant_ref,
)
from dsalign.kernels.moe import moe_experts_forward, moe_experts_reference
from triton_cases import triton_devices

# (counts per expert, K, O): uneven loads, an expert with no tokens, odd K/O, a group longer than one 128-row tile
CASES = [([5, 0, 37, 1], 130, 67), ([64, 64], 128, 128), ([0, 150, 3], 257, 40)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(fn, x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    return (y, *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("counts, k, o", CASES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 5e-2, 2e-2)])
def test_grouped_gemm_triton_vs_loop(device, counts, k, o, dtype, atol, rtol):
    torch.manual_seed(0)
    counts_E = torch.tensor(counts, device=device)
    x = torch.randn(sum(counts), k, device=device, dtype=dtype)
    w = (torch.randn(len(counts), o, k, device=device) * k**-0.5).to(dtype)
    dy = torch.randn(sum(counts), o, device=device, dtype=dtype)
    got = _run(lambda x, w: grouped_gemm(x, w, counts_E, backend="triton"), x, w, dy)
    ref = _run(lambda x, w: grouped_gemm_loop_ref(x.float(), w.float(), counts_E), x, w, dy.float())
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol)
    assert (got[2][counts.index(0)] == 0).all() if 0 in counts else True  # no tokens -> zero weight grad


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("counts, k, o", CASES)
def test_grouped_gemm_fp8_triton_vs_torch_emulation(device, counts, k, o):
    """Same quantization (1x128 / 128x128 / per-expert 128-row wgrad tiles) on both paths; only fp32 summation order
    and rare last-bit ties in the scaled values differ."""
    torch.manual_seed(0)
    counts_E = torch.tensor(counts, device=device)
    x = torch.randn(sum(counts), k, device=device)
    w = torch.randn(len(counts), o, k, device=device) * k**-0.5
    dy = torch.randn(sum(counts), o, device=device)
    got = _run(lambda x, w: grouped_gemm(x, w, counts_E, fp8=True, backend="triton"), x, w, dy)
    emu = _run(lambda x, w: grouped_gemm(x, w, counts_E, fp8=True, backend="torch"), x, w, dy)
    exact = _run(lambda x, w: grouped_gemm_loop_ref(x, w, counts_E), x, w, dy)
    for g, e, r in zip(got, emu, exact):
        assert _rel(g, e) < 1e-3
        assert _rel(g, r) < 0.05  # e4m3 level vs the fp32 result


def test_wgrad_tiles_restart_at_each_expert():
    """An outlier in expert 0's rows must not coarsen the scale of expert 1's rows sharing the same 128-row span."""
    x = torch.randn(20, 8)
    counts = torch.tensor([10, 10])
    x[0] = 1e6  # beyond the e4m3 range (2^-9..448) of one shared scale
    deq = segment_tile_dequant_ref(x, counts)
    assert _rel(deq[10:], x[10:]) < 0.05
    assert _rel(segment_tile_dequant_ref(x, torch.tensor([20, 0]))[10:], x[10:]) > 0.2  # one shared tile


def test_expert_cache_reused():
    w = torch.randn(3, 128, 64)
    cache = ExpertWeightCache()
    x, counts = torch.randn(6, 64), torch.tensor([2, 2, 2])
    y0 = grouped_gemm(x, w, counts, fp8=True, cache=cache, backend="torch")
    grouped_gemm(x, w, counts, fp8=True, cache=cache, backend="torch")
    assert cache.refreshes == 1
    w.mul_(2)
    torch.testing.assert_close(grouped_gemm(x, w, counts, fp8=True, cache=cache, backend="torch"), 2 * y0)
    assert cache.refreshes == 2


def _moe_inputs(device, n=29, h=136, i=72, e=5, k=2):
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device)
    idx = torch.stack([torch.randperm(e - 1)[:k] for _ in range(n)]).to(device)  # expert e-1 gets no tokens
    idx[:12, 0] = 0  # uneven: expert 0 is hot
    idx[:12, 1] = torch.where(idx[:12, 1] == 0, 1, idx[:12, 1])
    wts = torch.rand(n, k, device=device)
    gate_up = torch.randn(e, 2 * i, h, device=device) * h**-0.5
    down = torch.randn(e, h, i, device=device) * i**-0.5
    return x, idx, wts, gate_up, down


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("fp8, tol", [(False, 1e-5), (True, 0.1)])
def test_moe_experts_triton_vs_reference(device, fp8, tol):
    """The whole MoE expert block through Triton: output and x / weights / combine-weight gradients.

    FP8: two chained e4m3 GEMMs (each ~3-4% relative error) and their backward: stated bound 10% vs the fp32
    reference, and 0.5% vs the torch FP8 emulation that applies the same quantization."""
    x, idx, wts, gate_up, down = _moe_inputs(device)
    dy = torch.randn_like(x)
    leaves = (x, wts, gate_up, down)

    def run(fn, **kw):
        ins = [t.clone().requires_grad_() for t in leaves]
        y = fn(ins[0], idx, ins[1], ins[2], ins[3], **kw)
        return (y, *torch.autograd.grad(y, ins, dy))

    got = run(moe_experts_forward, fp8=fp8, backend="triton")
    ref = run(moe_experts_reference)
    emu = run(moe_experts_forward, fp8=fp8, backend="torch")
    for g, r, e in zip(got, ref, emu):
        assert _rel(g, r) < tol
        assert _rel(g, e) < (5e-3 if fp8 else 1e-5)
    assert (got[3][-1] == 0).all()  # the idle expert gets a zero gradient


def test_moe_experts_fp8_cpu_path_close_to_bf16():
    x, idx, wts, gate_up, down = _moe_inputs("cpu")
    y8 = moe_experts_forward(x, idx, wts, gate_up, down, fp8=True, backend="torch")
    y = moe_experts_reference(x, idx, wts, gate_up, down)
    assert 0 < _rel(y8, y) < 0.06


@pytest.mark.parametrize("hidden, inter", [(64, 30), (30, 16), (18, 10)])
def test_moe_with_sizes_torch_grouped_mm_refuses(hidden, inter):
    """``torch._grouped_mm`` wants 16-byte aligned strides (fp32 sizes that are multiples of 4); other sizes take the
    padded bmm instead of raising ``strides should be multiple of 16 bytes``."""
    torch.manual_seed(0)
    n, e, k = 6, 4, 2
    x = torch.randn(n, hidden)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    w = torch.rand(n, k)
    gate_up, down = torch.randn(e, 2 * inter, hidden) * 0.1, torch.randn(e, hidden, inter) * 0.1
    want = moe_experts_reference(x.double(), idx, w.double(), gate_up.double(), down.double())
    torch.testing.assert_close(moe_experts_forward(x, idx, w, gate_up, down).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grouped_experts_follow_autocast(device, backend):
    """Under bf16 autocast the expert GEMMs run in bf16 like autocast's nn.Linear (they used to stay fp32: on CUDA
    that meant fp32 dots on CUDA cores beside bf16 tensor-core layers), the fp32 master weights still get fp32
    gradients, and the top-k combine sums in fp32 (output in x's dtype)."""
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 3], device=device)
    x = torch.randn(19, 64, device=device, requires_grad=True)
    w = (torch.randn(4, 48, 64, device=device) * 0.1).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = grouped_gemm(x, w, counts, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    want = grouped_gemm_loop_ref(x.detach(), w.detach(), counts)
    assert ((y.float() - want).norm() / want.norm()).item() < 1e-2  # bf16 operands
    n, e, k = 12, 4, 2
    idx = torch.rand(n, e, device=device).topk(k, dim=1).indices
    wts = torch.rand(n, k, device=device)
    gu, dn = torch.randn(e, 32, 64, device=device) * 0.1, torch.randn(e, 64, 16, device=device) * 0.1
    xs = torch.randn(n, 64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe_experts_forward(xs, idx, wts, gu, dn, backend=backend)
    ref = moe_experts_reference(xs, idx, wts, gu, dn)
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_grouped_gemm_auto_on_cuda_matches_loop():
    """On CUDA, aligned bf16 goes to torch's grouped GEMM (faster than our Triton kernel there): forward and both
    gradients match the per-expert loop, an expert without rows included."""
    torch.manual_seed(0)
    counts = torch.tensor([40, 0, 130, 7], device="cuda")
    x = torch.randn(177, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(4, 384, 256, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    y = grouped_gemm(x, w, counts)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = grouped_gemm_loop_ref(xr, wr, counts)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    for got, want in ((y, yr), (gx, gxr), (gw, gwr)):
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_autocast_weight_copy_is_reused_until_the_weight_changes():
    """Rollout under the trainer's bf16 autocast: without gradients, inside the engine's caching block, the experts'
    bf16 copy is made once per weight version (a decode step used to copy every expert stack again) and dropped when
    the block ends; outside it a fresh copy each time; with gradients the cast stays in the graph."""
    from dsalign.kernels.grouped_gemm import _CAST_CACHE, autocast_weight, caching_autocast_weights

    w = torch.randn(4, 8, 16, requires_grad=True)
    with torch.no_grad(), caching_autocast_weights():
        first = autocast_weight(w, torch.bfloat16)
        assert autocast_weight(w, torch.bfloat16) is first and first.dtype == torch.bfloat16
        w.add_(1.0)  # an optimizer step
        second = autocast_weight(w, torch.bfloat16)
    assert second is not first and torch.equal(second, (w.detach() + 0).to(torch.bfloat16))
    assert len(_CAST_CACHE) == 0
    with torch.no_grad():
        assert autocast_weight(w, torch.bfloat16) is not autocast_weight(w, torch.bfloat16)
    cast = autocast_weight(w, torch.bfloat16)  # grad mode: a differentiable cast
    assert cast.requires_grad and cast.grad_fn is not None
    assert autocast_weight(cast, torch.bfloat16) is cast
    # a frozen weight (experts under LoRA) cached during rollout (inference mode), then a training forward: never
    # the inference copy, which backward cannot save
    frozen = torch.randn(4, 8, 16)
    with torch.inference_mode(), caching_autocast_weights():
        assert autocast_weight(frozen, torch.bfloat16).is_inference()
    assert not autocast_weight(frozen, torch.bfloat16).is_inference()
