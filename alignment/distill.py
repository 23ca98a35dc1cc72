"""R1-style distillation: filter teacher traces into an SFT dataset, and an optional top-k logit distillation loss.

Trace distillation (DeepSeek-R1 sec. 2.3.3 and 4): a teacher samples k reasoning traces per prompt
(``<think> ... </think> answer``); each is scored with the reward functions (``score_traces``) and kept if it is
correct (reward >= ``min_reward``), within the token budget, and well formed (one closed think block followed by
a non-empty answer). Per prompt, keep the best passing trace or all of them; prompts can also be filtered by their
pass rate (drop ones the teacher never or always solves). Every kept row carries its provenance: ``teacher``,
``prompt_id``, ``trace_index`` and ``reward``.

Logit distillation (when teacher and student share a vocabulary): with the teacher's top-k log-probs per position,
``forward`` KL(p_T || p_S) uses the student's full-vocabulary log-probs at the teacher's ids (the student is also
pushed to move mass into the support); ``reverse`` KL(p_S || p_T) is computed on the top-k support with both
distributions renormalised there (mode seeking, as in on-policy distillation; Gu et al. 2024, "MiniLLM").

Shape legend: B sequences, T positions (aligned: student logits at t and teacher top-k at t score the same
next token), V vocabulary, K teacher top-k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .chat import THINK_CLOSE, THINK_OPEN
from .policy_loss import aggregate_loss

RewardFn = Callable[..., list]


@dataclass
class TraceFilterConfig:
    """Which teacher traces become SFT rows."""

    min_reward: float = field(default=1.0, metadata={"help": "a trace is correct when its reward >= min_reward"})
    max_tokens: int | None = field(default=None, metadata={"help": "drop traces longer than this; None = no limit"})
    require_well_formed: bool = field(default=True, metadata={"help": "need one closed <think> block + an answer"})
    keep: str = field(default="best", metadata={"help": "'best' (one per prompt) or 'all' passing traces"})
    min_pass_rate: float = field(default=0.0, metadata={"help": "drop prompts whose correct fraction is lower"})
    max_pass_rate: float = field(default=1.0, metadata={"help": "drop prompts whose correct fraction is higher"})

    def __post_init__(self) -> None:
        if self.keep not in ("best", "all"):
            raise ValueError(f"keep must be 'best' or 'all', got {self.keep!r}")
        if not 0.0 <= self.min_pass_rate <= self.max_pass_rate <= 1.0:
            raise ValueError("need 0 <= min_pass_rate <= max_pass_rate <= 1")


@dataclass
class FilterStats:
    """Counts of what the filter dropped and why (a trace is counted under its first failing check)."""

    traces: int = 0
    kept: int = 0
    incorrect: int = 0
    too_long: int = 0
    malformed: int = 0
    prompts: int = 0
    prompts_kept: int = 0
    prompts_out_of_pass_rate: int = 0


def split_reasoning(completion: str) -> tuple[str, str] | None:
    """``(reasoning, answer)`` of a well-formed trace, else None.

    Well formed: exactly one ``</think>``, at most one ``<think>`` and only before it (R1 prompts may already end
    with ``<think>\\n``, so the opening tag is optional), and a non-empty answer after it.
    """
    if completion.count(THINK_CLOSE) != 1 or completion.count(THINK_OPEN) > 1:
        return None
    head, answer = completion.split(THINK_CLOSE)
    if THINK_OPEN in answer:
        return None
    if THINK_OPEN in head:
        before, head = head.split(THINK_OPEN)
        if before.strip():
            return None
    reasoning, answer = head.strip(), answer.strip()
    if not reasoning or not answer:
        return None
    return reasoning, answer


def score_traces(
    traces: Sequence[dict[str, Any]], reward_fns: Sequence[RewardFn], weights: Sequence[float] | None = None
) -> list[float | None]:
    """Weighted sum of TRL-style rewards ``fn(prompts, completions, completion_ids=None, **columns)``.

    ``columns`` are the traces' other keys (``answer``, ``ground_truth``, ...). ``None`` means "not applicable" and
    is left out of the sum; a trace for which every reward is None scores None (and will not pass the filter).
    """
    weights = list(weights) if weights is not None else [1.0] * len(reward_fns)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(reward_fns)} reward functions but {len(weights)} weights")
    skip = {"prompt", "completion", "completion_ids", "reward"}
    columns = {k: [t.get(k) for t in traces] for k in dict.fromkeys(k for t in traces for k in t) if k not in skip}
    prompts = [t["prompt"] for t in traces]
    completions = [t["completion"] for t in traces]
    ids = [t.get("completion_ids") for t in traces]
    totals: list[float | None] = [None] * len(traces)
    for fn, w in zip(reward_fns, weights):
        values = fn(prompts, completions, completion_ids=ids, **columns)
        if len(values) != len(traces):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {len(values)} values for {len(traces)}")
        for i, v in enumerate(values):
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                totals[i] = (totals[i] or 0.0) + w * float(v)
    return totals


def _as_messages(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt, "reasoning_content": None}]
    return [dict(m) for m in prompt]


def filter_traces(traces: Iterable[dict[str, Any]], cfg: TraceFilterConfig) -> tuple[list[dict[str, Any]], FilterStats]:
    """Turn scored traces into SFT rows (``messages`` + provenance). See the module doc for the rules.

    Each trace needs ``prompt_id``, ``prompt`` (string or messages), ``completion``, ``reward`` (float or None),
    ``teacher`` and, when ``max_tokens`` is set, ``num_tokens``. ``best`` breaks ties by fewer tokens, then by
    the earlier trace. Rows come out in the order prompts first appear.
    """
    stats = FilterStats()
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for t in traces:
        for key in ("prompt_id", "prompt", "completion", "reward", "teacher"):
            if key not in t:
                raise KeyError(f"trace {stats.traces} (prompt_id {t.get('prompt_id')!r}) has no {key!r} field")
        group = groups.setdefault(str(t["prompt_id"]), [])
        group.append((t.get("trace_index", len(group)), t))  # default: position among this prompt's traces
        stats.traces += 1
    rows: list[dict[str, Any]] = []
    for pid, group in groups.items():
        stats.prompts += 1
        passing, correct = [], 0
        for idx, t in group:
            reward = t["reward"]
            if reward is None or not math.isfinite(reward) or reward < cfg.min_reward:  # NaN compares False
                stats.incorrect += 1
                continue
            correct += 1
            if cfg.max_tokens is not None:
                if "num_tokens" not in t:
                    raise KeyError(f"trace {idx} of prompt {pid!r} has no 'num_tokens' but max_tokens is set")
                if t["num_tokens"] > cfg.max_tokens:
                    stats.too_long += 1
                    continue
            parts = split_reasoning(t["completion"])
            if parts is None and cfg.require_well_formed:
                stats.malformed += 1
                continue
            passing.append((idx, t, parts))
        rate = correct / len(group)
        if not cfg.min_pass_rate <= rate <= cfg.max_pass_rate:
            stats.prompts_out_of_pass_rate += 1
            continue
        if cfg.keep == "best" and passing:
            passing = [min(passing, key=lambda p: (-p[1]["reward"], p[1].get("num_tokens", 0), p[0]))]
        for idx, t, parts in passing:
            reasoning, answer = parts if parts is not None else (None, t["completion"].strip())
            assistant = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
            rows.append(
                {
                    "messages": _as_messages(t["prompt"]) + [assistant],
                    "prompt_id": pid,
                    "teacher": t["teacher"],
                    "trace_index": idx,
                    "reward": float(t["reward"]),
                    "pass_rate": rate,
                }
            )
        stats.prompts_kept += bool(passing)
    stats.kept = len(rows)
    return rows, stats


def write_sft_dataset(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write SFT rows as JSON lines (readable by ``data.load_conversations``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def topk_distill_loss(
    student_logits_BTV: Tensor,
    teacher_topk_ids_BTK: Tensor,
    teacher_topk_logp_BTK: Tensor,
    mask_BT: Tensor,
    direction: str = "forward",
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL between teacher (top-k) and student per position, aggregated like the policy loss. Returns ``(loss [], m)``.

    The teacher's top-k log-probs are renormalised over their k ids. ``forward``: ``sum_k p_k (log p_k - log q_k)``
    with ``q`` the student's full softmax; ``reverse``: ``sum_k q~_k (log q~_k - log p_k)`` with ``q~`` the student
    renormalised over the same k ids.
    """
    kl = topk_kl(student_logits_BTV, teacher_topk_ids_BTK, teacher_topk_logp_BTK, direction)
    loss = aggregate_loss(kl, mask_BT, agg)
    return loss, {"distill_kl": loss.detach()}


def topk_kl(student_logits_XV: Tensor, teacher_topk_ids_XK: Tensor, teacher_topk_logp_XK: Tensor,
            direction: str) -> Tensor:  # fmt: skip
    """``topk_distill_loss``'s per-position KL, ``[..., V], [..., K], [..., K] -> [...]`` (fp32)."""
    V = student_logits_XV.shape[-1]
    if teacher_topk_ids_XK.numel() and int(teacher_topk_ids_XK.max()) >= V:
        raise ValueError(
            f"teacher token id {int(teacher_topk_ids_XK.max())} >= student vocab {V}: vocabularies differ"
        )
    logp_t = torch.log_softmax(teacher_topk_logp_XK.float(), dim=-1)
    logits = student_logits_XV.float()
    picked = torch.gather(logits, -1, teacher_topk_ids_XK.long())
    if direction == "forward":
        logq = picked - torch.logsumexp(logits, dim=-1, keepdim=True)
        # a teacher entry of probability 0 (log-prob -inf, e.g. a masked token) contributes 0, not 0 * -inf = NaN
        return torch.where(logp_t > -math.inf, logp_t.exp() * (logp_t - logq), 0.0).sum(-1)
    if direction == "reverse":
        logq = torch.log_softmax(picked, dim=-1)
        # where the teacher gives probability 0 the reverse KL is unbounded; floor its log-prob at fp32's smallest
        # normal so the loss stays finite and still pushes the student's mass off such tokens
        floor = math.log(torch.finfo(torch.float32).tiny)
        return (logq.exp() * (logq - logp_t.clamp_min(floor))).sum(-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


# ---------------------------------------------------------------------------------------------------- on-policy
# The student samples, the teacher scores the student's tokens, the student moves toward the teacher where it
# actually goes (Agarwal et al. 2024, "On-policy distillation of language models" / GKD; Gu et al. 2024, MiniLLM).
# Batches are GRPO's (``rl.build_rl_batch``: prompt + completion rows, ``completion_mask``); per-position tensors
# are aligned with the tokens: index t scores token t, from the logits at t - 1.


HEAD_CHUNK_ELEMENTS = 1 << 24  # [rows, V] logits per chunk: 64 MB in fp32


def head_chunk_rows(vocab_size: int, budget_elements: int = HEAD_CHUNK_ELEMENTS) -> int:
    """Rows of vocabulary-sized logits computed at a time (at least 1)."""
    return max(1, budget_elements // vocab_size)


def _head_inputs(model: torch.nn.Module, batch: dict[str, Tensor], keep_BT: Tensor):
    """(the model output, the head weight or None, [N, D] hidden states or, when the head weight is None (ZeRO-3),
    [N, V] logits) of the N positions predicting the tokens where ``keep_BT[:, 1:]``."""
    from .rl import forward_inputs
    from .trainer.step import fused_head_weight

    head = fused_head_weight(model)
    out = model(batch["input_ids"], return_logits=head is None, **forward_inputs(batch))
    rows = keep_BT[:, 1:].bool()
    return out, head, (out.logits if head is None else out.hidden)[:, :-1][rows]


@torch.no_grad()
def teacher_scores(teacher: torch.nn.Module, batch: dict[str, Tensor], top_k: int,
                   chunk_elements: int = HEAD_CHUNK_ELEMENTS) -> dict[str, Tensor]:  # fmt: skip
    """The teacher's view of the student's completions: ``teacher_logp`` [B, T] (log-prob of each sampled token)
    and, with ``top_k > 0``, ``teacher_topk_ids`` / ``teacher_topk_logp`` [B, T, K] (its K most likely tokens per
    completion position and their log-probs). 0 off the completion mask. Logits only at completion positions, a
    chunk of rows at a time (``chunk_elements`` values), so no [N, V] tensor is held."""
    mask = batch["completion_mask"]
    B, T = mask.shape
    _, head, x_N = _head_inputs(teacher, batch, mask)
    where = mask.bool().clone()
    where[:, 0] = False  # the first token has no prediction (never a completion token in a prompt-led row)
    targets_N = batch["input_ids"][where]
    V = x_N.shape[-1] if head is None else head.shape[0]
    K = min(top_k, V)
    token_N, values_NK, ids_NK = [], [], []
    step = head_chunk_rows(V, chunk_elements)
    for s in range(0, x_N.shape[0], step):
        logits = x_N[s : s + step] if head is None else x_N[s : s + step] @ head.t()
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_N.append(logp.gather(-1, targets_N[s : s + step, None]).squeeze(-1))
        if K > 0:
            values, ids = logp.topk(K, dim=-1)
            values_NK.append(values)
            ids_NK.append(ids)
    out = {"teacher_logp": torch.zeros(B, T, device=mask.device)}
    if token_N:
        out["teacher_logp"][where] = torch.cat(token_N)
    if K > 0:
        out["teacher_topk_logp"] = torch.zeros(B, T, K, device=mask.device)
        out["teacher_topk_ids"] = torch.zeros(B, T, K, dtype=torch.long, device=mask.device)
        if values_NK:
            out["teacher_topk_logp"][where], out["teacher_topk_ids"][where] = torch.cat(values_NK), torch.cat(ids_NK)
    return out


def _chunk_kl_sum(hidden_CD: Tensor, head_VD: Tensor, ids_CK: Tensor, logp_CK: Tensor, direction: str) -> Tensor:
    return topk_kl(hidden_CD @ head_VD.t(), ids_CK, logp_CK, direction).sum()


def topk_distill_loss_fn(direction: str = "reverse", aux_loss_coef: float = 1.0,
                         chunk_elements: int = HEAD_CHUNK_ELEMENTS):  # fmt: skip
    """A trainer loss over batches holding ``teacher_topk_ids`` / ``teacher_topk_logp`` (``teacher_scores``):
    ``topk_kl`` over the completion positions (token mean), plus the MoE balance loss. The student's logits are
    computed a chunk of rows at a time and recomputed in backward (activation checkpointing per chunk), so memory
    holds one [rows, V] chunk, not [N, V]."""
    from torch.utils.checkpoint import checkpoint

    def loss_fn(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        mask = batch["completion_mask"]
        out, head, x_N = _head_inputs(model, batch, mask)
        rows = mask[:, 1:].bool()
        N = x_N.shape[0]
        ids, logp = batch["teacher_topk_ids"][:, 1:][rows], batch["teacher_topk_logp"][:, 1:][rows]
        if N == 0:  # nothing to distill here (every completion masked): no statistics, a zero that keeps the graph
            loss, kl = x_N.sum() * 0.0, math.nan
        else:
            if head is None:  # ZeRO-3: the model produced the logits
                total = topk_kl(x_N, ids, logp, direction).sum()
            else:
                step = head_chunk_rows(head.shape[0], chunk_elements)
                total = sum(checkpoint(_chunk_kl_sum, x_N[s : s + step], head, ids[s : s + step], logp[s : s + step],
                                       direction, use_reentrant=False) for s in range(0, N, step))  # fmt: skip
            loss = total / N
            kl = float(loss.detach())
        if aux_loss_coef and out.aux_loss is not None:
            loss = loss + aux_loss_coef * out.aux_loss
        return loss, {"distill_kl": kl}

    loss_fn.units = lambda batch: int(batch["completion_mask"][:, 1:].sum())  # the N its token mean divides by
    return loss_fn
