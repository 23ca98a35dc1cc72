"""Shared building blocks: RMSNorm, the linear-layer factory, the dense SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsalign.kernels import cpu_gemm
from dsalign.kernels.grouped_gemm import autocast_dtype, autocast_weight, caching_casts
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as transformers and the official code)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` whose large fp32 CPU GEMMs run through oneDNN (``kernels/cpu_gemm.py``); elsewhere (CUDA, bf16,
    small products) exactly ``F.linear``. Same parameters and state-dict keys; peft wraps it like ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x.device.type) if caching_casts() else None
        if dtype is not None:
            # a decode step under the trainer's autocast (the rollout engine's ``caching_autocast_weights``): the
            # weight is cast once per ``generate`` instead of once per step, as autocast would (on a memory-bound
            # decode step the per-step cast cost more than the GEMM)
            bias = None if self.bias is None else autocast_weight(self.bias, dtype)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(dtype), autocast_weight(self.weight, dtype), bias)
        return cpu_gemm.linear(x, self.weight, self.bias)


def make_linear(cfg: ModelConfig, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """Every projection the FP8 recipe quantizes is built here, so the kernel switch lives in one place.

    Embedding, output head, MoE gate and norms never come through this factory: they stay in bf16/fp32.
    ``FP8Linear`` subclasses ``nn.Linear`` (same parameters and state-dict keys), so checkpoints do not change.
    """
    if cfg.fp8:
        from dsalign.kernels.fp8_gemm import FP8Linear

        return FP8Linear(in_features, out_features, bias=bias, pow2=cfg.fp8_pow2_scales)
    return Linear(in_features, out_features, bias=bias)


def fp8_base(linear: nn.Module):
    """The ``FP8Linear`` a linear layer runs, looking through a peft LoRA wrapper; None for any other layer."""
    from dsalign.kernels.fp8_gemm import FP8Linear

    base = getattr(linear, "base_layer", linear)  # peft wraps the layer
    return base if isinstance(base, FP8Linear) else None


def applied_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, for code that reads it instead of calling the layer (the absorbed MLA
    decode folds ``kv_b_proj`` into its attention): ``linear.weight`` (an ``FP8Linear``'s dequantized fp8 copy, the
    weight its GEMMs apply, so FP8 decoding matches FP8 training), plus the deltas of active, unmerged LoRA
    adapters when peft has wrapped the layer (``alignment/trainer/lora.py``), so decoding sees what training does.
    The delta ``scale * B @ A`` is recomputed per call: one pass over a weight-sized tensor, kept simple over a
    cache that would have to notice every optimizer step."""
    base = fp8_base(linear)
    if base is not None:  # the FP8 GEMM applies the fp8 weight: so must code that reads it
        weight = base.fp8_cache.get(base.weight, pow2=base.pow2, backend=base.backend).dequantized(base.weight.dtype)
    else:
        weight = linear.weight
    if hasattr(linear, "get_delta_weight") and not linear.merged and not linear.disable_adapters:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate x) * up x)`` (dense layers and shared experts)."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = make_linear(cfg, cfg.hidden_size, intermediate_size)
        self.up_proj = make_linear(cfg, cfg.hidden_size, intermediate_size)
        self.down_proj = make_linear(cfg, intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
