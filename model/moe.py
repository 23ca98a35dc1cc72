"""DeepSeekMoE: sigmoid gate with group-limited top-k and auxiliary-loss-free balancing (docs/SPEC.md section 3).

Shape legend: B batch, T tokens, N = B*T flattened tokens, D hidden, E routed experts, K experts per token,
I moe_intermediate_size, G groups.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from dsalign.kernels.grouped_gemm import ExpertWeightCache
from dsalign.kernels.moe import moe_experts_forward
from torch import nn

from .config import ModelConfig
from .layers import MLP
from .layout import SharedPrompts


@dataclass
class RouterStats:
    """What one MoE layer's forward reports for balancing.

    counts_E: tokens routed to each expert (valid tokens only), from the biased top-k choice.
    aux_loss: alpha-weighted complementary sequence-wise balance loss (0-dim; zero when alpha is 0).
    """

    counts_E: torch.Tensor
    aux_loss: torch.Tensor


def limit_to_groups(scores_NE: torch.Tensor, n_groups: int, keep: int, per_group_topk: int) -> torch.Tensor:
    """Mask (to -inf) every expert outside the ``keep`` best groups; a group scores the sum of its top
    ``per_group_topk`` entries. Used for group-limited routing and for node-limited routing alike."""
    n, e = scores_NE.shape
    grouped = scores_NE.view(n, n_groups, e // n_groups)
    group_scores_NG = grouped.topk(per_group_topk, dim=-1).values.sum(dim=-1)
    kept_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool)
    kept_NG.scatter_(1, group_scores_NG.topk(keep, dim=-1).indices, True)
    return grouped.masked_fill(~kept_NG[..., None], float("-inf")).view(n, e)


def _autocast_off(device_type: str):
    """A context that turns autocast off where it is on (a no-op elsewhere, e.g. on meta tensors)."""
    if device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Gate(nn.Module):
    """Sigmoid router. ``e_score_correction_bias`` (fp32 buffer) only chooses experts; weights use unbiased scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` casts buffers too; the bias stays fp32 (as transformers keeps it): in bf16,
        updates of gamma = 0.001 to a bias near 1 round away entirely."""
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.is_floating_point() and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (topk_idx [N, K], topk_weight [N, K] fp32, scores [N, E] fp32 unbiased sigmoid)."""
        cfg = self.cfg
        with _autocast_off(x_ND.device.type):  # autocast would run this matmul in bf16 despite the .float() casts
            scores_NE = torch.sigmoid(x_ND.float() @ self.weight.float().t())
        choice_NE = scores_NE + self.e_score_correction_bias.float()
        if cfg.route_num_nodes is not None:
            per_node = cfg.num_experts_per_tok // cfg.route_max_nodes
            choice_NE = limit_to_groups(choice_NE, cfg.route_num_nodes, cfg.route_max_nodes, per_node)
        if cfg.topk_group < cfg.n_group:
            choice_NE = limit_to_groups(choice_NE, cfg.n_group, cfg.topk_group, 2)
        topk_idx_NK = choice_NE.topk(cfg.num_experts_per_tok, dim=-1).indices
        weight_NK = scores_NE.gather(1, topk_idx_NK)
        if cfg.norm_topk_prob:
            weight_NK = weight_NK / (weight_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx_NK, weight_NK * cfg.routed_scaling_factor, scores_NE


class GroupedExperts(nn.Module):
    """Routed experts stored stacked: ``gate_up_proj`` [E, 2I, D] (gate rows first), ``down_proj`` [E, D, I]."""

    def __init__(self, cfg: ModelConfig, num_experts: int | None = None):
        super().__init__()
        e = cfg.n_routed_experts if num_experts is None else num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * cfg.moe_intermediate_size, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(e, cfg.hidden_size, cfg.moe_intermediate_size))
        self.fp8 = cfg.fp8
        # FP8 copies of the stacked weights, refreshed only when the weights change (generation reuses them).
        self.fp8_caches = (ExpertWeightCache(), ExpertWeightCache()) if cfg.fp8 else None
        # Expert parallelism: set by the trainer (``alignment.trainer.distributed.shard_experts``), which also slices
        # the parameters to this rank's experts; tokens then travel to their experts by all-to-all (kernels.ep).
        self.ep_group = None

    def forward(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_weight_NK: torch.Tensor) -> torch.Tensor:
        if self.ep_group is not None:
            from dsalign.kernels.ep import ep_moe_forward

            return ep_moe_forward(x_ND, topk_idx_NK, topk_weight_NK, self.gate_up_proj, self.down_proj,
                                  self.ep_group, fp8=self.fp8, caches=self.fp8_caches)  # fmt: skip
        return moe_experts_forward(
            x_ND, topk_idx_NK, topk_weight_NK, self.gate_up_proj, self.down_proj, fp8=self.fp8, caches=self.fp8_caches
        )


def token_sequences(valid_BT: torch.Tensor | None, segment_ids_BT: torch.Tensor | None, B: int, T: int,
                    device: torch.device) -> tuple[torch.Tensor, int]:
    """Which sequence each of the ``B * T`` tokens belongs to, for the sequence-wise balance loss: returns
    (``seq_N`` in ``[0, S)``, ``S``) with padding tokens at ``S`` (the slot that is dropped). Without ``segment_ids``
    a row is a sequence; with them (packed rows) each (row, segment id) is its own sequence, as attention treats it."""
    if segment_ids_BT is None:
        seq_BT = torch.arange(B, device=device)[:, None].expand(B, T)
        S = B
    else:
        seg = segment_ids_BT.long()
        seg = seg - seg.min()
        key_BT = torch.arange(B, device=device)[:, None] * (int(seg.max()) + 1) + seg
        if valid_BT is not None:
            key_BT = key_BT.masked_fill(~valid_BT, -1)  # padding keys sort first; dropped below
        keys, seq_BT = torch.unique(key_BT, return_inverse=True)
        has_pad = bool(keys[0] < 0)
        seq_BT, S = seq_BT - int(has_pad), keys.numel() - int(has_pad)
    if valid_BT is not None:
        seq_BT = seq_BT.masked_fill(~valid_BT, S)
    return seq_BT.reshape(-1), S


def sequence_balance_loss(
    scores_NE: torch.Tensor, topk_idx_NK: torch.Tensor, seq_N: torch.Tensor, num_seqs: int, alpha: float
) -> torch.Tensor:
    """Complementary sequence-wise balance loss ``alpha * sum_i f_i P_i``, averaged over sequences.

    Per sequence (``token_sequences``: a row, or one sample of a packed row): ``f_i = E / (K T) * #tokens routed to
    i`` and ``P_i = mean_t s_ti / sum_j s_tj`` over its ``T`` real tokens (DeepSeek-V3 report, eq. 17-20). Tokens at
    ``seq_N == num_seqs`` (padding) take no part; sequences without a real token are not counted in the mean.
    """
    N, E = scores_NE.shape
    K = topk_idx_NK.shape[-1]
    S = num_seqs
    with torch.no_grad():
        n_S = torch.bincount(seq_N, minlength=S + 1)[:S].to(scores_NE.dtype)
        slot_NK = seq_N[:, None] * E + topk_idx_NK
        hits_SE = torch.bincount(slot_NK.reshape(-1), minlength=(S + 1) * E)[: S * E].view(S, E).to(scores_NE.dtype)
        f_SE = hits_SE * E / (K * n_S.clamp(min=1)[:, None])
    probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    p_SE = probs_NE.new_zeros(S + 1, E).index_add(0, seq_N, probs_NE)[:S] / n_S.clamp(min=1)[:, None]
    return alpha * (f_SE * p_SE).sum() / (n_S > 0).sum().clamp(min=1)


class MoE(nn.Module):
    """``y = sum_k w_k Expert_k(x) + SharedExperts(x)``; no token dropping."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = (
            MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        valid_BT: torch.Tensor | None = None,
        sequences: tuple[torch.Tensor, int] | None = None,
        shared: SharedPrompts | None = None,
    ) -> tuple[torch.Tensor, RouterStats]:
        """``valid_BT`` marks real tokens (padding is not counted); ``sequences`` is ``token_sequences(...)`` for
        the balance loss (default: one sequence per row; packed batches pass their samples). ``x_BTD`` may be a
        ``SharedPrompts`` stream ([1, M, D]); then ``shared`` is its layout and the routing statistics are taken
        over the batch's positions, as the plain forward of the batch would count them."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        topk_idx_NK, weight_NK, scores_NE = self.gate(x_ND)
        y_ND = self.experts(x_ND, topk_idx_NK, weight_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        y_BTD = y_ND.view(B, T, D)
        if shared is not None:  # a prompt token counts once per row holding it (gathers' backward sums its grads)
            topk_idx_NK = topk_idx_NK.index_select(0, shared.gather_BT)
            valid_BT = shared.valid_BT
            B, T = valid_BT.shape
        E = self.cfg.n_routed_experts
        with torch.no_grad():  # index_add, not bincount + boolean indexing: no host sync on CUDA
            hits = torch.ones_like(topk_idx_NK, dtype=torch.float32)
            if valid_BT is not None:
                hits = hits * valid_BT.reshape(-1, 1)
            counts_E = torch.zeros(E, device=x_BTD.device).index_add_(0, topk_idx_NK.reshape(-1), hits.reshape(-1))
        alpha = self.cfg.aux_loss_alpha if self.cfg.seq_aux else 0.0
        if alpha > 0 and torch.is_grad_enabled():
            if shared is not None:
                scores_NE = scores_NE.index_select(0, shared.gather_BT)
            if sequences is None:
                sequences = token_sequences(valid_BT, None, B, T, x_BTD.device)
            aux = sequence_balance_loss(scores_NE, topk_idx_NK, *sequences, alpha)
        else:
            aux = x_BTD.new_zeros((), dtype=torch.float32)
        return y_BTD, RouterStats(counts_E, aux)


def bias_update_delta(counts_LE: torch.Tensor, gamma: float, center: bool = False) -> torch.Tensor:
    """Auxiliary-loss-free sign rule: ``+gamma`` for underloaded experts, ``-gamma`` for overloaded ones.

    ``counts_LE`` are the (globally all-reduced) tokens per expert of each MoE layer over the step. With
    ``center=True`` the update is made zero-mean per layer (torchtitan's variant).
    """
    delta_LE = gamma * torch.sign(counts_LE.mean(dim=-1, keepdim=True) - counts_LE)
    if center:
        delta_LE = delta_LE - delta_LE.mean(dim=-1, keepdim=True)
    return delta_LE


@torch.no_grad()
def apply_bias_update(gates: list[Gate], counts_LE: torch.Tensor, gamma: float, center: bool = False) -> None:
    """Add ``bias_update_delta`` to every gate's ``e_score_correction_bias`` (one row of counts per gate)."""
    if len(gates) != counts_LE.shape[0]:
        raise ValueError(f"apply_bias_update: {len(gates)} gates but counts for {counts_LE.shape[0]} layers")
    delta_LE = bias_update_delta(counts_LE.float(), gamma, center)
    for gate, delta_E in zip(gates, delta_LE):
        gate.e_score_correction_bias.add_(delta_E.to(gate.e_score_correction_bias.device))


def load_imbalance(counts_LE: torch.Tensor) -> torch.Tensor:
    """max/mean expert load per layer (1.0 is perfect balance)."""
    return counts_LE.max(dim=-1).values / counts_LE.mean(dim=-1).clamp(min=1e-9)
