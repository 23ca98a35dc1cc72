"""Run configuration: one YAML file per run, validated against these dataclasses (see ``schema.py``).

A run lists stages in order (``sft``, ``grpo``, ``distill``); each names its model source (a preset, a checkpoint
directory, or an earlier stage's output), its data, rewards, hyperparameters, resources and output directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .demo_task import AdditionTask
from .schema import ConfigError, apply_overrides, from_dict

STAGE_KINDS = ("sft", "grpo", "distill")


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
            raise ConfigError(f"model: give exactly one of preset, checkpoint, from_stage (got {given or 'none'})")


@dataclass
class DataSource:
    """Prompts (GRPO, distillation) or conversations (SFT): a local file/dir, or the built-in synthetic task."""

    path: str | None = field(default=None, metadata={"help": ".jsonl / .parquet / dataset dir"})
    synthetic: str | None = field(default=None, metadata={"help": "'addition': the demo task, generated locally"})
    num_rows: int = field(default=512, metadata={"help": "rows to generate (synthetic) or use (0 = all)"})
    seed: int = field(default=0, metadata={"help": "synthetic generation seed"})
    length_target: int | None = field(default=None, metadata={"help": "budget written into each prompt's system turn"})
    skip_invalid: bool = field(default=False, metadata={"help": "drop and count malformed rows instead of failing"})

    def __post_init__(self) -> None:
        if (self.path is None) == (self.synthetic is None):
            raise ConfigError("data: give exactly one of path or synthetic")
        if self.synthetic is not None and self.synthetic != "addition":
            raise ConfigError(f"data.synthetic: unknown task {self.synthetic!r} (available: 'addition')")


@dataclass
class RewardEntry:
    fn: str = field(metadata={"help": "built-in name, 'pkg.module:fn' or 'path/file.py:fn'"})
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments bound to the reward"})
    timeout_s: float = 60.0


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ROLLOUT_MODES = ("colocated", "split")


@dataclass
class Resources:
    """A stage's actors and where they run. Every actor (trainer workers, then rollout workers, then reward workers)
    gets one bundle of one Ray placement group, reserved before any actor starts (``pipelines/placement.py``)."""

    num_workers: int = field(default=1, metadata={"help": "trainer processes (one torch.distributed group)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per trainer worker (fractions allowed)"})
    gpus_per_worker: float = 0.0
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage (0 = plain data parallel)"})
    mode: str = field(
        default="colocated",
        metadata={"help": "GRPO rollout: colocated (the trainer's own model decodes) | split (rollout workers)"},
    )
    rollout_workers: int = field(default=0, metadata={"help": "split mode: rollout actors, each with a model copy"})
    rollout_cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per rollout worker"})
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
            raise ConfigError(f"resources.mode: expected one of {ROLLOUT_MODES}, got {self.mode!r}")
        if self.num_workers < 1 or self.ep_size < 1 or self.num_workers % self.ep_size:
            raise ConfigError(
                f"resources: num_workers ({self.num_workers}) must be a positive multiple of ep_size ({self.ep_size})"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"resources.zero_stage: expected 0-3, got {self.zero_stage}")
        for key in ("rollout_workers", "reward_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"resources.{key}: expected 0 or more, got {getattr(self, key)}")
        for key in ("cpus_per_worker", "rollout_cpus_per_worker", "reward_cpus_per_worker"):
            if getattr(self, key) <= 0:  # a Ray bundle must reserve something; fractions such as 0.5 are fine
                raise ConfigError(f"resources.{key}: expected a positive number of CPUs, got {getattr(self, key)}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"resources.gpus_per_worker: expected 0 or more, got {self.gpus_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"resources.placement_strategy: expected one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class SFTParams:
    steps: int = 200
    batch_size: int = 32
    max_length: int = 256
    mtp_lambda: float = 0.1
    bias_update_gamma: float = 0.001
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class GRPOParams:
    iterations: int = 40
    prompts_per_iter: int = 16
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = field(default="grpo", metadata={"help": "grpo | drgrpo | rloo"})
    policy_loss: str = field(default="ppo_clip", metadata={"help": "ppo_clip | gspo"})
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float | None = None
    loss_agg: str = field(default="token-mean", metadata={"help": "token-mean | seq-mean-token-mean | ..."})
    kl_beta: float = field(default=0.0, metadata={"help": "0 = no reference model"})
    kl_estimator: str = "k3"
    updates_per_batch: int = field(default=1, metadata={"help": "optimizer steps per generated batch"})
    micro_batch_size: int = 32
    mtp_lambda: float = 0.0
    bias_update_gamma: float = 0.001
    dynamic_sampling: bool = field(default=False, metadata={"help": "drop zero-variance groups"})
    mask_truncated: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=2))


def _check_slots(max_batch_size: int) -> None:
    """Decode slots of a rollout engine (``eval`` and ``distill``); the schema prefixes the key's path."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected a positive number of slots, got {max_batch_size}")


@dataclass
class DistillParams:
    teacher: ModelSource = field(default_factory=lambda: ModelSource(from_stage="grpo"))
    samples_per_prompt: int = 4
    keep: str = field(default="best", metadata={"help": "best (best-of-k) | all (every passing trace)"})
    min_reward: float = field(default=1.0, metadata={"help": "a trace passes when its combined reward >= this"})
    require_well_formed: bool = field(default=True, metadata={"help": "need one closed <think> block + an answer"})
    max_new_tokens: int = 96
    temperature: float = 0.7
    max_batch_size: int = field(
        default=512, metadata={"help": "decode slots of the teacher's rollout engine; lower it for large models"}
    )
    sft: SFTParams = field(default_factory=SFTParams)

    def __post_init__(self) -> None:
        _check_slots(self.max_batch_size)


@dataclass
class StageConfig:
    name: str
    kind: str = field(metadata={"help": "sft | grpo | distill"})
    model: ModelSource
    data: DataSource
    rewards: list[RewardEntry] = field(default_factory=list)
    sft: SFTParams | None = None
    grpo: GRPOParams | None = None
    distill: DistillParams | None = None
    resources: Resources = field(default_factory=Resources)
    retries: int = field(default=1, metadata={"help": "times a failed stage restarts from its checkpoint"})
    checkpoint_every: int = field(default=20, metadata={"help": "steps between resumable checkpoints"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <run output_dir>/<stage name>"})

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"stage {self.name!r}: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if getattr(self, self.kind) is None:
            setattr(self, self.kind, {"sft": SFTParams, "grpo": GRPOParams, "distill": DistillParams}[self.kind]())
        for other in STAGE_KINDS:
            if other != self.kind and getattr(self, other) is not None:
                raise ConfigError(f"stage {self.name!r} is a {self.kind} stage but sets '{other}' parameters")

    @property
    def params(self) -> SFTParams | GRPOParams | DistillParams:
        return getattr(self, self.kind)


@dataclass
class EvalConfig:
    num_prompts: int = 200
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    seed: int = 12345
    max_batch_size: int = field(
        default=512, metadata={"help": "decode slots of the evaluation's rollout engine; lower it for large models"}
    )

    def __post_init__(self) -> None:
        _check_slots(self.max_batch_size)


@dataclass
class RayConfig:
    address: str | None = field(default=None, metadata={"help": "cluster address; unset = start a local Ray"})
    num_cpus: int | None = None


@dataclass
class RunConfig:
    name: str
    output_dir: str
    stages: list[StageConfig]
    seed: int = 0
    tokenizer: str = field(default="demo", metadata={"help": "'demo' (trained locally) or an HF tokenizer dir"})
    task: AdditionTask = field(default_factory=AdditionTask)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            sources = [stage.model] + ([stage.distill.teacher] if stage.kind == "distill" else [])
            for src in sources:
                if src.from_stage is not None and src.from_stage not in names[:i]:
                    raise ConfigError(
                        f"stage {stage.name!r}: from_stage {src.from_stage!r} is not an earlier stage ({names[:i]})"
                    )

    def stage_dir(self, stage: StageConfig) -> Path:
        return Path(stage.output_dir) if stage.output_dir else Path(self.output_dir) / stage.name


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; errors name the file and the offending key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        data = apply_overrides(data, overrides or [])
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
