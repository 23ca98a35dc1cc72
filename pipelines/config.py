"""Run configuration: one YAML file per run, validated against these dataclasses (see ``schema.py``).

A run lists stages in order (``sft``, ``grpo``, ``distill``); each names its model source (a preset, a checkpoint
directory, or an earlier stage's output), its data, rewards, hyperparameters, resources and output directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .demo_task import AdditionTask
from .schema import ConfigError, YamlLoader, apply_overrides, from_dict

STAGE_KINDS = ("sft", "grpo", "distill")
SYNTHETIC_ROWS = 512  # rows a synthetic data source generates unless num_rows says otherwise


def _expect(obj: Any, key: str, ok: Callable[[Any], bool], expected: str) -> None:
    """Range check of one field; the schema prefixes the block's path (``stages[1].grpo: group_size: ...``)."""
    value = getattr(obj, key)
    if not ok(value):
        raise ValueError(f"{key}: expected {expected}, got {value!r}")


def _at_least(obj: Any, low: float, *keys: str) -> None:
    for key in keys:
        _expect(obj, key, lambda v: v >= low, f">= {low:g}")


@dataclass
class ModelSource:
    """Exactly one of ``preset``, ``checkpoint`` or ``from_stage``."""

    preset: str | None = field(default=None, metadata={"help": "tiny | small | bench | v3-671b"})
    checkpoint: str | None = field(default=None, metadata={"help": "an HF checkpoint directory"})
    from_stage: str | None = field(default=None, metadata={"help": "name of an earlier stage whose output to use"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "ModelConfig fields to change"})

    def __post_init__(self) -> None:
        given = [k for k in ("preset", "checkpoint", "from_stage") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, checkpoint, from_stage (got {given or 'none'})")


@dataclass
class DataSource:
    """Prompts (GRPO, distillation) or conversations (SFT): a local file/dir, or the built-in synthetic task."""

    path: str | None = field(default=None, metadata={"help": ".jsonl / .parquet / dataset dir"})
    synthetic: str | None = field(default=None, metadata={"help": "'addition': the demo task, generated locally"})
    num_rows: int | None = field(
        default=None,
        metadata={"help": "synthetic: rows to generate (default 512); path: the first N rows (default: all)"},
    )
    seed: int = field(default=0, metadata={"help": "synthetic generation seed"})
    length_target: int | None = field(default=None, metadata={"help": "budget written into each prompt's system turn"})
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "drop and count malformed rows (and prompts too long for the model's context) instead of "
                          "failing"},
    )
    split: str = field(default="train", metadata={"help": "path: the split of a saved DatasetDict directory"})

    def __post_init__(self) -> None:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of path or synthetic")
        if self.synthetic is not None and self.synthetic != "addition":
            raise ValueError(f"synthetic: unknown task {self.synthetic!r} (available: 'addition')")
        if self.synthetic is not None:
            self.num_rows = SYNTHETIC_ROWS if self.num_rows is None else self.num_rows
            _at_least(self, 1, "num_rows")
        else:  # 0 is also read as "all rows" (older configs)
            _expect(self, "num_rows", lambda v: v is None or v >= 0, "null (all rows) or a number of rows")
        _expect(self, "length_target", lambda v: v is None or v >= 1, "a positive number of tokens or null")


@dataclass
class RewardEntry:
    fn: str = field(metadata={"help": "built-in name, 'pkg.module:fn' or 'path/file.py:fn'"})
    weight: float = field(default=1.0, metadata={"help": "multiplies this reward in the weighted sum"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments bound to the reward"})
    timeout_s: float = field(
        default=60.0, metadata={"help": "time limit per scoring call; past it the batch counts as failed"}
    )

    def __post_init__(self) -> None:
        _expect(self, "timeout_s", lambda v: v > 0, "a positive number of seconds")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ROLLOUT_MODES = ("colocated", "split")


@dataclass
class Resources:
    """A stage's actors and where they run. Every actor (trainer workers, then rollout workers, then reward workers)
    gets one bundle of one Ray placement group, reserved before any actor starts (``pipelines/placement.py``)."""

    num_workers: int = field(default=1, metadata={"help": "trainer processes (one torch.distributed group)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per trainer worker (fractions allowed)"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per trainer worker"})
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage (0 = plain data parallel)"})
    mode: str = field(
        default="colocated",
        metadata={"help": "GRPO rollout: colocated (the trainer's own model decodes) | split (rollout workers)"},
    )
    rollout_workers: int = field(default=0, metadata={"help": "split mode: rollout actors, each with a model copy"})
    rollout_cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per rollout worker"})
    rollout_gpus_per_worker: float = field(
        default=0.0, metadata={"help": "GPUs per rollout worker (its model copy decodes there)"}
    )
    verify_weight_sync: bool = field(
        default=True,
        metadata={
            "help": "split mode: checksum every rollout worker's weights against the trainer's after each "
            "broadcast (one pass over the weights per iteration)"
        },  # fmt: skip
    )
    reward_workers: int = field(default=0, metadata={"help": "actors that score rewards (0 = in the trainer)"})
    reward_cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per reward worker"})
    placement_strategy: str = field(default="PACK", metadata={"help": " | ".join(PLACEMENT_STRATEGIES)})
    placement_timeout_s: float = field(
        default=600.0, metadata={"help": "how long to wait for the cluster to fit the stage's placement group"}
    )

    def __post_init__(self) -> None:
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"mode: expected one of {ROLLOUT_MODES}, got {self.mode!r}")
        if self.num_workers < 1 or self.ep_size < 1 or self.num_workers % self.ep_size:
            raise ValueError(
                f"num_workers ({self.num_workers}) must be a positive multiple of ep_size ({self.ep_size})"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0-3, got {self.zero_stage}")
        for key in ("rollout_workers", "reward_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        for key in ("cpus_per_worker", "rollout_cpus_per_worker", "reward_cpus_per_worker"):
            if getattr(self, key) <= 0:  # a Ray bundle must reserve something; fractions such as 0.5 are fine
                raise ValueError(f"{key}: expected a positive number of CPUs, got {getattr(self, key)}")
        for key in ("gpus_per_worker", "rollout_gpus_per_worker"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy: expected one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}"
            )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of lr (cosine)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW beta1, beta2"})

    def __post_init__(self) -> None:
        _expect(self, "lr", lambda v: v > 0, "> 0 (a zero learning rate trains nothing)")
        _at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        _expect(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "a fraction of lr in [0, 1]")
        _expect(self, "betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two AdamW betas in [0, 1)")


@dataclass
class LoraConfig:
    """LoRA adapters through peft (``alignment/trainer/lora.py``): only they train; the export is merged."""

    r: int = field(default=16, metadata={"help": "adapter rank"})
    alpha: float = field(default=32.0, metadata={"help": "scaling numerator: delta W = alpha / r * B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
        metadata={"help": "MLA projections that get adapters"},
    )
    experts: bool = field(default=False, metadata={"help": "also adapt the stacked routed experts"})

    def __post_init__(self) -> None:
        _expect(self, "r", lambda v: v >= 1, "a rank >= 1")
        _expect(self, "alpha", lambda v: v > 0, "> 0 (the adapters' scale alpha / r)")
        _expect(self, "dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)")
        _expect(self, "target_modules", lambda v: bool(v) or self.experts,
                "at least one module name (or experts: true)")  # fmt: skip


@dataclass
class TrainingConfig:
    """Precision and memory of a stage's training engine (``alignment/trainer``); the same for every stage kind."""

    compute_dtype: str = field(default="fp32", metadata={"help": "forward/backward autocast: fp32 | bf16"})
    moment_dtype: str = field(default="fp32", metadata={"help": "AdamW moments: fp32 | bf16 (DeepSeek-V3's saving)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    keep_last: int = field(default=3, metadata={"help": "resumable checkpoints kept on disk (oldest deleted)"})
    lora: LoraConfig | None = field(
        default=None, metadata={"help": "train LoRA adapters only (zero_stage <= 2); merged export"}
    )

    def __post_init__(self) -> None:
        for key in ("compute_dtype", "moment_dtype"):
            _expect(self, key, lambda v: v in ("fp32", "bf16"), "'fp32' or 'bf16'")
        _at_least(self, 1, "keep_last")


@dataclass
class SFTParams:
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "conversations per step (all workers together)"})
    max_length: int = field(
        default=256,
        metadata={"help": "tokens per conversation; longer ones are truncated (one with no assistant token left is "
                          "an error, or dropped and counted under data.skip_invalid)"},
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "conversations per forward/backward per worker (gradient accumulation); null = all at once"},
    )
    mtp_lambda: float = field(default=0.1, metadata={"help": "weight of the MTP loss (0 = MTP not trained)"})
    bias_update_gamma: float = field(
        default=0.001, metadata={"help": "speed of the aux-loss-free expert-bias update (0 = off)"}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "AdamW, warmup then cosine decay"})

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps", "batch_size")
        _expect(self, "micro_batch_size", lambda v: v is None or v >= 1, "null or >= 1")
        _at_least(self, 2, "max_length")
        _at_least(self, 0, "mtp_lambda", "bias_update_gamma")


@dataclass
class GRPOParams:
    iterations: int = field(default=40, metadata={"help": "generate-score-update rounds"})
    prompts_per_iter: int = field(default=16, metadata={"help": "prompts per round (all workers together)"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt; advantages are relative within it"})
    max_new_tokens: int = field(default=96, metadata={"help": "completion length cap"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also scales the log-probs)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    advantage: str = field(default="grpo", metadata={"help": "grpo | drgrpo | rloo"})
    policy_loss: str = field(default="ppo_clip", metadata={"help": "ppo_clip | gspo"})
    eps_low: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - eps_low"})
    eps_high: float = field(default=0.28, metadata={"help": "upper clip: ratio <= 1 + eps_high (DAPO clip-higher)"})
    dual_clip_c: float | None = field(default=None, metadata={"help": "dual-clip bound for negative advantages"})
    loss_agg: str = field(
        default="token-mean", metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm"}
    )
    kl_beta: float = field(default=0.0, metadata={"help": "weight of the KL to a frozen reference (0 = no reference)"})
    kl_estimator: str = field(default="k3", metadata={"help": "k1 | k2 | k3"})
    updates_per_batch: int = field(default=1, metadata={"help": "optimizer steps per generated batch"})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward (per worker)"})
    shared_prompts: bool = field(
        default=True, metadata={"help": "compute each prompt once per micro-batch in the update's forwards (same "
                                        "losses and gradients up to rounding; with LoRA dropout a prompt token "
                                        "draws one mask for all its samples; false: every sample recomputes it)"}
    )  # fmt: skip
    mtp_lambda: float = field(default=0.0, metadata={"help": "keep training MTP on the sampled completions (0 = off)"})
    speculative: bool = field(
        default=False, metadata={"help": "rollouts decode with MTP speculative decoding (same output distribution; "
                                         "logs rollout_mtp_acceptance; pays where a 2-token verify forward costs about "
                                         "a 1-token one, e.g. GPU decode; pair with mtp_lambda > 0 so the MTP module "
                                         "follows the policy)"}
    )  # fmt: skip
    bias_update_gamma: float = field(default=0.001, metadata={"help": "expert-bias update speed (0 = off)"})
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO: drop groups whose rewards are all equal, refill with more prompts"}
    )
    dynamic_sampling_max_rounds: int = field(
        default=4, metadata={"help": "sampling rounds an iteration may take to refill (then dropped groups fill in)"}
    )
    mask_truncated: bool = field(default=True, metadata={"help": "completions cut at max_new_tokens get no loss "
                                                                  "(their share is logged as truncated_frac)"})
    rollout_is_cap: float | None = field(
        default=None,
        metadata={"help": "truncated importance sampling: ratio against the trainer's recomputed log-probs, tokens "
                          "weighted by min(pi_old / pi_rollout, cap), e.g. 2.0 (null = off)"},  # fmt: skip
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=2),
        metadata={"help": "AdamW, warmup then cosine decay"},
    )

    def __post_init__(self) -> None:
        # names (advantage, policy_loss, loss_agg, kl_estimator) are checked against their registries in preflight
        _at_least(self, 1, "iterations", "prompts_per_iter", "max_new_tokens", "updates_per_batch", "micro_batch_size",
                  "dynamic_sampling_max_rounds")  # fmt: skip
        _expect(self, "group_size", lambda v: v >= 2, ">= 2 (advantages are relative to the other samples of a group)")
        _expect(self, "temperature", lambda v: v > 0, "> 0 (greedy samples of a group would all be equal)")
        _expect(self, "top_p", lambda v: 0 < v <= 1, "a probability mass in (0, 1]")
        _expect(self, "eps_low", lambda v: 0 <= v < 1, "a clip range in [0, 1)")
        _expect(self, "dual_clip_c", lambda v: v is None or v > 1, "null or a bound > 1")
        _expect(self, "rollout_is_cap", lambda v: v is None or v >= 1, "null or a weight bound >= 1")
        _at_least(self, 0, "eps_high", "kl_beta", "mtp_lambda", "bias_update_gamma")


DISTILL_LOSSES = ("sampled_reverse_kl", "topk_reverse_kl", "topk_forward_kl")


@dataclass
class OnPolicyParams:
    """``distill.mode: on_policy``: the student samples, the teacher scores the student's tokens."""

    steps: int = field(default=50, metadata={"help": "sample-score-update rounds"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per round (all workers together)"})
    samples_per_prompt: int = field(default=2, metadata={"help": "student completions per prompt"})
    max_new_tokens: int = field(default=96, metadata={"help": "student completion length cap"})
    temperature: float = field(default=1.0, metadata={"help": "student sampling temperature"})
    loss: str = field(
        default="sampled_reverse_kl",
        metadata={"help": "sampled_reverse_kl (per-token log p_S - log p_T as a policy-gradient cost) | "
                  "topk_reverse_kl | topk_forward_kl (over the teacher's top_k tokens per position)"},  # fmt: skip
    )
    top_k: int = field(default=32, metadata={"help": "teacher tokens per position for the topk losses"})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward (per worker)"})
    shared_prompts: bool = field(
        default=True, metadata={"help": "compute each prompt once per micro-batch in the update's forwards (same "
                                        "losses and gradients up to rounding; with LoRA dropout a prompt token "
                                        "draws one mask for all its samples; false: every sample recomputes it)"}
    )  # fmt: skip
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=2), metadata={"help": "AdamW, warmup then cosine"}
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "top_k",
                  "micro_batch_size")  # fmt: skip
        _expect(self, "temperature", lambda v: v > 0, "> 0 (the student's samples are the data)")
        _expect(self, "loss", lambda v: v in DISTILL_LOSSES, " | ".join(DISTILL_LOSSES))


@dataclass
class DistillParams:
    mode: str = field(
        default="traces",
        metadata={"help": "traces (R1: teacher traces, filtered, SFT) | on_policy (student samples, teacher scores)"},
    )
    teacher: ModelSource = field(
        default_factory=lambda: ModelSource(from_stage="grpo"),
        metadata={"help": "writes the traces (traces) / scores the student's samples (on_policy)"},
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "teacher traces sampled per prompt"})
    keep: str = field(default="best", metadata={"help": "best (best-of-k) | all (every passing trace)"})
    min_reward: float = field(default=1.0, metadata={"help": "a trace passes when its combined reward >= this"})
    require_well_formed: bool = field(default=True, metadata={"help": "need one closed <think> block + an answer"})
    max_new_tokens: int = field(default=96, metadata={"help": "teacher trace length cap"})
    temperature: float = field(default=0.7, metadata={"help": "teacher sampling temperature (0 = greedy)"})
    max_batch_size: int = field(
        default=512, metadata={"help": "decode slots of the teacher's rollout engine; lower it for large models"}
    )
    sft: SFTParams = field(default_factory=SFTParams, metadata={"help": "the student's SFT on the kept traces"})
    on_policy: OnPolicyParams = field(
        default_factory=OnPolicyParams, metadata={"help": "mode on_policy: sampling, teacher scoring and updates"}
    )

    def __post_init__(self) -> None:
        _expect(self, "mode", lambda v: v in ("traces", "on_policy"), "'traces' or 'on_policy'")
        _expect(self, "max_batch_size", lambda v: v >= 1, "a positive number of slots")  # decode slots
        _at_least(self, 1, "samples_per_prompt", "max_new_tokens")
        _at_least(self, 0, "temperature")
        _expect(self, "keep", lambda v: v in ("best", "all"), "'best' or 'all'")


@dataclass
class StageConfig:
    name: str = field(metadata={"help": "unique; names the output dir and from_stage references"})
    kind: str = field(metadata={"help": "sft | grpo | distill"})
    model: ModelSource = field(metadata={"help": "what the stage starts from"})
    data: DataSource = field(metadata={"help": "its prompts or conversations"})
    rewards: list[RewardEntry] = field(default_factory=list, metadata={"help": "GRPO and distill: combined rewards"})
    sft: SFTParams | None = field(default=None, metadata={"help": "hyperparameters of an sft stage"})
    grpo: GRPOParams | None = field(default=None, metadata={"help": "hyperparameters of a grpo stage"})
    distill: DistillParams | None = field(default=None, metadata={"help": "hyperparameters of a distill stage"})
    resources: Resources = field(default_factory=Resources, metadata={"help": "the stage's actors (README table)"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "precision and memory"})
    retries: int = field(default=1, metadata={"help": "times a failed stage restarts from its checkpoint"})
    checkpoint_every: int = field(default=20, metadata={"help": "steps between resumable checkpoints"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <run output_dir>/<stage name>"})

    def __post_init__(self) -> None:
        _expect(self, "name", lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None,
                "a plain name (letters, digits, '_', '-', '.'; it names the stage's directory)")  # fmt: skip
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"stage {self.name!r}: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if getattr(self, self.kind) is None:
            setattr(self, self.kind, {"sft": SFTParams, "grpo": GRPOParams, "distill": DistillParams}[self.kind]())
        for other in STAGE_KINDS:
            if other != self.kind and getattr(self, other) is not None:
                raise ConfigError(f"stage {self.name!r} is a {self.kind} stage but sets '{other}' parameters")
        if self.kind == "sft" and self.rewards:
            raise ConfigError(f"stage {self.name!r}: rewards apply to grpo and distill stages, not sft")
        _at_least(self, 0, "retries")
        _at_least(self, 1, "checkpoint_every")

    @property
    def params(self) -> SFTParams | GRPOParams | DistillParams:
        return getattr(self, self.kind)

    @property
    def on_policy_distill(self) -> bool:
        """A distillation stage in ``on_policy`` mode (the student samples; rewards are only logged)."""
        return self.kind == "distill" and self.distill.mode == "on_policy"


@dataclass
class EvalConfig:
    """The held-out evaluation before the first stage and after every stage: the mean ``reward`` of sampled
    completions (default ``math_accuracy`` against each prompt's ``answer``), plus format and mean length."""

    enabled: bool = field(default=True, metadata={"help": "false: no evaluations (the run's table stays empty)"})
    path: str | None = field(
        default=None,
        metadata={"help": "held-out prompt file (prompt + answer columns); null = the synthetic task's held-out set"},
    )
    num_prompts: int = field(default=200, metadata={"help": "held-out prompts (the first ones of path)"})
    split: str = field(default="test", metadata={"help": "path: the split of a saved DatasetDict directory"})
    reward: RewardEntry = field(
        default_factory=lambda: RewardEntry(fn="math_accuracy"),
        metadata={"help": "what 'accuracy' averages per sample (a failed or None sample counts as 0, with a "
                          "warning; none scored is an error); its weight is ignored"},
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "samples per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    max_new_tokens: int = field(default=96, metadata={"help": "completion length cap"})
    seed: int = field(default=12345, metadata={"help": "sampling seed"})
    max_batch_size: int = field(
        default=512, metadata={"help": "decode slots of the evaluation's rollout engine; lower it for large models"}
    )

    def __post_init__(self) -> None:
        _expect(self, "max_batch_size", lambda v: v >= 1, "a positive number of slots")  # decode slots
        _at_least(self, 1, "num_prompts", "samples_per_prompt", "max_new_tokens")
        _at_least(self, 0, "temperature")


@dataclass
class RayConfig:
    address: str | None = field(default=None, metadata={"help": "cluster address; unset = start a local Ray"})
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs of the local Ray (unset = all)"})

    def __post_init__(self) -> None:
        _expect(self, "num_cpus", lambda v: v is None or v >= 1, "null (all CPUs) or at least 1")


@dataclass
class RunConfig:
    name: str = field(metadata={"help": "the run's name (report title)"})
    output_dir: str = field(metadata={"help": "run directory: stage outputs, report, run_state.json"})
    stages: list[StageConfig] = field(metadata={"help": "run in order"})
    seed: int = field(default=0, metadata={"help": "model init, data order and sampling seeds derive from it"})
    tokenizer: str = field(default="demo", metadata={"help": "'demo' (trained locally) or an HF tokenizer dir"})
    task: AdditionTask = field(default_factory=AdditionTask, metadata={"help": "the synthetic task's knobs"})
    eval: EvalConfig = field(
        default_factory=EvalConfig,
        metadata={"help": "held-out evaluation before the first stage and after every stage"},
    )
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "where the run's actors run"})

    def __post_init__(self) -> None:
        _expect(self, "seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2**63) (torch's seed range)")
        for key in ("name", "output_dir"):
            _expect(self, key, lambda v: bool(v.strip()), "a non-empty string")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        dirs: dict[Path, str] = {}
        run_dir = Path(os.path.abspath(self.output_dir))
        for stage in self.stages:
            if stage.name in RESERVED_NAMES or stage.name.endswith(".png"):
                raise ConfigError(f"stage name {stage.name!r} is taken by a file of the run directory; pick another")
            where = Path(os.path.abspath(self.stage_dir(stage)))
            taken = next((run_dir / n for n in RESERVED_NAMES if where == run_dir / n or run_dir / n in where.parents),
                         None)  # fmt: skip
            if where == run_dir or where in run_dir.parents or taken is not None:
                what = f"the run's {taken.name}" if taken is not None else "the run directory"
                raise ConfigError(f"stage {stage.name!r}: output_dir {where} overlaps {what} ({taken or run_dir}), "
                                  "which the driver writes (and a fresh run clears stage directories); give the stage "
                                  "a directory of its own")  # fmt: skip
            for other_dir, other in dirs.items():
                if where == other_dir or other_dir in where.parents or where in other_dir.parents:
                    raise ConfigError(f"stages {other!r} and {stage.name!r} write to overlapping directories "
                                      f"({other_dir} and {where}); give each its own output_dir")  # fmt: skip
            dirs[where] = stage.name
        for i, stage in enumerate(self.stages):
            sources = [stage.model] + ([stage.distill.teacher] if stage.kind == "distill" else [])
            for src in sources:
                if src.from_stage is not None and src.from_stage not in names[:i]:
                    raise ConfigError(
                        f"stage {stage.name!r}: from_stage {src.from_stage!r} is not an earlier stage ({names[:i]})"
                    )

    def stage_dir(self, stage: StageConfig) -> Path:
        return Path(stage.output_dir) if stage.output_dir else Path(self.output_dir) / stage.name


def optimizer_steps(stage: StageConfig) -> tuple[str, int, OptimConfig]:
    """(the key of its optimizer block, its optimizer steps, that block) for a stage: what its learning-rate
    schedule spans (``stages.trainer_config``'s ``total_steps``)."""
    if stage.kind == "sft":
        return "sft.optim", stage.sft.steps, stage.sft.optim
    if stage.kind == "grpo":
        return "grpo.optim", stage.grpo.iterations * stage.grpo.updates_per_batch, stage.grpo.optim
    if stage.on_policy_distill:
        return "distill.on_policy.optim", stage.distill.on_policy.steps, stage.distill.on_policy.optim
    return "distill.sft.optim", stage.distill.sft.steps, stage.distill.sft.optim


def config_notes(cfg: RunConfig) -> list[str]:
    """Settings that run but probably not as meant (``dsalign run`` and ``config show`` print them): a warmup as
    long as the stage, whose learning rate then never reaches ``lr`` and never decays."""
    notes = []
    for i, stage in enumerate(cfg.stages):
        key, steps, optim = optimizer_steps(stage)
        if optim.warmup_steps > steps > 0:
            notes.append(f"stages[{i}] ({stage.name}).{key}.warmup_steps is {optim.warmup_steps} but the stage makes "
                         f"{steps} optimizer steps: its learning rate peaks at {steps / optim.warmup_steps:.2g}x lr "
                         "and never decays")  # fmt: skip
    return notes


# what the driver writes at the top of the run directory (and each plot, NAME.png), where a stage named so would put
# its own directory
RESERVED_NAMES = ("report.md", "run_state.json", "config.resolved.json", "tokenizer", "tokenizer.tmp", "tokenizer.old")

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # what ``dsalign demo`` runs


class _StrictLoader(YamlLoader):
    """``YamlLoader`` that refuses a key given twice in one mapping (PyYAML would keep the last silently). Keys
    brought in by a merge (``<<: *defaults``) may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                continue  # unhashable or odd keys: PyYAML's own construction reports them
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} is given twice (first {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def read_config_data(path: str | Path) -> dict[str, Any]:
    """A run config file's plain data (not validated yet); errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the run's YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def config_from_data(data: dict[str, Any], overrides: list[str] | None = None, where: str = "") -> RunConfig:
    """Override and validate run-config data; errors are prefixed with ``where`` (the file) when given."""
    try:
        return from_dict(RunConfig, apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from e


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; errors name the file and the offending key path."""
    return config_from_data(read_config_data(path), overrides, str(path))
