"""Block quantization: torch references (checkpoint format) and the Triton kernels against them."""

import pytest
import torch
from dsalign.kernels.quant import (
    FP8_DTYPE,
    dequantize,
    dequantize_ref,
    dequantize_weight_blockwise,
    quantize_act,
    quantize_act_ref,
    quantize_weight,
    quantize_weight_blockwise,
    quantize_weight_ref,
)
from triton_cases import triton_devices

# e4m3 keeps 3 mantissa bits: round-to-nearest error <= 2**-4 relative to the element, and elements far below the
# tile amax can fall into the subnormal range where the absolute error is <= scale * 2**-10.
E4M3_REL = 2.0**-4


def _roundtrip_bound(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return E4M3_REL * x.abs() + scale_full * 2.0**-9


@pytest.mark.parametrize("shape", [(256, 384), (576, 7168 // 8), (67, 130), (1, 1), (129, 257)])
def test_weight_blockwise_roundtrip(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    w_fp8, scale_inv = quantize_weight_blockwise(w)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    deq = dequantize_weight_blockwise(w_fp8, scale_inv)
    full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert ((deq - w).abs() <= _roundtrip_bound(w, full)).all()
    # the block amax maps to +-448 exactly, so every block uses the full e4m3 range
    assert w_fp8.float().abs().max() == 448.0
    assert dequantize_weight_blockwise(w_fp8, scale_inv, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_kv_a_proj_padded_scale_rows():
    """SPEC 5: kv_a_proj_with_mqa has 576 rows -> 5 scale rows; a wrong grid is rejected with the expected shape."""
    w = torch.randn(576, 256)
    w_fp8, scale_inv = quantize_weight_blockwise(w)
    assert scale_inv.shape == (5, 2)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        dequantize_weight_blockwise(w_fp8, scale_inv[:4])


def test_scale_is_amax_over_448_with_clamp_and_pow2():
    w = torch.zeros(128, 256)
    w[3, 5] = -2.0
    w[:, 128:] = 1e-7  # amax below the 1e-4 clamp
    _, s = quantize_weight_ref(w)
    torch.testing.assert_close(s, torch.tensor([[2.0 / 448, 1e-4 / 448]]))
    _, s2 = quantize_weight_ref(w, pow2=True)
    torch.testing.assert_close(s2, torch.tensor([[2.0**-7, 2.0**-22]]))  # 2/448 -> 2^-7.8 -> 2^-7


def test_act_ref_tiles_are_per_row():
    x = torch.ones(4, 200)
    x[1, 130] = 8.0
    x_fp8, s = quantize_act_ref(x)
    assert s.shape == (4, 2)
    torch.testing.assert_close(s[1], torch.tensor([1 / 448, 8 / 448]))
    torch.testing.assert_close(s[0], torch.tensor([1 / 448, 1 / 448]))
    assert x_fp8[1, 130].float() == 448.0


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels vs the torch references. The kernel rounds to e4m3 explicitly (ties to even), so the fp8 bytes
# match torch exactly except where fp32 division differs in the last bit right at a rounding tie: we allow 1 e4m3
# ulp on at most 0.1% of the elements and require the scales to match to 1e-6 relative.
# ---------------------------------------------------------------------------------------------------------------------

SHAPES = [(128, 256), (67, 130), (1, 257), (200, 1)]


def _assert_fp8_close(q, q_ref, s_full):
    a, b = q.float().cpu(), q_ref.float().cpu()
    diff = (a - b).abs()
    assert (diff <= 2.0**-3 * b.abs() + 2.0**-9).all(), "more than one e4m3 ulp apart"
    assert (diff > 0).float().mean() <= 1e-3


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act_triton(device, shape, dtype, pow2):
    torch.manual_seed(1)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[1])).to(dtype).to(device)
    q, s = quantize_act(x, pow2=pow2, backend="triton")
    q_ref, s_ref = quantize_act_ref(x, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    _assert_fp8_close(q, q_ref, s)
    # the transposed view quantizes along the other dim without a copy (wgrad tiles run along tokens)
    qt, st = quantize_act(x.t(), pow2=pow2, backend="triton")
    qt_ref, st_ref = quantize_act_ref(x.t().contiguous(), pow2=pow2)
    torch.testing.assert_close(st, st_ref, rtol=1e-6, atol=0)
    _assert_fp8_close(qt, qt_ref, st)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", SHAPES + [(576, 200)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_weight_triton(device, shape, pow2):
    torch.manual_seed(2)
    w = (torch.randn(shape) * 0.02).to(device)
    w[0, 0] = 3.0  # an outlier only affects its own block
    q, s = quantize_weight(w, pow2=pow2, backend="triton")
    q_ref, s_ref = quantize_weight_ref(w, pow2=pow2)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    _assert_fp8_close(q, q_ref, s)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("block_rows", [1, 128])
@pytest.mark.parametrize("shape", [(67, 130), (256, 128)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 0, 0), (torch.bfloat16, 0, 2**-7)])
def test_dequantize_triton(device, block_rows, shape, dtype, atol, rtol):
    """fp32 output is exact; bf16 may differ by one bf16 rounding (the interpreter truncates fp32 -> bf16)."""
    torch.manual_seed(3)
    x = torch.randn(shape, device=device)
    q, s = (quantize_act_ref if block_rows == 1 else quantize_weight_ref)(x)
    y = dequantize(q, s, block_rows, dtype=dtype, backend="triton")
    torch.testing.assert_close(y, dequantize_ref(q, s, block_rows, dtype=dtype), rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf, on purpose
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_quantizers_keep_non_finite_inputs_non_finite(device, pow2):
    """A NaN (or inf) in a tile must not come back finite: tl.max / tl.maximum skip NaN, which made the NaN -448
    (or -amax after dequantization) and an inf -inf, hiding the overflow from every check downstream."""
    x = torch.ones(4, 256, device=device)
    x[0, 3], x[1, 5], x[2, 200] = float("nan"), float("inf"), float("-inf")
    for quantize, block_rows in ((quantize_act, 1), (quantize_weight, 128)):
        q, s = quantize(x, pow2=pow2, backend="triton")
        q_ref, s_ref = (quantize_act_ref if block_rows == 1 else quantize_weight_ref)(x, pow2=pow2)
        got, want = dequantize_ref(q, s, block_rows), dequantize_ref(q_ref, s_ref, block_rows)
        assert torch.equal(got.isfinite(), want.isfinite()), (quantize.__name__, got.isfinite().sum())
        assert not got[0, 3].isfinite() and not got[1, 5].isfinite() and not got[2, 200].isfinite()
        if block_rows == 1:  # 1 x 128 tiles: the clean row is untouched (a 128 x 128 block shares the damage)
            assert torch.equal(got[3], want[3]) and got[3].isfinite().all()


@pytest.mark.parametrize("device", triton_devices())
def test_quantize_act_reads_columns_past_2_pow_31_elements(device):
    """The FP8 wgrad quantizes ``x.t()``, whose column stride is the feature count: with tokens x features >= 2**31
    an int32 ``col * stride`` wrapped and read before the buffer. A transposed view over a lazily allocated buffer
    (4 GB of address space, three touched pages) puts column 2 at element 2**31."""
    cols, rows, stride = 3, 16, 2**30
    buf = torch.empty((cols - 1) * stride + rows, dtype=torch.bfloat16, device=device)
    data = torch.randn(cols, rows, device=device).to(torch.bfloat16)
    base = buf.as_strided((cols, rows), (stride, 1))
    base.copy_(data)
    x = base.t()  # [16, 3], strides (1, 2**30)
    q, s = quantize_act(x, backend="triton")
    q_ref, s_ref = quantize_act_ref(data.t())
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
