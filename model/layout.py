"""How a batch's tokens are laid out for attention: per document, and with shared prompts computed once.

Shape legend: B rows, T padded length, M tokens laid out, N documents of a bucket, L its longest document.

``DocumentLayout`` (``document_layout``): a padded or packed batch without a cache attends per document, each
document gathered into a row of its own and documents of similar length batched together, so attention is plain
causal and never computes what the padding / segment mask hides (``MLA._attend_documents``).

``SharedPrompts``: a right-padded batch whose rows repeat a prompt (GRPO's G samples per prompt) as one stream of
tokens holding each prompt once, so every token-wise part of a layer (projections, norms, experts) runs once per
distinct token; attention per document over the stream (see the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# What one more bucket of documents costs, in score entries (per head): the fixed cost of its gather, attention
# and scatter, about one more 128-token document. Measured fwd + bwd on 2 CPU threads, 6 heads: an attention call
# costs ~0.3 ms + ~0.04 ms per 1,000 entries, and the demo's SFT batch runs 7.0 ms as [19, 64] + [13, 88] against
# 11.0 ms as one [32, 88] (its GRPO batch: 25.3 ms as [5, 64] + [59, 93], 26.2 ms as one [64, 93]).
BUCKET_OVERHEAD = 128 * 128


@dataclass(frozen=True)
class DocumentBucket:
    """Documents of similar length as one ``[N, L]`` batch: ``index_NL`` is the flat index into the ``B * T``
    tokens of each document's l-th token (0 in empty slots), ``tokens_M`` the flat indices of the tokens whose
    outputs the bucket produces (every real token of its documents, unless a ``SharedPrompts`` stream computes a
    token in another document) and ``slots_M`` their flat index into ``N * L``."""

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


class BucketPlan(NamedTuple):
    """Each document's bucket, documents per bucket, longest document per bucket."""

    bucket_of: list[int]
    sizes: list[int]
    longest: list[int]

    @property
    def scores(self) -> int:
        """Score entries (per head) of attention over the buckets: ``sum(N * L^2)``."""
        return sum(n * L * L for n, L in zip(self.sizes, self.longest))


def _plan_buckets(counts: list[int]) -> BucketPlan:
    """Buckets for documents of ``counts`` tokens. Documents are classed by ``ceil(log2(length))`` and adjacent
    classes merged where one call costs less than two (``_bucket_classes``)."""
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
    return BucketPlan([group_of_class[c] for c in class_N], sizes, longest)


def _gather_buckets(tokens_M: torch.Tensor, counts_N: torch.Tensor, plan: BucketPlan,
                    emit_M: torch.Tensor | None = None) -> tuple[tuple[DocumentBucket, ...], torch.Tensor]:  # fmt: skip
    """The buckets of documents laid out one after another in ``tokens_M`` (``counts_N`` tokens each; flat token
    indices), and every bucket's output tokens concatenated. ``emit_M`` (default: all) says which document
    tokens produce an output."""
    device = tokens_M.device
    bucket_of, sizes, longest = plan
    N = counts_N.numel()
    doc_M = torch.repeat_interleave(torch.arange(N, device=device), counts_N)
    starts_N = torch.cumsum(counts_N, 0) - counts_N
    pos_M = torch.arange(tokens_M.numel(), device=device) - starts_N[doc_M]
    group_N = torch.tensor(bucket_of, device=device)
    local_N = torch.empty(N, dtype=torch.long, device=device)  # a document's row within its bucket
    buckets = []
    for grp, (n, L) in enumerate(zip(sizes, longest)):
        local_N[group_N == grp] = torch.arange(n, device=device)
        sel_M = group_N[doc_M] == grp
        tokens = tokens_M[sel_M]
        slots = local_N[doc_M[sel_M]] * L + pos_M[sel_M]
        index = torch.zeros(n * L, dtype=torch.long, device=device)
        index[slots] = tokens
        if emit_M is not None:
            out = emit_M[sel_M]
            tokens, slots = tokens[out], slots[out]
        buckets.append(DocumentBucket(index.view(n, L), tokens, slots))
    tokens_all = buckets[0].tokens_M if len(buckets) == 1 else torch.cat([b.tokens_M for b in buckets])
    return tuple(buckets), tokens_all


def document_layout(valid_BT: torch.Tensor | None, segment_ids_BT: torch.Tensor | None) -> DocumentLayout | None:
    """The ``DocumentLayout`` of a batch, or None when it would not save work over the mask (buckets' cost above
    ``B * T^2``) or there is nothing to lay out (no real token)."""
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
    plan = _plan_buckets(counts_N.tolist())
    if plan.scores > B * T * T:
        return None
    prefix_rows = segment_ids_BT is None and (valid_BT is None or bool((valid_BT[:, 1:] <= valid_BT[:, :-1]).all()))
    buckets, tokens_all = _gather_buckets(tokens_M, counts_N, plan)
    return DocumentLayout(buckets, tokens_all, plan.scores, prefix_rows)


@dataclass(frozen=True)
class SharedPrompts:
    """A right-padded batch whose rows with equal ``group`` begin with the same prompt, laid out with each prompt
    once.

    Everything in a decoder layer except attention works token by token, and under causal attention a prompt token
    never sees what follows it, so the G rows holding a prompt compute the same values for it in every layer. The
    stream holds M tokens: each group's prompt once (read from its first row), then every row's own tokens after
    its prompt. Attention runs per document over the stream (``attention``, a ``DocumentLayout`` whose flat indices
    are stream indices): a row's document is its prompt (from the stream's shared copy) followed by its own tokens,
    plain causal, bucketed by length like the batch's own documents; the first row of a group produces its prompt
    tokens' outputs, every row its own tokens'. Attention therefore costs what the plain forward's per-document
    attention costs (a prompt's queries run once per row; no mask), and the token-wise work drops from the
    batch's real tokens to M.

    The model gathers the stream back to the batch's ``[B, T]`` layout at the end (``to_batch``) and each MoE layer
    takes its routing statistics over the batch's positions (``gather_BT``), so outputs, losses, the balance loss
    and the expert counts are the plain forward's and every shared prompt token's gradient sums its rows' (the
    gathers' backward is an index_add). In fp32 the two agree to summation order; under bf16 autocast and FP8 they
    round at different points (FP8's backward quantizes the summed gradient of a prompt token, not each row's); with
    dropout (LoRA's) a prompt token draws one mask for all its rows. The shared-prefix forward of Prefix Grouper
    (Liu et al., 2025, arXiv 2506.05433) for the token-wise work; they also split attention so a prefix's queries
    run once, which here would pad every row to the batch's longest prompt and completion under a mask (a first
    version did: slower than the plain forward on long-tailed batches), while attention is a small share of a
    layer at DeepSeek-V3's size.

    ``stream_M`` flat index into ``B * T`` of each stream token; ``position_M`` its position; ``gather_BT`` [B * T]
    the stream index of each batch position (0 at padding); ``valid_BT`` the batch's real tokens;
    ``num_prompt_tokens`` the stream's prompt part.
    """

    stream_M: torch.Tensor
    position_M: torch.Tensor
    gather_BT: torch.Tensor
    attention: DocumentLayout
    valid_BT: torch.Tensor
    num_prompt_tokens: int

    @classmethod
    def build(cls, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None, group_B, prompt_len_B,
              ) -> SharedPrompts | None:  # fmt: skip
        """The layout of a right-padded batch whose rows with equal ``group_B`` (integers) begin with the same
        ``prompt_len_B`` tokens, on ``input_ids_BT``'s device. None when it saves nothing (no two rows share a
        group, or the shared prompts are empty). Raises ValueError naming the row when the rows break the promise
        (padding before a real token, a prompt longer than its row, a group's rows with different prompts).

        Built on the CPU from host copies of the ids and masks (index building takes many data-dependent steps,
        each a device sync on CUDA), then moved to the device once."""
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        group_B, prompt_len_B = torch.as_tensor(group_B).cpu(), torch.as_tensor(prompt_len_B).cpu()
        if group_B.shape != (B,) or prompt_len_B.shape != (B,):
            raise ValueError(f"shared prompts: prompt groups and lengths must be [{B}] (one per row), got "
                             f"{tuple(group_B.shape)} and {tuple(prompt_len_B.shape)}")  # fmt: skip
        if group_B.is_floating_point() or prompt_len_B.is_floating_point():
            raise ValueError(f"shared prompts: prompt groups and lengths must be integers, got {group_B.dtype} and "
                             f"{prompt_len_B.dtype}")  # fmt: skip
        group_B, prompt_len_B = group_B.long(), prompt_len_B.long()
        groups, inverse_B = torch.unique(group_B, return_inverse=True)
        if groups.numel() == B:
            return None
        ids_BT = input_ids_BT.cpu()
        valid_BT = torch.ones(B, T, dtype=torch.bool) if valid_BT is None else valid_BT.cpu().bool()
        len_B = valid_BT.sum(dim=1)
        t_T = torch.arange(T)
        _first_bad((valid_BT[:, 1:] > valid_BT[:, :-1]).any(dim=1), "has padding before a real token (rows must be "
                   "right-padded)")  # fmt: skip
        _first_bad((prompt_len_B < 0) | (prompt_len_B > len_B), "has a prompt length outside 0..its length")

        # each group's first row holds its prompt; every other row must repeat it
        P = groups.numel()
        first_P = torch.full((P,), B, dtype=torch.long).scatter_reduce(0, inverse_B, torch.arange(B), reduce="amin")
        canon_B = first_P[inverse_B]
        in_prompt_BT = t_T[None] < prompt_len_B[:, None]
        _first_bad(prompt_len_B != prompt_len_B[canon_B], "has a different prompt length than the first row of its "
                   "group")  # fmt: skip
        _first_bad(((ids_BT != ids_BT[canon_B]) & in_prompt_BT).any(dim=1),
                   "has different prompt tokens than the first row of its group")  # fmt: skip

        # the stream: prompts (group by group, each from its first row), then every row's tokens after its prompt
        Lp_P = prompt_len_B[first_P]
        prompt_tok = (first_P[:, None] * T + t_T[None])[t_T[None] < Lp_P[:, None]]
        own_tok = (valid_BT & ~in_prompt_BT).reshape(-1).nonzero().squeeze(1)
        stream_M = torch.cat([prompt_tok, own_tok])
        Mp = prompt_tok.numel()
        if stream_M.numel() == int(len_B.sum()):
            return None  # the shared prompts are empty: the stream would be the batch's own tokens

        # batch position -> stream index
        prompt_start_P = torch.cumsum(Lp_P, 0) - Lp_P
        gather_BT = torch.zeros(B * T, dtype=torch.long)
        gather_BT[own_tok] = Mp + torch.arange(own_tok.numel())
        from_prompt_BT = prompt_start_P[inverse_B][:, None] + t_T[None]
        gather_BT.view(B, T)[in_prompt_BT] = from_prompt_BT[in_prompt_BT]

        # attention: each row is a document read from the stream; a group's first row emits its prompt's outputs
        doc_tokens = gather_BT.view(B, T)[valid_BT]
        emit = (~in_prompt_BT | (canon_B == torch.arange(B))[:, None])[valid_BT]
        counts_N = len_B[len_B > 0]
        plan = _plan_buckets(counts_N.tolist())
        buckets, tokens_all = _gather_buckets(doc_tokens, counts_N, plan, emit)

        def dev(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=True)

        buckets = tuple(DocumentBucket(dev(b.index_NL), dev(b.tokens_M), dev(b.slots_M)) for b in buckets)
        attention = DocumentLayout(buckets, dev(tokens_all), plan.scores, prefix_rows=False)
        return cls(dev(stream_M), dev(stream_M % T), dev(gather_BT), attention, dev(valid_BT), Mp)

    def to_batch(self, x_MX: torch.Tensor) -> torch.Tensor:
        """Stream tokens ``[M, ...]`` -> the batch's positions ``[B, T, ...]`` (padding gets stream token 0's)."""
        B, T = self.valid_BT.shape
        return x_MX.index_select(0, self.gather_BT).view(B, T, *x_MX.shape[1:])


def _first_bad(bad_B: torch.Tensor, what: str) -> None:
    if bool(bad_B.any()):
        row = int(bad_B.nonzero()[0, 0])
        raise ValueError(f"shared prompts: row {row} {what}")
