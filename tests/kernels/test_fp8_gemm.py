"""FP8 block-scaled GEMM and FP8Linear: Triton kernel vs torch reference, error vs fp32, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F
from dsalign.kernels.fp8_gemm import (
    FP8Linear,
    FP8WeightCache,
    fp8_gemm,
    fp8_gemm_ref,
    fp8_linear,
    per_tensor_fp8_matmul_ref,
)
from dsalign.kernels.quant import dequantize_ref, quantize_act_ref, quantize_weight_ref
from triton_cases import triton_devices

SHAPES = [(128, 128, 256), (67, 130, 257), (16, 1, 300), (1, 200, 128)]


def _fp32_rtol(device: str) -> float:
    """Tolerance of an fp32-output FP8 GEMM against the exact reference, relative to sum |a||b|.

    Under the interpreter each fp8 x fp8 product is exact in fp32 and only the fp32 summation order differs: 1e-5.
    Hopper's fp8 tensor cores accumulate inside each instruction with ~14 bits (DeepSeek-V3 section 3.3.2: the reason
    the recipe promotes to fp32 every 128 of K); simulated, that leaves up to ~1.1e-4 of the magnitude per 128-wide
    chunk, so CUDA gets 2^-11 (4.9e-4), still 16x tighter than one bf16 ulp."""
    return 2.0**-11 if device == "cuda" else 1e-5


def _rel_fro(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _row_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()


# the TMA kernel needs 16-byte aligned rows: K a multiple of 16, N of 8 (bf16 C) or 4 (fp32 C); edges still partial
TMA_SHAPES = [(128, 128, 256), (67, 136, 272), (16, 8, 304), (1, 200, 128), (300, 264, 640)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("kernel, m, n, k", [("pointer", *s) for s in SHAPES] + [("tma", *s) for s in TMA_SHAPES])
@pytest.mark.parametrize("b_block_rows", [128, 1])
@pytest.mark.parametrize("out_dtype, rtol", [(torch.float32, None), (torch.bfloat16, 2**-7)])
def test_fp8_gemm_triton_matches_ref(device, kernel, m, n, k, b_block_rows, out_dtype, rtol):
    """Same fp8 inputs: the kernel and the reference differ only in accumulation (``_fp32_rtol``) and bf16 rounding."""
    _check_triton_gemm(device, m, n, k, b_block_rows, out_dtype, rtol, kernel)


# cuBLAS's blockwise recipe (sm_90): M % 4, N % 128, K % 512; the V3 expert shapes' K (2048, 7168) among them
CUBLAS_SHAPES = [(128, 128, 512), (4, 384, 2048), (100, 256, 512), (272, 256, 7168)]


def _cublas_refusal_on_cuda():
    from dsalign.kernels.fp8_gemm import cublas_blockwise_refusal

    a = torch.zeros(128, 512, device="cuda").to(torch.float8_e4m3fn)
    s = torch.ones(128, 4, device="cuda")
    return cublas_blockwise_refusal(a, s, a, torch.ones(1, 4, device="cuda"), torch.bfloat16)


@pytest.mark.parametrize("m, n, k", CUBLAS_SHAPES)
@pytest.mark.parametrize("b_block_rows", [128, 1])
@pytest.mark.parametrize("out_dtype, rtol", [(torch.float32, None), (torch.bfloat16, 2**-7)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_gemm_cublas_matches_ref(m, n, k, b_block_rows, out_dtype, rtol):
    """torch._scaled_mm's blockwise path (what kernel='auto' picks on sm_90 where it can run) against the same
    reference and tolerance as our kernels; skipped, with the reason, where that path does not exist."""
    refusal = _cublas_refusal_on_cuda()
    if refusal is not None:
        pytest.skip(f"cuBLAS blockwise FP8 unavailable: {refusal}")
    _check_triton_gemm("cuda", m, n, k, b_block_rows, out_dtype, rtol, "cublas")


@pytest.mark.parametrize(
    "m, n, k, why",
    [
        (16, 128, 512, "not on CUDA"),
        # K = 384: ceil(K/128) = 3 is not a multiple of 4, where cuBLAS returned wrong results on an H200
        (16, 128, 384, "shape M=16 N=128 K=384"),
        (17, 128, 512, "shape M=17"),  # cuBLAS: not supported
        (16, 200, 512, "shape M=16 N=200"),
    ],
)
def test_fp8_gemm_cublas_refuses_clearly(m, n, k, why):
    """kernel='cublas' names why it cannot run instead of silently taking another kernel; kernel='auto' then takes
    ours. The shape rules keep products that cuBLAS would get wrong away from it."""
    from dsalign.kernels.fp8_gemm import cublas_blockwise_refusal

    a_q, a_s = quantize_act_ref(torch.randn(m, k))
    b_q, b_s = quantize_weight_ref(torch.randn(n, k))
    with pytest.raises(ValueError, match=f"kernel='cublas' cannot run this product: {why}"):
        fp8_gemm(a_q, a_s, b_q, b_s, backend="triton", kernel="cublas")
    if why == "not on CUDA":  # shapes it takes, but a strided B: named before the device is looked at
        refusal = cublas_blockwise_refusal(a_q, a_s, b_q.t().contiguous().t(), b_s, torch.bfloat16)
        assert refusal.startswith("strides A (512, 1) B (1, 128)"), refusal
    c = fp8_gemm(a_q, a_s, b_q, b_s, backend="triton")  # auto: our kernel
    ref = fp8_gemm_ref(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16)
    torch.testing.assert_close(c, ref, rtol=2**-7, atol=1e-3)


def test_fp8_gemm_tma_refuses_unaligned_operands():
    a_q, a_s = quantize_act_ref(torch.randn(4, 200))
    b_q, b_s = quantize_weight_ref(torch.randn(8, 200))  # 200 fp8 bytes per row: not a multiple of 16
    with pytest.raises(ValueError, match="kernel='tma' needs K-contiguous"):
        fp8_gemm(a_q, a_s, b_q, b_s, backend="triton", kernel="tma")
    with pytest.raises(ValueError, match="kernel must be one of"):
        fp8_gemm(a_q, a_s, b_q, b_s, backend="triton", kernel="cutlass")


def _check_triton_gemm(device, m, n, k, b_block_rows, out_dtype, rtol, kernel):
    rtol = _fp32_rtol(device) if rtol is None else rtol
    torch.manual_seed(0)
    a_q, a_s = quantize_act_ref(torch.randn(m, k, device=device))
    quant_b = quantize_weight_ref if b_block_rows == 128 else quantize_act_ref
    b_q, b_s = quant_b(torch.randn(n, k, device=device))
    c = fp8_gemm(a_q, a_s, b_q, b_s, b_block_rows, out_dtype=out_dtype, backend="triton", kernel=kernel)
    ref = fp8_gemm_ref(a_q, a_s, b_q, b_s, b_block_rows, out_dtype=torch.float32)
    assert c.dtype == out_dtype and c.shape == (m, n)
    # elementwise, relative to the magnitude of the summed terms (C itself can cancel to ~0)
    mag = dequantize_ref(a_q, a_s, 1).abs() @ dequantize_ref(b_q, b_s, b_block_rows).abs().t()
    assert ((c.float() - ref).abs() <= rtol * mag + 1e-6).all()
    # strided B (a transposed view; auto then runs the pointer kernel) is held to the same bound
    c_t = fp8_gemm(a_q, a_s, b_q.t().contiguous().t(), b_s, b_block_rows, out_dtype=out_dtype, backend="triton")
    assert ((c_t.float() - ref).abs() <= rtol * mag + 1e-6).all()


def test_fp8_gemm_rejects_bad_scales():
    a_q, a_s = quantize_act_ref(torch.randn(4, 200))
    b_q, b_s = quantize_weight_ref(torch.randn(8, 200))
    with pytest.raises(ValueError, match="scale grids"):
        fp8_gemm(a_q, a_s[:, :1], b_q, b_s)
    with pytest.raises(ValueError, match="B \\[N, K\\]"):
        fp8_gemm(a_q, a_s, b_q[:, :100], b_s)


def _e4m3_bound(a, b, a_s, b_s, b_block_rows):
    """Worst-case |C_fp8 - C| for e4m3 (3 mantissa bits, RNE): per element |x_hat - x| <= 2^-4 |x| + 2^-10 s
    (the second term covers subnormals), then |a_hat b_hat - a b| <= e_a |b| + |a| e_b + e_a e_b, summed over K."""
    e_a = 2.0**-4 * a.abs() + 2.0**-10 * a_s.repeat_interleave(128, 1)[:, : a.shape[1]]
    s_b = b_s.repeat_interleave(b_block_rows, 0).repeat_interleave(128, 1)[: b.shape[0], : b.shape[1]]
    e_b = 2.0**-4 * b.abs() + 2.0**-10 * s_b
    return e_a @ b.abs().t() + a.abs() @ e_b.t() + e_a @ e_b.t() + 1e-5 * (a.abs() @ b.abs().t())


@pytest.mark.parametrize("m, n, k", [(64, 96, 512), (67, 130, 257)])
def test_fp8_gemm_error_bound_and_outliers(m, n, k):
    """Error vs fp32 within the e4m3 bound; with outliers, far below a per-tensor-scaled FP8 GEMM."""
    torch.manual_seed(0)
    a, b = torch.randn(m, k), torch.randn(n, k) * 0.05
    a_q, a_s = quantize_act_ref(a)
    b_q, b_s = quantize_weight_ref(b)
    c = fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    ref = a @ b.t()
    assert ((c - ref).abs() <= _e4m3_bound(a, b, a_s, b_s, 128)).all()
    # typical relative error of e4m3 round-to-nearest products is ~3-4%; stated bound 5%
    assert _rel_fro(c, ref) < 0.05

    # "massive activation" tokens 1e5x larger than the rest: e4m3 spans 2^-9..448 (~2^18), so under one per-tensor
    # scale the ordinary tokens fall into the subnormals, while 1x128 tiles give every token its own scale
    a_out = a.clone()
    a_out[::17] *= 1e5
    a_q, a_s = quantize_act_ref(a_out)
    c = fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    ref = a_out @ b.t()
    assert ((c - ref).abs() <= _e4m3_bound(a_out, b, a_s, b_s, 128)).all()
    # per-row relative error, averaged: every token counts, not just the outliers that dominate the norm
    block_err, tensor_err = _row_rel(c, ref), _row_rel(per_tensor_fp8_matmul_ref(a_out, b), ref)
    assert block_err < 0.05
    assert block_err < 0.25 * tensor_err, (block_err, tensor_err)


# the last: forward, dgrad and wgrad all within cuBLAS's blockwise rules (K, N and tokens multiples of 512), so on an
# sm_90 GPU all three GEMMs of the layer run there
LINEAR_SHAPES = [((2, 33, 257), 130), ((64, 128), 256), ((5, 1, 130), 1), ((4, 128, 512), 512)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("x_shape, n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, None), (torch.bfloat16, 2e-2)])
def test_fp8_linear_triton_matches_torch_path(device, x_shape, n, dtype, rtol):
    """FP8Linear through Triton equals the torch-reference path: outputs and x / weight / bias gradients. fp32:
    1e-4 under the interpreter, 1e-3 on CUDA (the tensor cores' reduced-precision fp8 accumulation, see
    ``_fp32_rtol``, and an fp32 output feeding the next quantization can round the other way)."""
    rtol = rtol or (1e-3 if device == "cuda" else 1e-4)
    torch.manual_seed(0)
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device, dtype=dtype)
    w = (torch.randn(n, k, device=device) * k**-0.5).requires_grad_()
    bias = torch.randn(n, device=device).requires_grad_()
    dy = torch.randn(*x_shape[:-1], n, device=device, dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_()
        y = fp8_linear(xi, w, bias, backend=backend)
        (gx, gw, gb) = torch.autograd.grad(y, (xi, w, bias), dy)
        results.append((y, gx, gw, gb))
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=rtol * ref.float().abs().max().item())


def test_fp8_linear_close_to_fp32_linear():
    """All three GEMMs in FP8 stay within the e4m3 error level of the fp32 layer (relative Frobenius < 5%)."""
    torch.manual_seed(0)
    x = torch.randn(4, 50, 384, requires_grad=True)
    lin = torch.nn.Linear(384, 256)
    fp8 = FP8Linear.from_linear(lin)
    dy = torch.randn(4, 50, 256)
    y8 = fp8(x)
    g8 = torch.autograd.grad(y8, (x, lin.weight, lin.bias), dy)
    y = F.linear(x, lin.weight, lin.bias)
    g = torch.autograd.grad(y, (x, lin.weight, lin.bias), dy)
    assert _rel_fro(y8, y) < 0.05
    for a, b in zip(g8, g):
        assert _rel_fro(a, b) < 0.05
    assert g8[1].dtype == torch.float32  # master weight grad stays fp32


def test_weight_cache_refreshes_only_on_change():
    torch.manual_seed(0)
    lin = FP8Linear(256, 128, backend="torch")
    x = torch.randn(3, 256)
    with torch.no_grad():
        y0 = lin(x)
        lin(x)
    assert lin.fp8_cache.refreshes == 1  # generation reuses the fp8 copy
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    lin(x).sum().backward()
    opt.step()  # in-place update bumps weight._version
    with torch.no_grad():
        y1 = lin(x)
    assert lin.fp8_cache.refreshes == 2
    assert not torch.allclose(y0, y1)
    lin.weight = torch.nn.Parameter(torch.zeros_like(lin.weight))  # new storage
    with torch.no_grad():
        torch.testing.assert_close(lin(x), lin.bias.expand(3, -1))
    assert lin.fp8_cache.refreshes == 3
    cache = FP8WeightCache()
    q1 = cache.get(lin.weight, pow2=True)
    assert cache.get(lin.weight, pow2=True) is q1


@pytest.mark.parametrize("device", triton_devices())
def test_triton_gemm_reads_rows_past_2_pow_31_elements(device):
    """Row offsets are int64: in int32, ``row * stride`` wrapped for an operand past 2**31 elements (a wgrad's x^T at
    18432 x ~117k tokens) and read before the buffer. A strided view over a lazily allocated buffer puts row 2 at
    element 2**31 without touching 2 GB."""
    from dsalign.kernels.quant import quantize_act, quantize_weight

    torch.manual_seed(0)
    rows, k, n, stride = 3, 128, 16, 2**30
    buf = torch.empty((rows - 1) * stride + k, dtype=torch.uint8, device=device)
    a_q, a_s = quantize_act(torch.randn(rows, k, device=device), backend="torch")
    view = buf.as_strided((rows, k), (stride, 1)).view(torch.float8_e4m3fn)
    view.copy_(a_q)
    b_q, b_s = quantize_weight(torch.randn(n, k, device=device), backend="torch")
    want = fp8_gemm_ref(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    got = fp8_gemm(view, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton")
    mag = dequantize_ref(a_q, a_s, 1).abs() @ dequantize_ref(b_q, b_s, 128).abs().t()
    assert ((got - want).abs() <= _fp32_rtol(device) * mag + 1e-6).all()


def test_fp8_linear_runs_on_inference_tensors():
    """Weights made under ``torch.inference_mode`` have no version counter; the FP8 weight cache keys on it."""
    from dsalign.model import ModelConfig, Transformer

    with torch.inference_mode():
        model = Transformer(ModelConfig.preset("tiny").replace(fp8=True)).eval()
        logits = model(torch.randint(0, 256, (1, 6))).logits
    assert logits.isfinite().all()
