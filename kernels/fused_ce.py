"""Fused, chunked linear + cross-entropy: the LM head's loss without the full [N, V] logits (Liger-Kernel's
FusedLinearCrossEntropy, in torch).

Shape legend: N rows (tokens), D hidden, V vocab, C rows per chunk.

``F.cross_entropy(h @ W.T, y)`` materializes the logits [N, V] (2048 x 32000 fp32 = 262 MB), its log-softmax, and in
backward a gradient of the same size, each written and read through memory several times. Here the rows are taken
C at a time: the chunk's logits, its loss and the gradient with respect to those logits (``softmax - onehot``) are
computed in the forward itself, and immediately turned into ``grad_h`` rows (``grad_logits @ W``) and a running
``grad_W`` (``+= grad_logits^T @ h``). The backward only scales the stored gradients by the incoming gradient.
Same GEMMs as the unfused path (three per row: logits, dgrad, wgrad), one [C, V] buffer instead of several [N, V].

Math (mean over the valid rows ``M = {i : y_i != ignore_index}``, logits ``z = s * h W^T`` with ``s = logit_scale``):
    loss    = 1/|M| sum_{i in M} (logsumexp(z_i) - z_{i, y_i})
    dL/dz_i = (softmax(z_i) - onehot(y_i)) / |M|   for i in M, 0 otherwise
    dL/dh   = s * dL/dz W,   dL/dW = s * (dL/dz)^T h
With no valid row the loss is 0 with zero gradients (``F.cross_entropy`` would give NaN).

``fused_linear_logprobs`` is the GRPO sibling: per-token log-probs of given tokens and the softmax entropy, chunked
the same way; its backward recomputes each chunk's logits, since per-token upstream gradients are only known then.
"""

from __future__ import annotations

import torch
from dsalign.kernels import cpu_gemm

IGNORE_INDEX = -100


def linear_cross_entropy_ref(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    logit_scale: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The plain torch reference: full logits, ``F.cross_entropy`` in fp32."""
    logits_NV = (hidden_ND @ weight_VD.t()).float() * logit_scale
    return torch.nn.functional.cross_entropy(logits_NV, target_N, ignore_index=ignore_index, reduction=reduction)


def _chunk_grad_logits(logits_CV: torch.Tensor, target_C: torch.Tensor, valid_C: torch.Tensor) -> torch.Tensor:
    """Turn a chunk's fp32 logits, in place, into ``softmax - onehot`` (rows of ignored targets zeroed); returns the
    per-row loss ``logsumexp - z_target`` [C] (0 on ignored rows)."""
    rows = torch.arange(logits_CV.shape[0], device=logits_CV.device)
    safe_target_C = torch.where(valid_C, target_C, 0)
    max_C1 = logits_CV.amax(dim=1, keepdim=True)
    logits_CV.sub_(max_C1)  # z - max: at most 0, so exp never overflows
    z_target_C = logits_CV[rows, safe_target_C]
    logits_CV.exp_()
    sum_C1 = logits_CV.sum(dim=1, keepdim=True)
    logits_CV.div_(sum_C1)  # softmax
    logits_CV[rows, safe_target_C] -= 1.0
    logits_CV.index_fill_(0, (~valid_C).nonzero().squeeze(1), 0.0)  # touches the ignored rows only
    return (sum_C1.squeeze(1).log() - z_target_C) * valid_C


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss *and* both gradients; backward scales them by the incoming gradient (once)."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, target_N, ignore_index, logit_scale, reduction, chunk_rows, compute_dtype,
                grad_enabled):  # fmt: skip
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        device_type = hidden_ND.device.type
        with torch.autocast(device_type, enabled=False):
            h_ND = hidden_ND.to(compute_dtype)
            w_VD = weight_VD.to(compute_dtype)
            valid_N = target_N != ignore_index
            n_valid = valid_N.sum()
            grad_h_ND = torch.empty_like(h_ND) if need_h else None
            grad_w_VD = None  # the first chunk's product, then accumulated (no zero fill of [V, D])
            loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            rows = min(chunk_rows, h_ND.shape[0])
            onednn = cpu_gemm.use_onednn(h_ND, w_VD, rows, w_VD.shape[1], w_VD.shape[0])
            # One [C, V] buffer for every chunk (fresh large allocations cost page faults on CPU). oneDNN's op
            # returns a fresh tensor instead (the trainer's host-memory policy keeps those from faulting).
            buf = None if onednn else torch.empty(rows, w_VD.shape[0], dtype=compute_dtype, device=h_ND.device)
            for start in range(0, h_ND.shape[0], chunk_rows):
                h_CD = h_ND[start : start + chunk_rows]
                if onednn:
                    logits_CV = cpu_gemm.mm(h_CD, w_VD.t())
                else:
                    logits_CV = torch.mm(h_CD, w_VD.t(), out=buf[: h_CD.shape[0]])
                z_CV = logits_CV.float()  # a view when computing in fp32; a bf16 GEMM is upcast like F.cross_entropy
                if logit_scale != 1.0:
                    z_CV.mul_(logit_scale)
                loss_sum += _chunk_grad_logits(z_CV, target_N[start : start + chunk_rows],
                                               valid_N[start : start + chunk_rows]).sum()  # fmt: skip
                g_CV = z_CV.to(compute_dtype)
                if need_h and onednn:
                    grad_h_ND[start : start + chunk_rows] = cpu_gemm.mm(g_CV, w_VD)
                elif need_h:
                    torch.mm(g_CV, w_VD, out=grad_h_ND[start : start + chunk_rows])
                if need_w and grad_w_VD is None:
                    grad_w_VD = cpu_gemm.mm(g_CV.t(), h_CD).float()
                elif need_w and onednn:
                    grad_w_VD += cpu_gemm.mm(g_CV.t(), h_CD)
                elif need_w and compute_dtype == torch.float32:
                    grad_w_VD.addmm_(g_CV.t(), h_CD)
                elif need_w:
                    grad_w_VD += (g_CV.t() @ h_CD).float()
            scale = logit_scale / n_valid.clamp(min=1).float() if reduction == "mean" else logit_scale
            loss = loss_sum / n_valid.clamp(min=1) if reduction == "mean" else loss_sum
        ctx.grads = (grad_h_ND, grad_w_VD, scale)
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward called twice (retain_graph); its gradients are computed in the "
                "forward and handed out once. Use the unfused loss (fused_ce=False) for double backward."
            )
        grad_h_ND, grad_w_VD, scale = ctx.grads
        ctx.grads = None
        factor = grad_out.float() * scale
        if grad_h_ND is not None:
            grad_h_ND = grad_h_ND.mul_(factor.to(grad_h_ND.dtype)).to(ctx.dtypes[0])
        if grad_w_VD is not None:  # contiguous: oneDNN's weight gradient may be a transposed view
            grad_w_VD = grad_w_VD.mul_(factor).to(ctx.dtypes[1]).contiguous()
        return grad_h_ND, grad_w_VD, None, None, None, None, None, None, None


def default_chunk_rows(num_rows: int, vocab_size: int, budget_elements: int = 1 << 25, max_rows: int = 4096) -> int:
    """Rows per chunk: as few chunks as keep one chunk's logits within ``budget_elements`` values (32M: 128 MB in
    fp32) and ``max_rows`` rows, split evenly. Few large chunks matter on CPU: the forward GEMM ``h_C @ W^T`` repacks
    all of ``W`` per call, so 256-row chunks cost 1.6x the unchunked GEMM there while ~1000-row chunks beat it (bench
    head shape). The row cap matters at small vocabularies, where the budget alone would make one chunk of the whole
    batch: each of the chunk's elementwise passes (scale, log-sum-exp, exp, products) then streams a fresh tensor of
    tens of MB from memory instead of reusing a few MB in cache. At V = 320 and 16,384 rows, fwd + bwd on 2 threads:
    33 ms in 4,096-row chunks (32-34 at 2,048-8,192) against 39-55 ms in one chunk."""
    rows = max(1, min(max_rows, budget_elements // vocab_size))
    num_chunks = -(-num_rows // rows)
    return max(1, -(-num_rows // max(1, num_chunks)))


def _check_and_plan(who: str, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor,
                    chunk_rows: int | None) -> tuple[int, torch.dtype]:  # fmt: skip
    """Shape checks with messages naming the function; returns (rows per chunk, GEMM dtype: the autocast dtype
    under autocast, else the inputs' promoted dtype)."""
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"{who}: expected hidden [N, D] and weight [V, D], got {tuple(hidden_ND.shape)} and "
                         f"{tuple(weight_VD.shape)}")  # fmt: skip
    if target_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"{who}: target {tuple(target_N.shape)} does not match hidden rows {hidden_ND.shape[0]}")
    chunk_rows = default_chunk_rows(*target_N.shape, weight_VD.shape[0]) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"{who}: chunk_rows must be >= 1, got {chunk_rows}")
    device_type = hidden_ND.device.type
    if torch.is_autocast_enabled(device_type):
        return chunk_rows, torch.get_autocast_dtype(device_type)
    return chunk_rows, torch.promote_types(hidden_ND.dtype, weight_VD.dtype)


def _check_targets(target_N: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is a class id or ``ignore_index``, as ``F.cross_entropy`` insists: a -1 (another padding
    convention) would otherwise index the last vocabulary entry and train on it silently."""
    bad_N = (target_N != ignore_index) & ((target_N < 0) | (target_N >= vocab))
    if bool(bad_N.any()):
        i = int(bad_N.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: target[{i}] = {int(target_N[i])} is outside [0, {vocab}) and is "
                         f"not ignore_index ({ignore_index})")  # fmt: skip


def fused_linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logit_scale * hidden @ weight.T, target)`` without materializing the logits.

    Args:
        hidden_ND: [N, D] the head's input (e.g. the final-norm hidden states).
        weight_VD: [V, D] the head's weight.
        target_N: [N] int64 class ids; ``ignore_index`` rows count neither in the loss nor in the mean.
        logit_scale: multiplies the logits (``1 / temperature``).
        reduction: "mean" over valid rows (0 when there is none) or "sum".
        chunk_rows: rows per chunk (default: ``default_chunk_rows(N, V)``).
    Returns:
        The scalar loss (fp32). Under autocast the GEMMs run in the autocast dtype and the softmax in fp32, as
        ``F.cross_entropy(lm_head(h).float())`` does. The backward may run once (no ``retain_graph``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk_rows, compute_dtype = _check_and_plan("fused_linear_cross_entropy", hidden_ND, weight_VD, target_N,
                                                chunk_rows)  # fmt: skip
    if hidden_ND.shape[0] == 0:
        return (hidden_ND.sum() + weight_VD.sum()).float() * 0.0
    _check_targets(target_N, weight_VD.shape[0], ignore_index)
    return _FusedLinearCrossEntropy.apply(hidden_ND, weight_VD, target_N, ignore_index, float(logit_scale), reduction,
                                          chunk_rows, compute_dtype, torch.is_grad_enabled())  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Per-token log-probs and entropy (GRPO): chunked forward, chunks recomputed in backward
# --------------------------------------------------------------------------------------------------------------------


def linear_logprobs_ref(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor, logit_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch reference: full logits; ``(log softmax(z)[target], entropy(softmax(z)))``, fp32 [N] each."""
    logp_NV = torch.log_softmax((hidden_ND @ weight_VD.t()).float() * logit_scale, dim=-1)
    return logp_NV.gather(1, target_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Unlike the loss, the incoming gradients are per row (the policy loss weights every token), so the weight
    gradient cannot be formed in the forward: the backward recomputes each chunk's logits (a fourth GEMM per row)
    from the saved log-sum-exp and entropy. Memory stays at one [C, V] chunk instead of [N, V]."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, target_N, logit_scale, chunk_rows, compute_dtype):
        with torch.autocast(hidden_ND.device.type, enabled=False):
            h_ND, w_VD = hidden_ND.to(compute_dtype), weight_VD.to(compute_dtype)
            logp_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
            lse_N, ent_N = torch.empty_like(logp_N), torch.empty_like(logp_N)
            for start in range(0, h_ND.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                z_CV = cpu_gemm.mm(h_ND[rows], w_VD.t()).float().mul_(logit_scale)
                lse_C = torch.logsumexp(z_CV, dim=1)
                lse_N[rows] = lse_C
                logp_N[rows] = z_CV.gather(1, target_N[rows, None]).squeeze(1) - lse_C
                z_CV.sub_(lse_C[:, None])  # log p
                ent_N[rows] = -(z_CV.exp() * z_CV).sum(dim=1)
        ctx.set_materialize_grads(False)  # an unused output (usually the entropy) gets None, not a zero tensor
        ctx.save_for_backward(hidden_ND, weight_VD, target_N, lse_N, ent_N)
        ctx.config = (logit_scale, chunk_rows, compute_dtype)
        return logp_N, ent_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_ent_N):
        hidden_ND, weight_VD, target_N, lse_N, ent_N = ctx.saved_tensors
        logit_scale, chunk_rows, compute_dtype = ctx.config
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp_N is None and grad_ent_N is None:
            return None, None, None, None, None, None
        with torch.autocast(hidden_ND.device.type, enabled=False):
            h_ND, w_VD = hidden_ND.to(compute_dtype), weight_VD.to(compute_dtype)
            grad_h_ND = torch.empty_like(h_ND) if need_h else None
            grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
            for start in range(0, h_ND.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h_CD = h_ND[rows]
                logp_CV = cpu_gemm.mm(h_CD, w_VD.t()).float().mul_(logit_scale).sub_(lse_N[rows, None])
                p_CV = logp_CV.exp()
                # d logp_t / dz = onehot_t - p;  d H / dz = -p * (log p + H)
                g_CV = None
                if grad_ent_N is not None:
                    g_CV = logp_CV.add_(ent_N[rows, None]).mul_(p_CV).mul_(-grad_ent_N[rows, None])
                if grad_logp_N is not None:
                    term_CV = p_CV.mul_(-grad_logp_N[rows, None])
                    g_CV = term_CV if g_CV is None else g_CV.add_(term_CV)
                    g_CV.scatter_add_(1, target_N[rows, None], grad_logp_N[rows, None])
                g_CV = g_CV.mul_(logit_scale).to(compute_dtype)
                if need_h:
                    grad_h_ND[rows] = cpu_gemm.mm(g_CV, w_VD)
                if need_w:
                    grad_w_VD += cpu_gemm.mm(g_CV.t(), h_CD).float()
        grad_h_ND = None if grad_h_ND is None else grad_h_ND.to(hidden_ND.dtype)
        grad_w_VD = None if grad_w_VD is None else grad_w_VD.to(weight_VD.dtype)
        return grad_h_ND, grad_w_VD, None, None, None, None


def fused_linear_logprobs(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    logit_scale: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log softmax(z)[target], entropy(softmax(z)))`` for ``z = logit_scale * hidden @ weight.T``, fp32 [N] each,
    without materializing the [N, V] logits. Both outputs are differentiable (the entropy for entropy bonuses);
    under autocast the GEMMs run in the autocast dtype and the softmax in fp32."""
    chunk_rows, compute_dtype = _check_and_plan("fused_linear_logprobs", hidden_ND, weight_VD, target_N, chunk_rows)
    return _FusedLinearLogprobs.apply(hidden_ND, weight_VD, target_N.long(), float(logit_scale), chunk_rows,
                                      compute_dtype)  # fmt: skip
