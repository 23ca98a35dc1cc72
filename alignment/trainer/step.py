"""One optimizer step as a sequence of named steps: forward/backward per micro-batch, optimizer step, expert-count
reduction, router-bias update, metrics. The loss is a pure function handed in by the caller (SFT, GRPO, ...).

    loss_fn(model, micro_batch) -> (loss [], metrics dict)

The optimizer side is a ``Runner``: ``LocalRunner`` (one process, plain torch) here, ``DeepSpeedRunner`` in
``distributed.py``. Both see gradients of ``mean over micro-batches`` of the loss, clipped to ``grad_clip``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from dsalign.model import Transformer, apply_bias_update, causal_lm_loss, load_imbalance, next_token_targets
from torch import nn

from .config import TrainerConfig
from .hostmem import retain_host_memory
from .optim import build_optimizer, build_scheduler, resync_lr

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
# A loss function may carry ``units(batch) -> int``: how many items (target tokens, sequences) its loss averages
# over in that micro-batch. ``train_step`` then weighs micro-batches so the step's gradient is that of the mean over
# the whole global batch (``micro_batch_shares``), not a mean of per-micro-batch means.


class Runner(Protocol):
    """What ``train_step`` needs from the optimizer side."""

    model: Transformer  # the bare network (what loss functions are called with)
    dp_group: Any  # process group over which the global batch is split (None: single process)

    def backward(self, loss: torch.Tensor, micro_index: int, num_micro: int) -> None: ...

    def optimizer_step(self) -> float: ...  # returns the pre-clip global gradient norm

    def lr(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LocalRunner:
    """Single-process runner: ``loss / num_micro`` backward, global-norm clip, AdamW, warmup + cosine."""

    dp_group = None

    def __init__(self, model: Transformer, cfg: TrainerConfig, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.cfg = model, cfg
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def backward(self, loss: torch.Tensor, micro_index: int, num_micro: int) -> None:
        (loss / num_micro).backward()

    def optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        resync_lr(self.scheduler, self.cfg.lr)


def prepare_model(model: Transformer, cfg: TrainerConfig) -> Transformer:
    """Apply the trainer's model-side switches: train mode, activation checkpointing, balance-loss alpha; and, for a
    model on CPU, the process's host-memory policy (``cfg.retain_host_memory``, ``hostmem.retain_host_memory``)."""
    if cfg.retain_host_memory and next(model.parameters()).device.type == "cpu":
        retain_host_memory()
    model.train()
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.aux_loss_alpha is not None:
        model.cfg.aux_loss_alpha = cfg.aux_loss_alpha  # the config object is shared by every MoE layer
    return model


class ExpertLoadTracker:
    """Sums ``ModelOutput.expert_counts`` over the forwards of one step (a forward hook, so loss functions stay
    unaware of balancing)."""

    def __init__(self, model: Transformer):
        self.counts_LE: torch.Tensor | None = None
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        counts = getattr(output, "expert_counts", None)
        if counts is None or not torch.is_grad_enabled():
            return  # no MoE layers, or a no-grad forward (reference / old-policy log-probs) that is not trained on
        counts = counts.detach().float()
        if self.counts_LE is not None and self.counts_LE.shape != counts.shape:  # e.g. MTP on in one forward only
            rows = max(counts.shape[0], self.counts_LE.shape[0])
            counts, self.counts_LE = (torch.nn.functional.pad(c, (0, 0, 0, rows - c.shape[0]))
                                      for c in (counts, self.counts_LE))  # fmt: skip
        self.counts_LE = counts if self.counts_LE is None else self.counts_LE + counts

    def take(self) -> torch.Tensor | None:
        counts, self.counts_LE = self.counts_LE, None
        return counts

    def remove(self) -> None:
        self._handle.remove()


def autocast_context(cfg: TrainerConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward/backward when ``compute_dtype == "bf16"`` (fp32 master weights stay)."""
    if cfg.compute_dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """A micro-batch (a mapping of tensors, or an object with ``.to`` such as ``PackedBatch``) on ``device``; the
    same object when it is already there."""
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def forward_backward(runner: Runner, micro_batch: Any, loss_fn: LossFn, cfg: TrainerConfig, micro_index: int,
                     num_micro: int, share: float = 1.0) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Forward one micro-batch through ``loss_fn`` and backpropagate its share of the step's loss: ``share`` times
    the ``1 / num_micro`` the runner applies (``micro_batch_shares``)."""
    device = next(runner.model.parameters()).device
    micro_batch = to_device(micro_batch, device)
    with autocast_context(cfg, device):
        loss, metrics = loss_fn(runner.model, micro_batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)} at micro-batch {micro_index}; metrics {metrics}")
    runner.backward(loss * share if share != 1.0 else loss, micro_index, num_micro)
    return float(loss.detach()), metrics


def micro_batch_shares(micro_batches: Sequence[Any], loss_fn: LossFn, group: Any) -> list[float]:
    """Each micro-batch's weight relative to the equal split the runners apply (they divide by the micro-batch
    count, and data parallelism averages over ranks): ``world * M * n_i / N`` with ``n_i`` the micro-batch's
    ``loss_fn.units`` and ``N`` their sum over the step's micro-batches and ranks. A loss that averages over its
    ``n_i`` items then contributes ``sum_i / N``: the gradient of the mean over the global batch, whatever the
    micro-batches' sizes (equal counts give 1.0 each). All 1.0 for a loss without ``units`` or with nothing to
    count."""
    units = getattr(loss_fn, "units", None)
    if units is None:
        return [1.0] * len(micro_batches)
    counts = [units(mb) for mb in micro_batches]
    if any(c is None for c in counts):  # a loss that cannot count this batch's items
        return [1.0] * len(micro_batches)
    counts = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    total = counts.sum().reshape(1)
    world = 1
    if group is not None and dist.is_initialized():
        total = total.to(collective_device(group))
        dist.all_reduce(total, group=group)
        world = dist.get_world_size(group)
    total = float(total)
    if total <= 0:
        return [1.0] * len(micro_batches)
    return (counts * (world * len(micro_batches) / total)).tolist()


def refresh_fp8_weights(model: nn.Module) -> None:
    """Drop the FP8 copies of the weights after an optimizer step.

    The caches requantize when a weight's version counter moves, but not every in-place update moves it: torch's
    fused AdamW and ZeRO's copies through ``.data`` do not, and a stale copy silently trains against old weights.
    Invalidating after each step is cheap and always right (``kernels.grouped_gemm.invalidate_weight_caches``).
    """
    from dsalign.kernels.grouped_gemm import invalidate_weight_caches

    invalidate_weight_caches(model)


def reduce_expert_counts(counts_LE: torch.Tensor | None, group: Any) -> torch.Tensor | None:
    """Sum the step's tokens-per-expert over the data-parallel world, so every rank sees the global batch."""
    if counts_LE is not None and group is not None and dist.is_initialized():
        dist.all_reduce(counts_LE, group=group)
    return counts_LE


def update_router_bias(model: Transformer, counts_LE: torch.Tensor | None, cfg: TrainerConfig) -> None:
    """Auxiliary-loss-free balancing (docs/SPEC.md section 3): sign rule on every gate's ``e_score_correction_bias``."""
    if counts_LE is None or cfg.bias_update_gamma == 0:
        return
    # Rows are main layers first, then MTP blocks; a step without MTP (lambda 0) leaves the MTP gates alone.
    gates = model.gates()[: counts_LE.shape[0]]
    apply_bias_update(gates, counts_LE, cfg.bias_update_gamma, center=cfg.bias_update_center)


def expert_load_metrics(counts_LE: torch.Tensor | None) -> dict[str, float]:
    """Per MoE layer max/mean expert load (1.0 = balanced), plus their mean and max over layers."""
    if counts_LE is None:
        return {}
    imb_L = load_imbalance(counts_LE)
    metrics = {f"load_max_mean/{i}": float(v) for i, v in enumerate(imb_L)}
    metrics["load_max_mean/avg"] = float(imb_L.mean())
    metrics["load_max_mean/worst"] = float(imb_L.max())
    return metrics


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the current CUDA device under NCCL (which has no CPU
    path), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def token_weighted_metrics(metrics: dict[str, float], tokens: int, group: Any = None) -> dict[str, float]:
    """Per-rank metrics made global over ``group`` (the data-parallel world by default): ``*_max`` keys take the
    maximum, the others the mean weighted by each rank's ``tokens``. Every rank must pass the same keys (NaN where
    it had no tokens). Without a process group: ``metrics`` unchanged."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(metrics)
    keys = sorted(metrics)
    is_max = [k.endswith("_max") for k in keys]
    device = collective_device(group)
    weighted = [0.0 if m or tokens == 0 else metrics[k] * tokens for k, m in zip(keys, is_max)]
    sums = torch.tensor([*weighted, float(tokens)], dtype=torch.float64, device=device)
    peaks = torch.tensor([metrics[k] if m and tokens else -math.inf for k, m in zip(keys, is_max)],
                         dtype=torch.float64, device=device)  # fmt: skip
    dist.all_reduce(sums, group=group)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    total = float(sums[-1])
    out = {}
    for i, (k, m) in enumerate(zip(keys, is_max)):
        value = float(peaks[i]) if m else float(sums[i]) / total if total else math.nan
        out[k] = value if math.isfinite(value) else math.nan
    return out


def average_metrics(per_micro: Sequence[dict[str, float]], group: Any,
                    weights: Sequence[float] | None = None) -> dict[str, float]:  # fmt: skip
    """The step's value of each metric over the micro-batches of every data-parallel rank that report it (keys
    must match across ranks): ``*_max`` keys the maximum, ``*tokens`` keys (counts) the sum, the others the mean
    weighted by ``weights`` (each micro-batch's share of the step's objective, ``micro_batch_shares``: so the
    logged loss is the objective the gradient follows, whatever the micro-batches' and ranks' token counts;
    equal weights by default). A metric a micro-batch leaves out or reports as NaN (a loss with nothing to measure
    there, e.g. a GRPO micro-batch whose completions are all masked) does not count; with no value anywhere it is
    NaN."""
    weights = [1.0] * len(per_micro) if weights is None else list(weights)
    keys = sorted(set().union(*per_micro)) if per_micro else []
    rows = []  # per key: weighted sum, weight, plain sum, count; and the maximum
    peaks = []
    for k in keys:
        present = [(m[k], w) for m, w in zip(per_micro, weights) if k in m and not math.isnan(m[k])]
        rows.append([sum(v * w for v, w in present), sum(w for _, w in present), sum(v for v, _ in present),
                     len(present)])  # fmt: skip
        peaks.append(max((v for v, _ in present), default=-math.inf))
    local = torch.tensor(rows, dtype=torch.float64).reshape(len(keys), 4)
    peak = torch.tensor(peaks, dtype=torch.float64)
    if group is not None and dist.is_initialized() and keys:
        local, peak = local.to(collective_device(group)), peak.to(collective_device(group))
        dist.all_reduce(local, group=group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        local, peak = local.cpu(), peak.cpu()
    out = {}
    for i, k in enumerate(keys):
        wsum, wtot, total, count = local[i].tolist()
        if count == 0:
            out[k] = math.nan
        elif k.endswith("_max"):
            out[k] = float(peak[i])
        elif k.endswith("tokens"):
            out[k] = total
        else:
            out[k] = wsum / wtot if wtot > 0 else total / count
    return out


def train_step(runner: Runner, micro_batches: Sequence[Any], loss_fn: LossFn, cfg: TrainerConfig,
               tracker: ExpertLoadTracker | None = None) -> dict[str, float]:  # fmt: skip
    """One optimizer step over ``micro_batches`` (this rank's share of the global batch). Returns metrics:
    ``loss`` (over micro-batches and ranks, each weighted by its share of the objective), the loss function's metrics
    (likewise; see ``average_metrics``), ``grad_norm``, ``lr`` (the one
    used), and per-layer ``load_max_mean/<layer>`` of the step's global expert counts."""
    if len(micro_batches) != cfg.micro_batches:
        raise ValueError(f"train_step got {len(micro_batches)} micro-batches, TrainerConfig.micro_batches is "
                         f"{cfg.micro_batches}; split the batch accordingly")  # fmt: skip
    tracker = tracker if tracker is not None else _tracker_of(runner)
    tracker.take()  # drop counts of forwards outside the step
    per_micro = []
    shares = micro_batch_shares(micro_batches, loss_fn, runner.dp_group)
    for i, (mb, share) in enumerate(zip(micro_batches, shares)):
        loss, metrics = forward_backward(runner, mb, loss_fn, cfg, i, len(micro_batches), share)
        per_micro.append({"loss": loss, **metrics})
    lr = runner.lr()
    grad_norm = runner.optimizer_step()
    refresh_fp8_weights(runner.model)
    counts_LE = reduce_expert_counts(tracker.take(), runner.dp_group)
    update_router_bias(runner.model, counts_LE, cfg)
    metrics = average_metrics(per_micro, runner.dp_group, shares)
    metrics.update(grad_norm=grad_norm, lr=lr, **expert_load_metrics(counts_LE))
    return metrics


def _tracker_of(runner: Runner) -> ExpertLoadTracker:
    if not hasattr(runner, "_expert_tracker"):
        runner._expert_tracker = ExpertLoadTracker(runner.model)
    return runner._expert_tracker


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The output head's weight for the fused chunked head + CE, or None where the logits path must run instead.

    None under ZeRO-3: the weight is partitioned except inside ``lm_head``'s own forward (DeepSpeed gathers a
    parameter used elsewhere only during ``engine.forward``, which loss functions, given the bare model, never run
    through), so the fused loss, which reads it after the model's forward, would see an empty shard.
    """
    weight = model.lm_head.weight
    return None if hasattr(weight, "ds_id") else weight  # ds_id: set on every ZeRO-3 partitioned parameter


def lm_loss_fn(mtp_lambda: float = 0.1, aux_loss_coef: float = 1.0, fused_ce: bool = True) -> LossFn:
    """Next-token loss for dict batches {input_ids, labels, [attention_mask, position_ids, segment_ids]}:
    ``CE + mtp_lambda / D * sum_k CE_k + aux_loss_coef * balance loss``. MTP is skipped when lambda is 0.

    ``fused_ce`` (default) computes every CE term with the fused chunked head + cross-entropy
    (``kernels.fused_ce``): the model returns its head inputs instead of [B, T, V] logits; same loss and gradients
    up to fp32 rounding, less time and memory. Its backward runs once per forward (no ``retain_graph``). Under
    ZeRO-3 the logits path runs (``fused_head_weight``)."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        head_weight = fused_head_weight(model) if fused_ce else None
        out = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            compute_mtp=mtp_lambda > 0,
            return_logits=head_weight is None,
        )
        loss, metrics = causal_lm_loss(out, batch["labels"], mtp_lambda, batch.get("segment_ids"), head_weight)
        if aux_loss_coef and out.aux_loss is not None:
            loss = loss + aux_loss_coef * out.aux_loss
            metrics["aux_loss"] = float(out.aux_loss.detach())
        return loss, metrics

    loss_fn.units = lambda batch: next_token_targets(batch["labels"], batch.get("segment_ids"))
    return loss_fn
