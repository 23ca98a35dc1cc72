"""Fine-grained FP8 (E4M3) block quantization, as in DeepSeek-V3 section 3.3.2 (docs/SPEC.md section 5).

Shape legend: M rows, K columns (the GEMM reduction dimension for activations), B the block size (128).

* Activations and gradients: 1xB tiles -- one scale per row per B consecutive columns, ``scale`` [M, ceil(K/B)].
* Weights: BxB blocks -- one scale per block, ``scale`` [ceil(M/B), ceil(K/B)] (the checkpoint ``weight_scale_inv``).

Scales are multipliers (dequant = fp8 * scale), computed from the tile's online amax: ``s = max(amax, 1e-4) / 448``,
optionally rounded UP to a power of two (ue8m0) so that the scale is exact in 8 exponent bits and the fp8 values
never overflow. Edges not divisible by B form partial tiles; their scale comes from the elements that exist.

Every quantizer has a plain torch reference (``*_ref``) that the Triton kernel is tested against; the public
``quantize_act`` / ``quantize_weight`` / ``dequantize`` pick Triton on CUDA (or when forced) and torch elsewhere.
``quantize_weight_blockwise`` / ``dequantize_weight_blockwise`` are the torch-only pair the checkpoint loader uses.
"""

from __future__ import annotations

import torch
from dsalign.kernels._backend import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-4
BLOCK = 128


# --------------------------------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------------------------------


def _pow2_round_up(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal fp32 scales up to the next power of two, bit-exactly (ue8m0).

    Adding 0x7FFFFF to the bit pattern carries into the exponent iff the mantissa is non-zero; masking the
    mantissa then leaves 2**ceil(log2(s)). No log2/exp2 approximations, so torch and Triton agree bit for bit.
    """
    bits = scale.float().contiguous().view(torch.int32)
    rounded = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(scale.isfinite(), rounded, scale)  # the bit trick maps inf and NaN to 0: keep them


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``s = max(amax, 1e-4) / 448`` in fp32, optionally rounded up to a power of two."""
    amax = amax.float().clamp_min(AMAX_EPS)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal (not correctly rounded),
    # which puts ~half the scales 1 ulp off the Triton quantizers' correctly rounded division
    scale = amax / torch.full_like(amax, FP8_MAX)
    return _pow2_round_up(scale) if pow2 else scale


def _to_fp8(x_scaled: torch.Tensor) -> torch.Tensor:
    # amax/scale maps the largest element to exactly +-448; the clamp only guards fp32 rounding at the boundary.
    return x_scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_act_ref(x_MK: torch.Tensor, block: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim. Returns (x_fp8 [M, K] contiguous, scale fp32 [M, ceil(K/block)])."""
    if x_MK.dim() != 2:
        raise ValueError(f"quantize_act_ref: expected a 2-D [M, K] tensor, got shape {tuple(x_MK.shape)}")
    m, k = x_MK.shape
    kb = -(-k // block)
    x = torch.nn.functional.pad(x_MK.float(), (0, kb * block - k)).view(m, kb, block)
    scale = scale_from_amax(x.abs().amax(dim=-1), pow2)
    x_fp8 = _to_fp8(x / scale[..., None]).view(m, kb * block)[:, :k].contiguous()
    return x_fp8, scale


def quantize_weight_ref(
    w_MN: torch.Tensor, block: int = BLOCK, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """block x block tiles. Returns (w_fp8 [M, N] contiguous, scale fp32 [ceil(M/block), ceil(N/block)])."""
    if w_MN.dim() != 2:
        raise ValueError(f"quantize_weight_ref: expected a 2-D [M, N] tensor, got shape {tuple(w_MN.shape)}")
    m, n = w_MN.shape
    mb, nb = -(-m // block), -(-n // block)
    w = torch.nn.functional.pad(w_MN.float(), (0, nb * block - n, 0, mb * block - m))
    w = w.view(mb, block, nb, block)
    scale = scale_from_amax(w.abs().amax(dim=(1, 3)), pow2)
    w_fp8 = _to_fp8(w / scale[:, None, :, None]).view(mb * block, nb * block)[:m, :n].contiguous()
    return w_fp8, scale


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block_rows: int, block_cols: int) -> torch.Tensor:
    """Broadcast a per-tile scale grid to a full [rows, cols] tensor (partial edge tiles cropped)."""
    full = scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_ref(
    x_fp8: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int = BLOCK, dtype=torch.float32
) -> torch.Tensor:
    """fp8 * scale, ``scale`` holding one entry per block_rows x block_cols tile (1x128 acts, 128x128 weights)."""
    full = expand_scale(scale.float(), tuple(x_fp8.shape), block_rows, block_cols)
    return (x_fp8.float() * full).to(dtype)


def quantize_weight_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint-format quantization (torch, any device): ``w`` [M, N] -> (e4m3 [M, N], ``weight_scale_inv``).

    ``weight_scale_inv`` is fp32 [ceil(M/block), ceil(N/block)] and is a multiplier: w ~= w_fp8 * scale_inv.
    """
    return quantize_weight_ref(w, block=block, pow2=False)


def dequantize_weight_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Checkpoint-format dequantization (torch, any device): ``w_fp8 * weight_scale_inv`` per block, as ``dtype``.

    Accepts the padded scale grid of shapes not divisible by ``block`` (e.g. kv_a_proj_with_mqa: 576 rows, 5 scale
    rows). Raises if the scale grid does not match ``ceil(M/block) x ceil(N/block)``.
    """
    if w_fp8.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(
            f"dequantize_weight_blockwise: expected 2-D weight and scale, got {tuple(w_fp8.shape)} and "
            f"{tuple(scale_inv.shape)}"
        )
    m, n = w_fp8.shape
    expected = (-(-m // block), -(-n // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_weight_blockwise: weight {tuple(w_fp8.shape)} with block {block} needs weight_scale_inv "
            f"of shape {expected}, got {tuple(scale_inv.shape)}"
        )
    return dequantize_ref(w_fp8, scale_inv, block, block, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_to_e4m3(v):
        """Round fp32 (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32.

        Done explicitly so the following ``.to(tl.float8e4nv)`` is exact: hardware (cvt.rn.satfinite) and the
        interpreter then agree bit for bit with torch's ``.to(torch.float8_e4m3fn)``.
        """
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # keep 3 mantissa bits
        subnormal = (a + 16384.0) - 16384.0  # e4m3 subnormals are multiples of 2**-9 = ulp(2**14) in fp32
        r = tl.where(a < 0.015625, subnormal, normal)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _scale_from_amax(amax, POW2: tl.constexpr):
        # NaN and inf pass through (tl.maximum is maxnum: it would turn a NaN amax into 1e-4, a finite scale), so
        # a non-finite input stays non-finite after dequantization, as in the torch reference
        # div_rn: correctly rounded like torch's division (Triton's plain `/` compiles to div.full.f32, <= 2 ulp)
        s = tl.math.div_rn(tl.where(amax != amax, amax, tl.maximum(amax, 1e-4)), 448.0)
        if POW2:
            up = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
            s = tl.where(s < 3.0e38, up, s)  # the bit trick maps inf and NaN to 0
        return s

    @triton.jit
    def _nan_amax(x, axis: tl.constexpr):
        """``max |x|`` along ``axis``, NaN if any element is NaN (``tl.max`` skips NaN)."""
        amax = tl.max(tl.abs(x), axis=axis)
        has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
        return tl.where(has_nan, float("nan"), amax)

    @triton.jit
    def _clamp_e4m3(v):
        """Clamp to e4m3's finite range, keeping NaN (maxnum/minnum would turn it into -448)."""
        return tl.where(v != v, v, tl.minimum(tl.maximum(v, -448.0), 448.0))

    @triton.jit
    def _quant_tile_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_sm,
        TILE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr,
    ):  # fmt: skip
        """One program quantizes a [BLOCK_M, BLOCK_K] tile of x into contiguous q [M, K].

        TILE_ROWS == 1: one scale per row (1 x BLOCK_K activation tiles, BLOCK_M rows per program);
        TILE_ROWS == BLOCK_M: one scale for the whole tile (BLOCK_M x BLOCK_K weight blocks).
        """
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        # int64 rows and columns: offsets past 2**31 elements, e.g. the wgrad's x.t() (column stride = features)
        # with tokens x features >= 2**31, where an int32 col * stride product wraps
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        row_amax = _nan_amax(x, 1)
        if TILE_ROWS == 1:
            s = _scale_from_amax(row_amax, POW2)
            q = _round_to_e4m3(_clamp_e4m3(tl.math.div_rn(x, s[:, None])))
            tl.store(s_ptr + rows * stride_sm + pid_k, s, mask=rows < M)
        else:
            s = _scale_from_amax(_nan_amax(row_amax, 0), POW2)
            q = _round_to_e4m3(_clamp_e4m3(tl.math.div_rn(x, s)))
            tl.store(s_ptr + pid_m * stride_sm + pid_k, s)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _dequant_kernel(
        q_ptr, s_ptr, y_ptr, M, K, stride_sm,
        SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_offs = (rows[:, None] // SCALE_ROWS) * stride_sm + cols[None, :] // SCALE_COLS
        s = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
        tl.store(y_ptr + rows[:, None] * K + cols[None, :], (q * s).to(y_ptr.dtype.element_ty), mask=mask)


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"Triton quantization needs a power-of-two block >= 16, got {block}")


def _quantize_triton(x: torch.Tensor, block: int, pow2: bool, tile_rows: int, rows_per_prog: int):
    _check_block(block)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(-(-m // tile_rows), -(-k // block), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, rows_per_prog), triton.cdiv(k, block))
    _quant_tile_kernel[grid](
        x, q, scale, m, k, x.stride(0), x.stride(1), scale.stride(0),
        TILE_ROWS=tile_rows, BLOCK_M=rows_per_prog, BLOCK_K=block, POW2=pow2,
        num_warps=8 if rows_per_prog >= 128 else 4,  # a 128x128 weight tile on 4 warps spills registers (sm_90)
    )  # fmt: skip
    return q, scale


def quantize_act(
    x_MK: torch.Tensor, block: int = BLOCK, pow2: bool = False, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim of a 2-D tensor (any strides; pass ``x.t()`` to tile along rows).

    Returns (x_fp8 [M, K] contiguous e4m3, scale fp32 [M, ceil(K/block)]) with x ~= x_fp8 * scale.
    """
    if x_MK.dim() != 2:
        raise ValueError(f"quantize_act: expected a 2-D [M, K] tensor, got shape {tuple(x_MK.shape)}")
    if not use_triton(x_MK, backend):
        return quantize_act_ref(x_MK, block, pow2)
    return _quantize_triton(x_MK, block, pow2, tile_rows=1, rows_per_prog=32)


def quantize_weight(
    w_MN: torch.Tensor, block: int = BLOCK, pow2: bool = False, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """block x block tiles. Returns (w_fp8 [M, N] contiguous e4m3, scale fp32 [ceil(M/block), ceil(N/block)])."""
    if w_MN.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D [M, N] tensor, got shape {tuple(w_MN.shape)}")
    if not use_triton(w_MN, backend):
        return quantize_weight_ref(w_MN, block, pow2)
    return _quantize_triton(w_MN, block, pow2, tile_rows=block, rows_per_prog=block)


def dequantize(
    x_fp8: torch.Tensor,
    scale: torch.Tensor,
    block_rows: int,
    block_cols: int = BLOCK,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """fp8 * scale for 1 x 128 (``block_rows=1``) or 128 x 128 (``block_rows=128``) scale grids."""
    m, k = x_fp8.shape
    expected = (-(-m // block_rows), -(-k // block_cols))
    if x_fp8.dtype != FP8_DTYPE or tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize: expected e4m3 [M, K] with scale {expected}, got {x_fp8.dtype} {tuple(x_fp8.shape)} and "
            f"scale {tuple(scale.shape)}"
        )
    if not use_triton(x_fp8, backend):
        return dequantize_ref(x_fp8, scale, block_rows, block_cols, dtype)
    assert x_fp8.is_contiguous() and scale.stride(1) == 1, "dequantize: fp8 data and scale rows must be contiguous"
    y = torch.empty(m, k, dtype=dtype, device=x_fp8.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 128))
    _dequant_kernel[grid](
        x_fp8, scale, y, m, k, scale.stride(0), SCALE_ROWS=block_rows, SCALE_COLS=block_cols, BLOCK_M=32, BLOCK_K=128
    )
    return y
