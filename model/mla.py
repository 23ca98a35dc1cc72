"""Multi-head latent attention (docs/SPEC.md section 2), naive and weight-absorbed.

Shape legend: B batch, T query tokens, S key tokens, D hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, C kv_lora_rank.

- Naive (training / prefill): expand the latent through ``kv_b_proj`` into per-head K and V, then SDPA. Padded or
  packed batches without a cache attend per document (``DocumentLayout``): each document's tokens are gathered
  into a row of their own, so attention is plain causal and never computes what the padding/segment mask hides.
- Absorbed (decode): fold ``W_UK`` into the query and ``W_UV`` into the output so attention runs on the cached
  latent directly; the cache holds only ``c_kv`` (C) and ``k_pe`` (R) per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsalign.kernels.causal_attention import blocked_causal_attention
from dsalign.kernels.grouped_gemm import autocast_dtype
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .layers import RMSNorm, applied_weight, fp8_base, make_linear
from .layout import DocumentLayout, SharedPrompts
from .rope import apply_rope

# Longest sequence for the blocked CPU attention: it keeps ~0.6 T^2 probabilities per head for the backward.
BLOCKED_ATTENTION_MAX_T = 1024


# The latent norms' epsilon is fixed, whatever rms_norm_eps says: DeepSeek's reference code and transformers' model
# build them with the default 1e-6 and apply rms_norm_eps only to the layer and final norms. A checkpoint trained with
# another rms_norm_eps (e.g. 1e-5) is reproduced only this way.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(cfg, cfg.hidden_size, self.n_heads * qk_dim)
        else:
            self.q_a_proj = make_linear(cfg, cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = make_linear(cfg, cfg.q_lora_rank, self.n_heads * qk_dim)
        self.kv_a_proj_with_mqa = make_linear(
            cfg, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = make_linear(cfg, cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = make_linear(cfg, self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def _queries(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHK = q.view(*x_BTD.shape[:2], self.n_heads, self.nope_dim + self.rope_dim)
        q_nope_BTHN, q_pe_BTHR = q_BTHK.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope_BTHN, apply_rope(q_pe_BTHR, cos, sin, self.interleave)

    def _latents(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_kv_BTC, k_pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv_BTC), apply_rope(k_pe_BTR, cos, sin, self.interleave)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_BTS: torch.Tensor | None,
        cache: LatentCache | None = None,
        position_ids_BT: torch.Tensor | None = None,
        absorbed: bool = False,
        valid_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask_BTS`` is boolean (True = may attend). With a cache, latents are written at ``position_ids_BT``
        and attention reads every cached position up to the batch's furthest query; ``mask_BTS`` is then built
        by the caller over those cached positions."""
        cos, sin = rope
        q_nope, q_pe = self._queries(x_BTD, cos, sin)
        c_kv, k_pe = self._latents(x_BTD, cos, sin)
        if cache is not None:
            cache.write(self.layer_idx, self._as_kv_b_input(c_kv), k_pe, position_ids_BT, valid_BT)
            if absorbed:
                c_kv, k_pe = cache.read(self.layer_idx, mask_BTS.shape[-1])
                # the dtype attention computes in: under autocast its dtype, which the engine keeps the latents in
                # (no cast of the whole context per step), else the residual stream's
                dtype = autocast_dtype(x_BTD.device.type) or x_BTD.dtype
                c_kv, k_pe = c_kv.to(dtype), k_pe.to(dtype)
        if absorbed:
            o_BTHV = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask_BTS)
        else:
            o_BTHV = self._attend_naive(q_nope, q_pe, c_kv, k_pe, mask_BTS)
        return self.o_proj(o_BTHV.reshape(*x_BTD.shape[:2], self.n_heads * self.v_dim))

    def _as_kv_b_input(self, c_kv_BTC: torch.Tensor) -> torch.Tensor:
        """The latent as ``kv_b_proj`` sees it. An FP8 ``kv_b_proj`` quantizes its input in 1x128 tiles per token;
        the absorbed decode multiplies the cached latent directly, so the cache keeps it quantized-dequantized the
        same way (per token, so independent of what else is cached): decoding then computes the training
        forward's FP8 math, up to fp32 summation order, and rollout log-probs match training's."""
        from dsalign.kernels.quant import dequantize, quantize_act

        base = fp8_base(self.kv_b_proj)
        if base is None:
            return c_kv_BTC
        q, s = quantize_act(c_kv_BTC.reshape(-1, c_kv_BTC.shape[-1]), pow2=base.pow2, backend=base.backend)
        return dequantize(q, s, 1, backend=base.backend).view(c_kv_BTC.shape).to(c_kv_BTC.dtype)

    def _attend_naive(self, q_nope, q_pe, c_kv_BSC, k_pe_BSR, mask_BTS) -> torch.Tensor:
        B, S = c_kv_BSC.shape[:2]
        if hasattr(self.kv_b_proj, "base_layer") and (c_in := self._as_kv_b_input(c_kv_BSC)) is not c_kv_BSC:
            # LoRA over an FP8 kv_b_proj: its adapters see the latent as the base does (quantized-dequantized; the
            # gradient passes straight through), as the absorbed decode applies base + delta to the cached latent
            c_kv_BSC = c_kv_BSC + (c_in - c_kv_BSC).detach()
        kv_BSHK = self.kv_b_proj(c_kv_BSC).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope_BSHN, v_BSHV = kv_BSHK.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe_BSHR = k_pe_BSR[:, :, None, :].expand(-1, -1, self.n_heads, -1)
        q_BTHK = torch.cat([q_nope, q_pe], dim=-1)
        k_BSHK = torch.cat([k_nope_BSHN, k_pe_BSHR], dim=-1)
        if isinstance(mask_BTS, SharedPrompts):  # [1, M] stream tokens, attending per row (as documents)
            mask_BTS = mask_BTS.attention
        if isinstance(mask_BTS, DocumentLayout):
            return self._attend_documents(q_BTHK, k_BSHK, v_BSHV, mask_BTS)
        q_BHTK, k_BHSK, v_BHSV = q_BTHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2)
        return self._attention(q_BHTK, k_BHSK, v_BHSV, mask_BTS).transpose(1, 2)

    def _attend_documents(self, q_BTHK, k_BTHK, v_BTHV, layout: DocumentLayout) -> torch.Tensor:
        """Causal attention within each document of ``layout``; padding tokens get their own value."""
        B, T, H, _ = q_BTHK.shape
        q_MHK, k_MHK, v_MHV = (x.reshape(B * T, H, -1) for x in (q_BTHK, k_BTHK, v_BTHV))
        outs = []
        for bucket in layout.buckets:
            N, L = bucket.index_NL.shape
            flat = bucket.index_NL.view(-1)  # index_select: its backward is an index_add
            q, k, v = (x.index_select(0, flat).view(N, L, H, -1).transpose(1, 2) for x in (q_MHK, k_MHK, v_MHV))
            o_NHLV = self._attention(q, k, v, None)  # [N, H, L, V]
            outs.append(o_NHLV.transpose(1, 2).reshape(N * L, H, -1).index_select(0, bucket.slots_M))
        o_MHV = outs[0] if len(outs) == 1 else torch.cat(outs)
        return v_MHV.index_copy(0, layout.tokens_M, o_MHV).view(B, T, H, -1)

    def _attention(self, q_BHTK, k_BHSK, v_BHSV, mask_BTS) -> torch.Tensor:
        """SDPA, except on CPU where torch's kernels waste work at MLA's shapes (V head dim < K head dim)."""
        T = q_BHTK.shape[2]
        on_cpu = q_BHTK.device.type == "cpu"
        if on_cpu and mask_BTS is None and q_BHTK.dtype == torch.float32 and T <= BLOCKED_ATTENTION_MAX_T:
            # Plain causal, short: query blocks skip most of the masked half (kernels/causal_attention.py).
            q, k, v = q_BHTK.contiguous(), k_BHSK.contiguous(), v_BHSV.contiguous()
            return blocked_causal_attention(q, k, v, self.scale)
        # CUDA's flash kernel (half precision, no explicit mask) also wants equal head dims; without it SDPA falls
        # back to the memory-efficient kernel
        flash_cuda = q_BHTK.is_cuda and mask_BTS is None and q_BHTK.dtype in (torch.bfloat16, torch.float16)
        pad = k_BHSK.shape[-1] - self.v_dim if on_cpu or flash_cuda else 0
        if pad > 0:
            # CPU SDPA has a flash kernel only for equal q/k/v head dims; otherwise it takes the math path, which
            # materializes [B, H, T, S] scores and computes the masked half of causal attention too. Zero columns
            # appended to V leave the first v_dim output columns unchanged (and their gradients: the pad's backward
            # drops the extra columns).
            v_BHSV = F.pad(v_BHSV, (0, pad))
        attn_mask = None if mask_BTS is None else mask_BTS[:, None]
        o_BHTV = F.scaled_dot_product_attention(
            q_BHTK, k_BHSK, v_BHSV, attn_mask=attn_mask, is_causal=mask_BTS is None, scale=self.scale
        )
        return o_BHTV[..., : self.v_dim]

    def _attend_absorbed(self, q_nope, q_pe, c_kv_BSC, k_pe_BSR, mask_BTS) -> torch.Tensor:
        w_HKC = applied_weight(self.kv_b_proj).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HKC[:, : self.nope_dim], w_HKC[:, self.nope_dim :]
        w_uk_HNC, w_uv_HVC = w_uk_HNC.to(q_nope.dtype), w_uv_HVC.to(q_nope.dtype)
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk_HNC)
        scores_BHTS = torch.einsum("bthc,bsc->bhts", q_lat_BTHC, c_kv_BSC) + torch.einsum(
            "bthr,bsr->bhts", q_pe, k_pe_BSR
        )
        scores_BHTS = scores_BHTS.float() * self.scale
        if mask_BTS is None:
            T, S = scores_BHTS.shape[-2:]
            mask_BTS = torch.ones(T, S, dtype=torch.bool, device=scores_BHTS.device).tril(S - T)[None]
        scores_BHTS = scores_BHTS.masked_fill(~mask_BTS[:, None], float("-inf"))
        p_BHTS = scores_BHTS.softmax(dim=-1).to(q_nope.dtype)
        o_lat_BTHC = torch.einsum("bhts,bsc->bthc", p_BHTS, c_kv_BSC)
        return torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_uv_HVC)
