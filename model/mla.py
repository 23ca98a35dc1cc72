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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dsalign.kernels.causal_attention import blocked_causal_attention
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .layers import RMSNorm, applied_weight, fp8_base, make_linear
from .prompts import SharedPrompts
from .rope import apply_rope

# Longest sequence for the blocked CPU attention: it keeps ~0.6 T^2 probabilities per head for the backward.
BLOCKED_ATTENTION_MAX_T = 1024


# What one more bucket of documents costs, in score entries (per head): the fixed cost of its gather, attention
# and scatter, about one more 128-token document. Measured fwd + bwd on 2 CPU threads, 6 heads: an attention call
# costs ~0.3 ms + ~0.04 ms per 1,000 entries, and the demo's SFT batch runs 7.0 ms as [19, 64] + [13, 88] against
# 11.0 ms as one [32, 88] (its GRPO batch: 25.3 ms as [5, 64] + [59, 93], 26.2 ms as one [64, 93]).
BUCKET_OVERHEAD = 128 * 128


@dataclass(frozen=True)
class DocumentBucket:
    """Documents of similar length as one ``[N, L]`` batch: ``index_NL`` is the flat index into the ``B * T``
    tokens of each document's l-th token (0 in empty slots), ``tokens_M`` the flat indices of the bucket's real
    tokens, ``slots_M`` their flat index into ``N * L``."""

    index_NL: torch.Tensor
    tokens_M: torch.Tensor
    slots_M: torch.Tensor


@dataclass(frozen=True)
class DocumentLayout:
    """The documents of a padded or packed batch, laid out for attention.

    A document is the real tokens of one row that share a segment id, in row order. What
    ``build_attention_mask(position_ids, valid, segment_ids)`` lets a real query see is exactly the tokens before
    it in its own document, so gathering every document into a left-aligned row of its own turns the masked
    attention into plain causal attention (a short document's empty tail slots come after all of its tokens, so
    causal attention never reads them). Documents are grouped into buckets of similar length (``buckets``; each an
    ``[N, L]`` batch with L its longest document), so a long-tailed mix does not pad every short document to the
    longest one. Cost: ``sum(N * L^2)`` score entries instead of ``B * T^2``; a packed row of 384 tokens holding 6
    samples of 64 needs 1/6 of them. Padding queries attend only to themselves (their output is their own value);
    the mask path lets a right-padding query read the real keys before it too. Neither reaches a real token's
    output. ``tokens_M`` is every bucket's ``tokens_M`` concatenated, in bucket order; ``scores`` is
    ``sum(N * L^2)``; ``prefix_rows`` says the batch has no segments and every row's real tokens come first (right
    padding only), where plain causal attention over the whole batch already gives every real token its view.
    """

    buckets: tuple[DocumentBucket, ...]
    tokens_M: torch.Tensor
    scores: int
    prefix_rows: bool


# The latent norms' epsilon is fixed, whatever rms_norm_eps says: DeepSeek's reference code and transformers' model
# build them with the default 1e-6 and apply rms_norm_eps only to the layer and final norms. A checkpoint trained with
# another rms_norm_eps (e.g. 1e-5) is reproduced only this way.
LATENT_NORM_EPS = 1e-6


def _bucket_classes(class_sizes: list[tuple[int, int]]) -> list[int]:
    """Split ascending length classes ``(count, longest)`` into contiguous groups of least total cost
    ``sum(count * longest^2 + BUCKET_OVERHEAD)``; returns each class's group number (dynamic programming over the
    at most log2(T) classes)."""
    k = len(class_sizes)
    best = [0.0] + [float("inf")] * k  # best[j]: cost of the first j classes
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        n = 0
        for i in range(j, 0, -1):  # last group = classes i-1 .. j-1, padded to class j-1's longest document
            n += class_sizes[i - 1][0]
            cost = best[i - 1] + n * class_sizes[j - 1][1] ** 2 + BUCKET_OVERHEAD
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], k
    while j > 0:
        groups.append(range(cut[j], j))
        j = cut[j]
    group_of = [0] * k
    for g, classes in enumerate(reversed(groups)):
        for c in classes:
            group_of[c] = g
    return group_of


def document_layout(valid_BT: torch.Tensor | None, segment_ids_BT: torch.Tensor | None) -> DocumentLayout | None:
    """The ``DocumentLayout`` of a batch, or None when it would not save work over the mask (buckets' cost above
    ``B * T^2``) or there is nothing to lay out (no real token). Buckets: documents are classed by
    ``ceil(log2(length))`` and adjacent classes merged where one call costs less than two (``_bucket_classes``)."""
    ref = valid_BT if valid_BT is not None else segment_ids_BT
    if ref is None:
        return None
    B, T = ref.shape
    device = ref.device
    if valid_BT is not None:
        tokens_M = valid_BT.reshape(-1).nonzero().squeeze(1)
    else:
        tokens_M = torch.arange(B * T, device=device)
    if tokens_M.numel() == 0:
        return None
    doc_key_M = tokens_M // T
    if segment_ids_BT is not None:
        seg_M = segment_ids_BT.reshape(-1)[tokens_M]
        seg_M = seg_M - seg_M.min()
        doc_key_M = doc_key_M * (int(seg_M.max()) + 1) + seg_M
        doc_key_M, order_M = torch.sort(doc_key_M, stable=True)  # a row's tokens keep their order
        tokens_M = tokens_M[order_M]
    _, counts_N = torch.unique_consecutive(doc_key_M, return_counts=True)
    counts = counts_N.tolist()
    N = len(counts)
    class_N = [(n - 1).bit_length() for n in counts]  # ceil(log2(length))
    count, longest_of = {}, {}
    for n, c in zip(counts, class_N):
        count[c], longest_of[c] = count.get(c, 0) + 1, max(longest_of.get(c, 0), n)
    classes = sorted(count)
    group_of_class = dict(zip(classes, _bucket_classes([(count[c], longest_of[c]) for c in classes])))
    num_groups = max(group_of_class.values()) + 1
    sizes, longest = [0] * num_groups, [0] * num_groups
    for c, g in group_of_class.items():
        sizes[g], longest[g] = sizes[g] + count[c], max(longest[g], longest_of[c])
    scores = sum(n * L * L for n, L in zip(sizes, longest))
    if scores > B * T * T:
        return None
    prefix_rows = segment_ids_BT is None and (valid_BT is None or bool((valid_BT[:, 1:] <= valid_BT[:, :-1]).all()))
    doc_M = torch.repeat_interleave(torch.arange(N, device=device), counts_N)
    starts_N = torch.cumsum(counts_N, 0) - counts_N
    pos_M = torch.arange(tokens_M.numel(), device=device) - starts_N[doc_M]
    group_N = torch.tensor([group_of_class[c] for c in class_N], device=device)
    local_N = torch.empty(N, dtype=torch.long, device=device)  # a document's row within its bucket
    buckets = []
    for grp, (n, L) in enumerate(zip(sizes, longest)):
        local_N[group_N == grp] = torch.arange(n, device=device)
        sel_M = group_N[doc_M] == grp
        tokens = tokens_M[sel_M]
        slots = local_N[doc_M[sel_M]] * L + pos_M[sel_M]
        index = torch.zeros(n * L, dtype=torch.long, device=device)
        index[slots] = tokens
        buckets.append(DocumentBucket(index.view(n, L), tokens, slots))
    tokens_all = buckets[0].tokens_M if num_groups == 1 else torch.cat([b.tokens_M for b in buckets])
    return DocumentLayout(tuple(buckets), tokens_all, scores, prefix_rows)


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
                c_kv, k_pe = c_kv.to(x_BTD.dtype), k_pe.to(x_BTD.dtype)
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
        if isinstance(mask_BTS, DocumentLayout):
            return self._attend_documents(q_BTHK, k_BSHK, v_BSHV, mask_BTS)
        if isinstance(mask_BTS, SharedPrompts):
            return self._attend_shared(q_BTHK, k_BSHK, v_BSHV, mask_BTS)
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

    def _attend_shared(self, q_1MHK, k_1MHK, v_1MHV, layout: SharedPrompts) -> torch.Tensor:
        """Attention over a ``SharedPrompts`` stream: each prompt once (plain causal), then every row's own tokens
        against its prompt's keys and its own (``layout.mask_BLS``)."""
        M, H = q_1MHK.shape[1:3]
        q_MHK, k_MHK, v_MHV = q_1MHK[0], k_1MHK[0], v_1MHV[0]
        outs = []
        for rows, keys, slots, mask in ((layout.prompt_PL, None, layout.prompt_slots, None),
                                        (layout.query_BL, layout.key_BS, layout.query_slots, layout.mask_BLS)):
            if slots.numel() == 0:
                continue
            keys = rows if keys is None else keys
            N, L = rows.shape
            q = q_MHK.index_select(0, rows.reshape(-1)).view(N, L, H, -1).transpose(1, 2)
            k, v = (x.index_select(0, keys.reshape(-1)).view(N, keys.shape[1], H, -1).transpose(1, 2)
                    for x in (k_MHK, v_MHV))  # fmt: skip
            o_NHLV = self._attention(q, k, v, mask)
            outs.append(o_NHLV.transpose(1, 2).reshape(N * L, H, -1).index_select(0, slots))
        o_MHV = outs[0] if len(outs) == 1 else torch.cat(outs)  # stream order: prompts, then the rows' own tokens
        return o_MHV.view(1, M, H, -1)

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
