"""The DeepSeek-V3 network: embeddings, decoder layers (MLA + dense MLP or MoE), final norm, head, MTP modules.

Shape legend: B batch, T tokens, S cached key positions, D hidden, V vocab, L MoE layers, E routed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from dsalign.kernels.fused_ce import fused_linear_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import LatentCache
from .config import ModelConfig
from .layers import MLP, Linear, RMSNorm, make_linear
from .layout import DocumentLayout, SharedPrompts, document_layout
from .mla import MLA
from .moe import MoE, RouterStats, token_sequences
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """logits [B, T, V]; mtp_logits[k-1] [B, T, V] where position i of depth k predicts token i + k + 1;
    hidden [B, T, D] the final (post-norm) hidden state, the head's input; aux_loss the summed alpha-weighted balance
    losses; expert_counts [L, E] tokens per routed expert of every MoE layer (main model first, then MTP blocks);
    hidden_pre [B, T, D] the last layer's output before the final norm (what ``mtp_hidden='pre_norm'`` feeds);
    mtp_hidden[k-1] [B, T, D] depth k's head input (its ``shared_head.norm`` output), filled when the forward ran with
    ``return_logits=False``: then ``logits`` is None, ``mtp_logits`` empty, and a loss applies the head itself
    (``causal_lm_loss(..., head_weight=)``, the fused chunked cross-entropy)."""

    logits: torch.Tensor | None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    hidden_pre: torch.Tensor | None = None
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg, cfg.intermediate_size)

    def forward(self, h_BTD, rope, mask, valid_BT, cache=None, position_ids=None, absorbed=False, sequences=None):
        attn = self.self_attn(self.input_layernorm(h_BTD), rope, mask, cache, position_ids, absorbed, valid_BT)
        h_BTD = h_BTD + attn
        x = self.post_attention_layernorm(h_BTD)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(x, valid_BT, sequences, mask if isinstance(mask, SharedPrompts) else None)
            return h_BTD + y, stats
        return h_BTD + self.mlp(x), None


class MTPModule(nn.Module):
    """One multi-token-prediction depth: ``block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1, i})]))``.

    The embedding comes first in the concatenation, as in the released checkpoints and vLLM/SGLang. The embedding
    table and output head are the main model's (shared); ``norm`` is the checkpoint's ``shared_head.norm``.
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = make_linear(cfg, 2 * cfg.hidden_size, cfg.hidden_size)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers + depth - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev_BTD, emb_next_BTD, rope, mask, valid_BT, cache=None, position_ids=None, absorbed=False,
                sequences=None):
        x = self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.block(x, rope, mask, valid_BT, cache, position_ids, absorbed, sequences)


def build_attention_mask(
    position_ids_BT: torch.Tensor,
    key_valid_BS: torch.Tensor | None = None,
    segment_ids_BT: torch.Tensor | None = None,
    key_positions_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, T, S] mask (True = attend) for queries at ``position_ids``.

    Without a cache keys are the queries themselves: causal in sequence order, restricted to the same segment
    (packed samples never see each other) and to valid (non-padding) keys. Each query may always attend to
    itself, so padding rows stay finite. With a cache (``key_positions_S`` given) a query at position p sees the
    cached keys at positions <= p.
    """
    if key_positions_S is not None:
        return key_positions_S[None, None, :] <= position_ids_BT[:, :, None]
    B, T = position_ids_BT.shape
    idx = torch.arange(T, device=position_ids_BT.device)
    mask = (idx[None, :] <= idx[:, None])[None].expand(B, T, T)
    if key_valid_BS is not None:
        mask = mask & key_valid_BS[:, None, :].bool()
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None]


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM with MTP. Parameter names mirror the HF checkpoint without the ``model.`` prefix;
    routed experts are stacked per layer (see ``model/checkpoint.py`` for the key mapping)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, k + 1) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.activation_checkpointing = False
        # end-of-sequence ids a checkpoint's generation_config.json adds to config.json's (a chat model's end-of-turn
        # token); set by load_checkpoint, read by the rollout engine
        self.generation_eos_token_ids: frozenset[int] = frozenset()
        self.document_attention = True  # padded / packed batches attend per document (layout.DocumentLayout)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for the routing bias."""
        std = self.cfg.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".enorm." in name or ".hnorm." in name or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for gate in self.gates():
            gate.e_score_correction_bias.zero_()
        self.rotary.reset_parameters()

    def gates(self) -> list:
        """Every MoE gate, main layers first then MTP blocks (the row order of ``expert_counts``)."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        compute_mtp: bool | None = None,
        absorbed: bool | None = None,
        num_logits_to_keep: int = 0,
        return_logits: bool = True,
        shared_prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ModelOutput:
        """Full forward (training, prefill) or cached step (decode).

        Args:
            input_ids: [B, T].
            attention_mask: [B, T] 1 for real tokens, 0 for padding (padding keys are never attended).
            position_ids: [B, T]; default 0..T-1 (or continuing each sequence's cached length).
            segment_ids: [B, T] packed-sample ids; tokens attend only within their segment.
            cache: a ``LatentCache``; new latents are written at ``position_ids`` and each sequence's length grows by
                its number of real tokens. An empty cache is prefilled with the naive path; otherwise the absorbed
                path runs (force either with ``absorbed``).
            compute_mtp: run the MTP modules (default: in training mode and without a cache).
            num_logits_to_keep: if > 0, only the last that many positions get logits.
            return_logits: False skips the output head: ``logits`` is None and the head inputs come back in
                ``hidden`` / ``mtp_hidden`` (for losses that fuse the head with the cross-entropy, which never
                materialize the [B, T, V] logits).
            shared_prompts: (group [B], prompt length [B]): rows of one group begin with the same prompt, which the
                decoder layers then compute once (``model/layout.py``; nothing changes when every row is its own
                group); the outputs are the plain forward's. For a full forward of right-padded rows (no cache,
                ``segment_ids`` or ``position_ids``).
        """
        B, T = input_ids.shape
        valid_BT = None if attention_mask is None else attention_mask.bool()
        shared = None
        if shared_prompts is not None:
            if cache is not None or segment_ids is not None or position_ids is not None:
                raise ValueError("shared_prompts is for a full forward of right-padded rows; it cannot be combined "
                                 "with a cache, segment_ids or position_ids")  # fmt: skip
            shared = SharedPrompts.build(input_ids, valid_BT, *shared_prompts)
        if position_ids is None:
            if cache is not None and valid_BT is not None:
                # real tokens take consecutive positions after what the row has cached, wherever padding sits: with
                # left padding, arange positions would write a row's tokens past its cached length (the next step
                # then overwrites them and attends to slots never written)
                position_ids = cache.lengths[:, None] + (valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)
            else:
                start = cache.lengths[:, None] if cache is not None else 0
                position_ids = start + torch.arange(T, device=input_ids.device)[None].expand(B, T)
        if cache is not None:
            if absorbed is None:
                absorbed = bool(cache.lengths.any())
            if absorbed:
                live_pos = position_ids if valid_BT is None else position_ids[valid_BT]
                upto = min(int(live_pos.max()) + 1 if live_pos.numel() else 1, cache.max_len)
                key_pos = torch.arange(upto, device=input_ids.device)
                mask = build_attention_mask(position_ids, key_positions_S=key_pos)
            elif cache.lengths.any():
                raise ValueError("the naive attention path cannot extend a non-empty cache; use absorbed=True")
            else:
                mask = build_attention_mask(position_ids, valid_BT, segment_ids)
        elif absorbed:
            raise ValueError("the absorbed attention path needs a LatentCache")
        elif shared is not None:
            mask = shared
        else:
            mask = self._attention_plan(position_ids, valid_BT, segment_ids)
        rope = self.rotary(position_ids if shared is None else shared.position_M[None])
        # packed rows: the balance loss is per sample (the MoE layers default to one sequence per row)
        sequences = None
        if segment_ids is not None and cache is None and torch.is_grad_enabled() and self.cfg.seq_aux \
                and self.cfg.aux_loss_alpha > 0:
            sequences = token_sequences(valid_BT, segment_ids, B, T, input_ids.device)

        h = self.embed_tokens(input_ids if shared is None else input_ids.reshape(-1)[shared.stream_M][None])
        stats: list[RouterStats] = []
        if cache is not None:
            cache.plan_writes(position_ids, valid_BT)  # every layer writes the same slots: find them once
        layer_valid = valid_BT if shared is None else None  # a stream holds real tokens only
        try:
            for layer in self.layers:
                h, s = self._run_layer(layer, h, rope, mask, layer_valid, cache, position_ids, absorbed, sequences)
                if s is not None:
                    stats.append(s)
        finally:
            if cache is not None:
                cache.plan_writes(None)
        if compute_mtp is None:
            compute_mtp = self.training and cache is None
        if shared is not None:  # back to the batch's rows; the MTP modules run on those
            h = shared.to_batch(h[0])
            if compute_mtp and len(self.mtp):
                rope, mask = self.rotary(position_ids), self._attention_plan(position_ids, valid_BT, None)
        hidden_pre = h
        hidden = self.norm(h)
        keep = slice(-num_logits_to_keep, None) if num_logits_to_keep > 0 else slice(None)
        logits = self.lm_head(hidden[:, keep]) if return_logits else None

        mtp_logits: list[torch.Tensor] = []
        mtp_hidden: list[torch.Tensor] = []
        if compute_mtp and len(self.mtp):
            if cache is not None:
                raise ValueError("compute_mtp with a cache: draft through dsalign's generation engine instead")
            h_prev = hidden if self.cfg.mtp_hidden == "post_norm" else hidden_pre
            for k, module in enumerate(self.mtp, start=1):
                next_ids = F.pad(input_ids[:, k:], (0, k), value=0)
                h_prev, s = module(h_prev, self.embed_tokens(next_ids), rope, mask, valid_BT, sequences=sequences)
                if s is not None:
                    stats.append(s)
                if return_logits:
                    mtp_logits.append(self.lm_head(module.norm(h_prev)[:, keep]))
                else:
                    mtp_hidden.append(module.norm(h_prev)[:, keep])

        if cache is not None:
            cache.lengths += valid_BT.sum(dim=1) if valid_BT is not None else T
        aux = torch.stack([s.aux_loss for s in stats]).sum() if stats else hidden.new_zeros((), dtype=torch.float32)
        counts = torch.stack([s.counts_E for s in stats]) if stats else None
        return ModelOutput(logits, mtp_logits, hidden, aux, counts, hidden_pre, mtp_hidden)

    def _attention_plan(self, position_ids, valid_BT, segment_ids) -> DocumentLayout | torch.Tensor | None:
        """How a batch without a cache attends: plain causal (None) without padding or packing; per document (a
        ``DocumentLayout``) for padded / packed batches; plain causal again when rows are only right-padded and
        gathering would not at least halve the scores (real tokens see the same keys either way, and there is no
        gather to pay); the mask when neither saves work."""
        if valid_BT is None and segment_ids is None:
            return None  # SDPA's is_causal fast path
        layout = document_layout(valid_BT, segment_ids) if self.document_attention else None
        if layout is not None and layout.prefix_rows and layout.scores * 2 > valid_BT.numel() * valid_BT.shape[1]:
            return None
        return layout if layout is not None else build_attention_mask(position_ids, valid_BT, segment_ids)

    def _run_layer(self, layer, h, rope, mask, valid_BT, cache, position_ids, absorbed, sequences):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, h, rope, mask, valid_BT, sequences=sequences, use_reentrant=False)
        return layer(h, rope, mask, valid_BT, cache, position_ids, absorbed, sequences)


def next_token_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> int:
    """How many next-token targets ``causal_lm_loss``'s main CE averages over (``_shifted_targets`` at shift 1).
    What the trainer weighs micro-batches by."""
    return int((_shifted_targets(labels, 1, segment_ids) != -100).sum())


def _shifted_targets(labels: torch.Tensor, shift: int, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """``labels[:, shift:]``, with -100 where the target lies in another packed segment than its position."""
    T = labels.shape[1]
    target = labels[:, shift:].clone()
    if segment_ids is not None:
        target[segment_ids[:, shift:] != segment_ids[:, : T - shift]] = -100
    return target


def _shifted_ce(out_BTX: torch.Tensor, labels: torch.Tensor, shift: int, segment_ids: torch.Tensor | None,
                head_weight: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """CE of position i predicting ``labels[i + shift]``; ``out_BTX`` is logits [B, T, V], or head inputs [B, T, D]
    when ``head_weight`` is given (fused chunked head + CE)."""
    T = labels.shape[1]
    if shift >= T:
        return out_BTX.sum() * 0.0 + (0.0 if head_weight is None else head_weight.sum() * 0.0)
    target = _shifted_targets(labels, shift, segment_ids)
    x = out_BTX[:, : T - shift].reshape(-1, out_BTX.shape[-1])
    if head_weight is not None:
        return fused_linear_cross_entropy(x, head_weight, target.reshape(-1))
    if (target != -100).sum() == 0:
        return x.sum() * 0.0
    return F.cross_entropy(x.float(), target.reshape(-1), ignore_index=-100)


def _check_fused(out: ModelOutput, head_weight: torch.Tensor | None, who: str) -> None:
    if out.logits is None and head_weight is None:
        raise ValueError(f"{who}: the model output has no logits (return_logits=False); pass head_weight="
                         "model.lm_head.weight to compute the fused loss")  # fmt: skip


def mtp_loss(
    out: ModelOutput,
    labels: torch.Tensor,
    mtp_lambda: float,
    segment_ids: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The MTP part of ``causal_lm_loss`` alone: ``lambda / D * sum_k CE_k`` (0 without MTP outputs) and metrics
    ``mtp_ce_<k>``. Same arguments as ``causal_lm_loss``."""
    _check_fused(out, head_weight, "mtp_loss")
    outs = out.mtp_logits if out.logits is not None else out.mtp_hidden
    weight = None if out.logits is not None else head_weight
    if mtp_lambda <= 0 or not outs:
        return labels.new_zeros((), dtype=torch.float32), {}
    terms = [_shifted_ce(x, labels, k + 1, segment_ids, weight) for k, x in enumerate(outs, start=1)]
    metrics = {f"mtp_ce_{k}": term.item() for k, term in enumerate(terms, start=1)}
    metrics.update(mtp_acceptance(out, labels, segment_ids, head_weight))
    return mtp_lambda / len(outs) * torch.stack(terms).sum(), metrics


ACCEPTANCE_POSITIONS = 512


@torch.no_grad()
def mtp_acceptance(
    out: ModelOutput,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    max_positions: int = ACCEPTANCE_POSITIONS,
) -> dict[str, float]:
    """Teacher-forced greedy acceptance of each MTP depth: the share of positions whose draft (depth ``k`` at
    position ``i``, predicting token ``i + k + 1``) is the main model's own greedy choice for that token (the main
    head at position ``i + k``). That is the rate at which greedy speculative decoding accepts the depth-``k`` draft
    on this text, given the earlier tokens (``docs/SPEC.md``: DeepSeek-V3 reports 85-90% at depth 1). Counted over
    positions whose depth-``k`` target is a trained token (``labels`` != -100, same packed segment), at most
    ``max_positions`` of them, evenly spaced (no random draw: the training RNG is left alone), so the head GEMMs
    stay small next to the step's. ``{"mtp_acceptance": depth 1, "mtp_acceptance_<k>": depth k >= 2}``, NaN for a
    depth with no position to count (the keys depend only on the model, so that data-parallel ranks, which average
    their metrics key by key and skip NaNs, always pass the same ones); empty without MTP outputs. Same ``out`` /
    ``head_weight`` conventions as ``causal_lm_loss``."""
    fused = out.logits is None
    main, drafts = (out.hidden, out.mtp_hidden) if fused else (out.logits, out.mtp_logits)
    if fused and (head_weight is None or main is None):
        return {}
    T = labels.shape[1]
    metrics: dict[str, float] = {}
    for k, draft_BTX in enumerate(drafts, start=1):
        key = "mtp_acceptance" if k == 1 else f"mtp_acceptance_{k}"
        metrics[key] = math.nan
        if k + 1 >= T:
            continue
        b, i = (_shifted_targets(labels, k + 1, segment_ids) != -100).nonzero(as_tuple=True)
        if b.numel() == 0:
            continue
        if b.numel() > max_positions:
            pick = torch.linspace(0, b.numel() - 1, max_positions, device=b.device).round().long()
            b, i = b[pick], i[pick]
        draft, verify = draft_BTX[b, i], main[b, i + k]
        if fused:
            draft, verify = F.linear(draft, head_weight), F.linear(verify, head_weight)
        metrics[key] = (draft.argmax(-1) == verify.argmax(-1)).float().mean().item()
    return metrics


def causal_lm_loss(
    out: ModelOutput,
    labels: torch.Tensor,
    mtp_lambda: float = 0.0,
    segment_ids: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE_main + lambda / D * sum_k CE_k`` (docs/SPEC.md section 4), mean over target tokens.

    ``labels`` [B, T] is aligned with ``input_ids`` (-100 = ignore) and shifted here: the main head at position i
    predicts ``labels[i + 1]``, MTP depth k predicts ``labels[i + k + 1]``. With ``segment_ids``, targets in another
    packed sample than the predicting position are ignored.

    ``out`` from a ``return_logits=False`` forward has no logits: pass the output head's weight (``model.lm_head
    .weight``) and every term is ``kernels.fused_ce.fused_linear_cross_entropy`` on the head inputs (``out.hidden``,
    ``out.mtp_hidden``), which never materializes the [B, T, V] logits; same loss and gradients up to fp32 rounding.
    """
    _check_fused(out, head_weight, "causal_lm_loss")
    if out.logits is not None:
        main = _shifted_ce(out.logits, labels, 1, segment_ids, None)
    else:
        main = _shifted_ce(out.hidden, labels, 1, segment_ids, head_weight)
    mtp, metrics = mtp_loss(out, labels, mtp_lambda, segment_ids, head_weight)
    return (main + mtp if metrics else main), {"ce": main.item(), **metrics}
