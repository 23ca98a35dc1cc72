"""Data parallel through DeepSpeed ZeRO (stages 0-2, and 3 without EP) with expert parallelism for the routed experts.

Process groups (``create_parallel_groups``), for a world of W ranks and EP size P (P divides W and E):
  * data parallel (DP): the whole world; the global batch is split over all W ranks.
  * expert parallel (EP): consecutive blocks of P ranks; rank r of a block holds experts [r*E/P, (r+1)*E/P) of every
    MoE layer (``shard_experts``) and the MoE layers dispatch tokens to them with ``dsalign.kernels.ep``.
  * expert data parallel (EDP): the W/P ranks holding the same expert shard.

Gradient reduction. Dense parameters are averaged over DP by ZeRO. A routed expert's gradient already holds the
contributions of the tokens of its whole EP block (the all-to-all backward brings them home), so it must be reduced
only over its EDP group, with the same 1/W scale as dense parameters. We tell DeepSpeed which parameters these are
with its MoE conventions: ``param.allreduce = False``, ``param.group_name = "ep_size_P"`` and optimizer groups split
by ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``; ZeRO then reduces them over
``groups._get_expert_data_parallel_group(group_name)`` and computes the clip norm MoE-aware. DeepSpeed only turns
these paths on when the model contains its own ``deepspeed.moe.layer.MoE`` modules; our network has its own MoE, so
``_ExpertAwareEngine`` sets the engine's ``has_moe_layers`` flag when expert parameters are present. The
equivalence with a single process (same global batch) is tested in ``tests/trainer/test_distributed.py``.

Launch under torchrun or Ray-created process groups (env ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``):
gloo on CPU, NCCL on CUDA. ZeRO-3 runs data parallel only: DeepSpeed refuses it with expert parameters that do not
come from its AutoEP layers (docs/TRAINING.md). Under ZeRO-3 the loss functions take the logits path
(``step.fused_head_weight``) and exports gather the partitions.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from dsalign.model import Transformer, build_model
from dsalign.model.moe import MoE
from torch import nn

from .config import TrainerConfig
from .optim import build_optimizer, build_scheduler, param_groups, resync_lr
from .step import LocalRunner, Runner, collective_device


def init_distributed(backend: str | None = None) -> None:
    """Initialize ``torch.distributed`` from the environment (torchrun / Ray), if not done yet, and DeepSpeed's
    communication layer on top of it. ``backend`` defaults to NCCL with CUDA, gloo otherwise."""
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_distributed: environment variables {missing} are not set; launch with torchrun "
                               "or create the process group first (e.g. from a Ray worker)")  # fmt: skip
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            # torchrun starts one process per GPU of a node: each must use its own (else every rank lands on
            # cuda:0 and NCCL refuses the duplicate device); a Ray worker sees only its GPU and LOCAL_RANK 0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend)
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


@dataclass
class ParallelGroups:
    """The process groups of one rank (see the module docstring)."""

    ep_size: int
    ep_group: Any
    edp_group: Any
    group_name: str  # DeepSpeed's name of the expert groups, stored on every expert parameter

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)


def create_parallel_groups(ep_size: int) -> ParallelGroups:
    """EP / EDP groups through DeepSpeed's group registry (so ZeRO finds the same groups by name)."""
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size {ep_size} must divide the world size {world}")
    groups._create_expert_and_data_parallel(ep_size)
    name = f"ep_size_{ep_size}"
    return ParallelGroups(ep_size, groups._get_expert_parallel_group(name),
                          groups._get_expert_data_parallel_group(name), name)  # fmt: skip


def _moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(model: Transformer, pg: ParallelGroups) -> None:
    """Keep only this rank's experts in every MoE layer and switch the layer to the expert-parallel path."""
    num_experts = model.cfg.n_routed_experts
    if num_experts % pg.ep_size:
        raise ValueError(f"ep_size {pg.ep_size} must divide n_routed_experts {num_experts}")
    n_local = num_experts // pg.ep_size
    lo = pg.ep_rank * n_local
    for moe in _moe_layers(model):
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = nn.Parameter(full.detach()[lo : lo + n_local].clone(), requires_grad=full.requires_grad)
            local.allreduce, local.group_name = False, pg.group_name
            setattr(experts, name, local)
        experts.ep_group = pg.ep_group


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def is_zero3(model: nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``model``'s parameters (DeepSpeed sets ``ds_id`` on them)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_parameters(model: nn.Module, modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """Context in which ZeRO-3 partitioned parameters hold their full values (collective: every rank enters it);
    with ``modifier_rank``, that rank's in-place changes are kept and re-partitioned. A no-op without ZeRO-3."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]  # ds_id: set on ZeRO-3 parameters
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def is_distributed_state(model: nn.Module) -> bool:
    """Whether some parameter is only partly on this rank (ZeRO-3 partitions or EP expert shards)."""
    return any(hasattr(p, "ds_id") or is_expert_param(p) for p in model.parameters())


def gathered_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(Collective when ``is_distributed_state``) ``model.state_dict()`` with full tensors: experts gathered over
    their EP group, or every parameter from its ZeRO-3 partitions. Keys as the model names them (LoRA adapters
    included). ``state``: a state dict of this rank to complete instead (e.g. ``lora.merged_state_dict``; not under
    ZeRO-3, which LoRA refuses)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 (never with EP: TrainerConfig refuses it)
        if state is not None:
            raise ValueError("gathered_state_dict: a given state cannot be completed under ZeRO-3")
        with gathered_parameters(model):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = model.state_dict() if state is None else dict(state)
    sharded = [m for m in _moe_layers(model) if getattr(m.experts, "ep_group", None) is not None]
    for name, p in model.named_parameters():
        if is_expert_param(p):
            group = next(m.experts.ep_group for m in sharded if p is m.experts.gate_up_proj or p is m.experts.down_proj)
            parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            state[name] = torch.cat(parts)
    return state


def full_model_for_export(model: Transformer) -> Transformer:
    """The model itself, or (collective) a full copy built from ``gathered_state_dict``."""
    if not is_distributed_state(model):
        return model
    state = gathered_state_dict(model)
    full = build_model(model.cfg, device=next(iter(state.values())).device, dtype=state["norm.weight"].dtype)
    full.load_state_dict(state)
    return full


def _engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _ExpertAwareEngine(DeepSpeedEngine):
        """Turns on DeepSpeed's MoE gradient paths for models whose expert parameters carry ``allreduce=False``."""

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            if any(is_expert_param(p) and p.requires_grad for p in self.module.parameters()):
                self.has_moe_layers = True  # not when the experts are frozen (LoRA on attention): nothing to reduce

    return _ExpertAwareEngine


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config our runner uses: fp32 master weights, our AdamW and schedule, clip in ZeRO (stages
    1-3); at stage 0 ``DeepSpeedRunner`` clips itself (DeepSpeed's stage-0 clip averages each rank's local norm,
    which under expert parallelism is not the global norm)."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # nominal: batches are made by the caller, not DeepSpeed's loader
        "gradient_accumulation_steps": cfg.micro_batches,
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRunner:
    """Runner over a DeepSpeed engine. ``backward`` calls ``engine.backward`` (which divides by the accumulation
    steps) and ``engine.step`` on non-final micro-batches (a no-op apart from bookkeeping); ``optimizer_step`` makes
    the boundary step: reduce (ZeRO), clip, AdamW, schedule."""

    def __init__(self, model: Transformer, cfg: TrainerConfig, pg: ParallelGroups | None = None):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.runtime.config import DeepSpeedConfig

        self.model, self.cfg, self.groups = model, cfg, pg
        self.dp_group = dist.group.WORLD
        groups = param_groups(model, cfg.weight_decay)
        if any(is_expert_param(p) and p.requires_grad for p in model.parameters()):
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = build_optimizer(model, cfg, groups=groups)
        scheduler = build_scheduler(optimizer, cfg)
        ds_cfg = deepspeed_config(cfg)
        self.engine = _engine_class()(
            args=None,
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_cfg,
            config_class=DeepSpeedConfig(ds_cfg),
            dist_init_required=False,
        )

    def backward(self, loss: torch.Tensor, micro_index: int, num_micro: int) -> None:
        if micro_index == 0 and self.engine.gradient_accumulation_steps() != num_micro:
            # DeepSpeed fixed its accumulation count when built; a stage that learns its micro-batch count later
            # (GRPO, distillation) would otherwise step the optimizer inside the accumulation and not scale the loss
            world = self.engine.dp_world_size * self.engine.train_micro_batch_size_per_gpu()
            self.engine.set_train_batch_size(num_micro * world)
        # the boundary is this step's last micro-batch, said explicitly: DeepSpeed's own rule, (micro_steps + 1) %
        # accumulation == 0 over a counter that runs across steps, puts it mid-step once the count has changed
        # (2, then 3 micro-batches: the update came after the first micro-batch of the second step)
        self.engine.set_gradient_accumulation_boundary(micro_index == num_micro - 1)
        self.engine.backward(loss)
        if micro_index < num_micro - 1:
            self.engine.step()

    def optimizer_step(self) -> float:
        """Returns the pre-clip global gradient norm: DeepSpeed's under ZeRO 1-3, ours at stage 0 (``_clip``)."""
        norm = self._clip() if self.cfg.zero_stage == 0 else None
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _clip(self) -> float:
        """Stage 0: the gradients are already reduced (DeepSpeed all-reduces them at the accumulation boundary, in
        the last backward), dense ones identical on every rank, each rank holding its own experts' shard. The global
        norm is ``sqrt(|dense|^2 + sum over the expert-parallel group of |experts|^2)``; clip to ``grad_clip`` as
        the single-process runner does."""
        dense = torch.zeros((), dtype=torch.float64, device=collective_device())
        expert = torch.zeros_like(dense)
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            sq = p.grad.detach().double().pow(2).sum().to(dense.device)
            if is_expert_param(p):
                expert += sq
            else:
                dense += sq
        if self.groups is not None:
            dist.all_reduce(expert, group=self.groups.ep_group)
        norm = float((dense + expert).sqrt())
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return norm

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.engine.optimizer.state_dict(), "scheduler": self.engine.lr_scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Call after the model state is loaded: ZeRO rebuilds its fp32 partitions from the model weights."""
        zero = self.engine.optimizer
        if self.cfg.zero_stage == 0:
            zero.load_state_dict(state["optimizer"])
        else:  # ZeRO takes the list of every rank's state and reads its own (rigid, same world size) entry
            group = getattr(zero, "dp_process_group", None)
            states = [None] * dist.get_world_size(group)
            states[dist.get_rank(group)] = state["optimizer"]
            zero.load_state_dict(states, load_optimizer_states=True)
        self.engine.lr_scheduler.load_state_dict(state["scheduler"])
        resync_lr(self.engine.lr_scheduler, self.cfg.lr)


def build_runner(model: Transformer, cfg: TrainerConfig) -> Runner:
    """A ``LocalRunner`` in a single process; otherwise shard the experts (``cfg.ep_size``) and wrap DeepSpeed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if cfg.ep_size != 1:
            raise ValueError(f"ep_size {cfg.ep_size} needs a distributed run with at least that many ranks")
        return LocalRunner(model, cfg)
    init_distributed()
    pg = None
    if cfg.ep_size > 1:
        pg = create_parallel_groups(cfg.ep_size)
        shard_experts(model, pg)
    return DeepSpeedRunner(model, cfg, pg)
