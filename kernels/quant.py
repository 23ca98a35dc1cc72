"""Fine-grained FP8 (E4M3) block quantization, as in DeepSeek-V3 section 3.3.2 (SPEC.md section 5).

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
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``s = max(amax, 1e-4) / 448`` in fp32, optionally rounded up to a power of two."""
    scale = amax.float().clamp_min(AMAX_EPS) / FP8_MAX
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
