"""Trainer configuration: one typed dataclass shared by SFT, GRPO and distillation (docs/SPEC.md section 7 defaults).

The trainer knows nothing about the loss; everything here is about the optimizer step, MoE balancing,
precision, distribution and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainerConfig:
    """Knobs of the training engine. Defaults follow the DeepSeek-V3 report where it gives one."""

    # optimizer and schedule
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (after warmup)"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled AdamW weight decay on matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    moment_dtype: str = field(default="fp32", metadata={"help": "AdamW moments dtype: fp32 or bf16 (V3 saving)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps from 0 to lr"})
    total_steps: int = field(default=1000, metadata={"help": "schedule length; cosine decays to min_lr_ratio"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 disables)"})
    micro_batches: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    # MoE balancing and MTP
    bias_update_gamma: float = field(
        default=0.001, metadata={"help": "aux-loss-free bias update speed (V3: 0.001); 0 disables"}
    )
    bias_update_center: bool = field(default=False, metadata={"help": "zero-mean bias updates (torchtitan)"})
    aux_loss_alpha: float | None = field(
        default=None, metadata={"help": "sequence-wise balance loss alpha; None keeps the model config's"}
    )
    mtp_lambda: float = field(default=0.1, metadata={"help": "MTP loss weight for lm_loss_fn (0 turns MTP off)"})
    # precision and memory
    compute_dtype: str = field(default="fp32", metadata={"help": "forward/backward autocast dtype: fp32 or bf16"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    retain_host_memory: bool = field(
        default=True,
        metadata={"help": "CPU: glibc keeps freed memory for reuse (no per-step page faults; trainer/hostmem.py)"},
    )
    # distribution
    zero_stage: int = field(
        default=2, metadata={"help": "DeepSpeed ZeRO stage when distributed: 0-2, or 3 without expert parallelism"}
    )
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size (divides world and experts)"})
    # checkpoints
    keep_last: int = field(default=3, metadata={"help": "training checkpoints kept on disk (oldest deleted)"})
    seed: int = field(default=0, metadata={"help": "seed for torch / python / numpy RNGs"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"TrainerConfig: {msg}")

        for name in ("lr", "weight_decay", "beta1", "beta2", "eps", "min_lr_ratio", "grad_clip", "bias_update_gamma",
                     "mtp_lambda"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
        for name in ("micro_batches", "zero_stage", "ep_size", "keep_last", "total_steps", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            bad(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.eps <= 0 or self.weight_decay < 0:
            bad(f"need eps > 0 and weight_decay >= 0, got {self.eps} and {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:  # below 0 the cosine's tail would be gradient ascent
            bad(f"min_lr_ratio must be in [0, 1] (the final lr as a fraction of lr), got {self.min_lr_ratio}")
        if self.moment_dtype not in ("fp32", "bf16"):
            bad(f"moment_dtype must be 'fp32' or 'bf16', got {self.moment_dtype!r}")
        if self.compute_dtype not in ("fp32", "bf16"):
            bad(f"compute_dtype must be 'fp32' or 'bf16', got {self.compute_dtype!r}")
        if self.micro_batches < 1:
            bad(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.zero_stage not in (0, 1, 2, 3):
            bad(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 3 and self.ep_size > 1:
            bad(f"zero_stage 3 does not work with expert parallelism (ep_size {self.ep_size}): DeepSpeed's ZeRO-3 "
                "accepts expert parameters only from its own AutoEP layers (docs/TRAINING.md); use zero_stage 0-2 "
                "with ep_size > 1, or ep_size 1 with zero_stage 3")  # fmt: skip
        if self.ep_size < 1:
            bad(f"ep_size must be >= 1, got {self.ep_size}")
        if self.keep_last < 1:
            bad(f"keep_last must be >= 1, got {self.keep_last}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            bad(f"need total_steps >= 1 and warmup_steps >= 0, got {self.total_steps} and {self.warmup_steps}")
        if self.bias_update_gamma < 0 or self.grad_clip < 0 or self.mtp_lambda < 0:
            bad("bias_update_gamma, grad_clip and mtp_lambda must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerConfig:
        """Build from a YAML/JSON mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)
