"""Shared prompts: a batch whose rows repeat a prompt (GRPO's G samples per prompt) computes each prompt once.

Shape legend: B rows, T padded length, M stream tokens, P prompt groups, Lp longest prompt, Lc longest completion.

A GRPO batch holds G right-padded rows ``[prompt | completion_j]`` per prompt. Everything in a decoder layer except
attention works token by token, and under causal attention a prompt token never sees what follows it, so the G
copies of a prompt compute the same values in every layer. ``SharedPrompts`` lays the batch out as one stream of M
tokens: each group's prompt once, then every row's own tokens after its prompt. Attention (``MLA``) then runs in
two parts per layer:

  * prompts: each group's prompt as a row of its own, plain causal;
  * completions: each row's tokens after the prompt as queries, against ``[its group's prompt keys ; its own keys]``
    (all prompt keys, causal within its own part).

The model gathers the stream back to the batch's ``[B, T]`` layout at the end (``gather_BT``), and each MoE layer
takes its routing statistics (expert counts, sequence-wise balance loss) over the batch's positions the same way,
so outputs, losses, balance terms and expert counts equal the plain forward's up to fp32 summation order; the
gathers' backward (an index_add) sums each shared prompt token's gradient over the rows that read it. Cost: the
token-wise work (every projection, expert and norm, forward and backward) shrinks from ``B * T`` to ``M`` tokens;
with 8 samples per prompt and prompts a third of each row, by about 30%. This is the "shared-prefix forward" of
Prefix Grouper (Liu et al., 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrompts:
    """A batch laid out with each group's prompt once (see the module docstring).

    ``stream_M`` flat index into the ``B * T`` batch of each stream token (prompt tokens first, group by group, then
    every row's tokens after its prompt); ``position_M`` their positions; ``gather_BT`` [B * T] the stream index of
    each batch position (0 at padding); ``prompt_PL`` [P, Lp] stream indices of each group's prompt as a row (0 in
    empty slots) and ``prompt_slots`` the flat ``P * Lp`` slots that hold a token, in stream order; ``query_BL``
    [B, Lc] / ``query_slots`` the same for every row's tokens after its prompt; ``key_BS`` [B, Lp + Lc] the stream
    indices of the keys each row's completion attends to and ``mask_BLS`` [B, Lc, Lp + Lc] which of them each of its
    queries sees; ``valid_BT`` the batch's real tokens.
    """

    stream_M: torch.Tensor
    position_M: torch.Tensor
    gather_BT: torch.Tensor
    prompt_PL: torch.Tensor
    prompt_slots: torch.Tensor
    query_BL: torch.Tensor
    query_slots: torch.Tensor
    key_BS: torch.Tensor
    mask_BLS: torch.Tensor
    valid_BT: torch.Tensor

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_slots.numel()

    @classmethod
    def build(cls, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None, group_B: torch.Tensor,
              prompt_len_B: torch.Tensor) -> SharedPrompts | None:  # fmt: skip
        """The layout of a right-padded batch whose rows with equal ``group_B`` begin with the same
        ``prompt_len_B`` tokens; None when no two rows share a group (nothing to share: the plain forward is
        cheaper). Raises ValueError naming the row when the rows do not (or when a row has padding before a real
        token, or a prompt longer than the row)."""
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        if group_B.shape != (B,) or prompt_len_B.shape != (B,):
            raise ValueError(f"shared prompts: prompt groups and lengths must be [{B}] (one per row), got "
                             f"{tuple(group_B.shape)} and {tuple(prompt_len_B.shape)}")  # fmt: skip
        group_B, prompt_len_B = group_B.to(device).long(), prompt_len_B.to(device).long()
        if torch.unique(group_B).numel() == B:
            return None
        if valid_BT is None:
            valid_BT = torch.ones(B, T, dtype=torch.bool, device=device)
        valid_BT = valid_BT.bool()
        len_B = valid_BT.sum(dim=1)
        t_T = torch.arange(T, device=device)
        left_pad_B = (valid_BT[:, 1:] > valid_BT[:, :-1]).any(dim=1)
        _first_bad(left_pad_B, "has padding before a real token (rows must be right-padded)")
        _first_bad((prompt_len_B < 0) | (prompt_len_B > len_B), "has a prompt length outside 0..its length")

        # each group's first row holds its prompt; every other row must repeat it
        groups, inverse_B = torch.unique(group_B, return_inverse=True)
        P = groups.numel()
        first_P = torch.full((P,), B, dtype=torch.long, device=device).scatter_reduce(
            0, inverse_B, torch.arange(B, device=device), reduce="amin"
        )
        canon_B = first_P[inverse_B]
        in_prompt_BT = t_T[None] < prompt_len_B[:, None]
        _first_bad(prompt_len_B != prompt_len_B[canon_B], "has a different prompt length than the first row of its "
                   "group")  # fmt: skip
        _first_bad(((input_ids_BT != input_ids_BT[canon_B]) & in_prompt_BT).any(dim=1),
                   "has different prompt tokens than the first row of its group")  # fmt: skip

        # the stream: prompts (group by group, each from its first row), then every row's tokens after its prompt
        Lp_P = prompt_len_B[first_P]
        prompt_tok = (first_P[:, None] * T + t_T[None])[t_T[None] < Lp_P[:, None]]
        own_BT = valid_BT & ~in_prompt_BT
        own_tok = own_BT.reshape(-1).nonzero().squeeze(1)
        stream_M = torch.cat([prompt_tok, own_tok])
        if stream_M.numel() == 0:
            raise ValueError("shared prompts: the batch has no real token")
        Mp = prompt_tok.numel()

        # batch position -> stream index
        prompt_start_P = torch.cumsum(Lp_P, 0) - Lp_P
        gather_BT = torch.zeros(B * T, dtype=torch.long, device=device)
        gather_BT[own_tok] = Mp + torch.arange(own_tok.numel(), device=device)
        from_prompt_BT = prompt_start_P[inverse_B][:, None] + t_T[None]
        gather_BT.view(B, T)[in_prompt_BT] = from_prompt_BT[in_prompt_BT]

        # attention rows
        Lp = int(Lp_P.max()) if P else 0
        t_Lp = t_T[:Lp]
        prompt_real_PL = t_Lp[None] < Lp_P[:, None]
        prompt_PL = (prompt_start_P[:, None] + t_Lp[None]) * prompt_real_PL
        Lc_B = len_B - prompt_len_B
        Lc = int(Lc_B.max()) if B else 0
        t_Lc = torch.arange(Lc, device=device)
        own_real_BL = t_Lc[None] < Lc_B[:, None]
        own_start_B = torch.cumsum(Lc_B, 0) - Lc_B
        query_BL = (Mp + own_start_B[:, None] + t_Lc[None]) * own_real_BL
        key_BS = torch.cat([prompt_PL[inverse_B], query_BL], dim=1)
        sees_prompt_BLp = (t_Lp[None] < prompt_len_B[:, None])[:, None, :].expand(B, Lc, Lp)
        causal_LL = (t_Lc[None, :] <= t_Lc[:, None])[None].expand(B, Lc, Lc)
        mask_BLS = torch.cat([sees_prompt_BLp, causal_LL], dim=2)
        return cls(stream_M, stream_M % T, gather_BT, prompt_PL, prompt_real_PL.reshape(-1).nonzero().squeeze(1),
                   query_BL, own_real_BL.reshape(-1).nonzero().squeeze(1), key_BS, mask_BLS, valid_BT)  # fmt: skip

    def to_batch(self, x_MX: torch.Tensor) -> torch.Tensor:
        """Stream tokens ``[M, ...]`` -> the batch's positions ``[B, T, ...]`` (padding gets stream token 0's)."""
        B, T = self.valid_BT.shape
        return x_MX.index_select(0, self.gather_BT).view(B, T, *x_MX.shape[1:])


def _first_bad(bad_B: torch.Tensor, what: str) -> None:
    if bool(bad_B.any()):
        row = int(bad_B.nonzero()[0, 0])
        raise ValueError(f"shared prompts: row {row} {what}")
