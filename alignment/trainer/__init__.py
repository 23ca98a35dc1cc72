"""dsalign.alignment.trainer: the training engine shared by SFT, GRPO and distillation.

The loop calls named steps (``train_step`` = ``forward_backward`` per micro-batch, ``Runner.optimizer_step``,
``reduce_expert_counts``, ``update_router_bias``, ``expert_load_metrics``); the loss is a function handed in.
"""

from .checkpoint import (
    CheckpointMismatch,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .config import TrainerConfig
from .hostmem import retain_host_memory
from .optim import AdamW, build_optimizer, build_scheduler, lr_factor, param_groups
from .step import (
    ExpertLoadTracker,
    LocalRunner,
    LossFn,
    Runner,
    expert_load_metrics,
    forward_backward,
    lm_loss_fn,
    prepare_model,
    reduce_expert_counts,
    train_step,
    update_router_bias,
)

__all__ = [
    "CheckpointMismatch",
    "AdamW",
    "ExpertLoadTracker",
    "LocalRunner",
    "LossFn",
    "Runner",
    "TrainerConfig",
    "build_optimizer",
    "build_scheduler",
    "expert_load_metrics",
    "export_hf",
    "forward_backward",
    "latest_checkpoint",
    "list_checkpoints",
    "lm_loss_fn",
    "load_training_checkpoint",
    "lr_factor",
    "param_groups",
    "prepare_model",
    "reduce_expert_counts",
    "retain_host_memory",
    "save_training_checkpoint",
    "train_step",
    "update_router_bias",
]
