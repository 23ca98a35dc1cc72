"""Rotary position embedding with DeepSeek's YaRN extension (docs/SPEC.md section 2).

Shape legend: B batch, T tokens, H heads, R rope dims (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin attention factor.

    YaRN: ``f'_i = f_i / factor * (1 - e_i) + f_i * e_i`` where the extrapolation weight ``e_i`` is one minus a
    linear ramp between the correction dims found for ``beta_fast``/``beta_slow`` over
    ``original_max_position_embeddings`` (floored/ceiled, as the official code and transformers do).
    """
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) in (None, "default"):
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = _yarn_get_mscale(factor)
    if "attention_factor" in rs and rs["attention_factor"] is not None:
        attention_factor = float(rs["attention_factor"])

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) [B, T, R/2] for given positions; frequencies are derived, never loaded."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave
        self._cfg = cfg

    def reset_parameters(self) -> None:
        """Recompute frequencies (after ``to_empty`` from the meta device)."""
        inv_freq, _ = rope_frequencies(self._cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids_BT[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x_BTHR: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of ``x`` ([B, T, H, R] or [B, T, R]).

    ``interleave=True`` (official DeepSeek layout) rotates adjacent pairs (2i, 2i+1); the result is written
    evens-then-odds, exactly as transformers does, so q.k matches either way. ``interleave=False`` treats the
    weights as already half-split (rotate_half).
    """
    if x_BTHR.dim() == 4:
        cos_BTr, sin_BTr = cos_BTr[:, :, None, :], sin_BTr[:, :, None, :]
    cos_BTr, sin_BTr = cos_BTr.to(x_BTHR.dtype), sin_BTr.to(x_BTHR.dtype)
    if interleave:
        x1, x2 = x_BTHR[..., 0::2], x_BTHR[..., 1::2]
    else:
        x1, x2 = x_BTHR.chunk(2, dim=-1)
    return torch.cat([x1 * cos_BTr - x2 * sin_BTr, x2 * cos_BTr + x1 * sin_BTr], dim=-1)
