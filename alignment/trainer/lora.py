"""LoRA through peft on the MLA projections and, optionally, the stacked routed experts.

peft injects adapters in place into our ``Transformer`` (no wrapper class around it): the MLA projections are
``nn.Linear`` (or ``FP8Linear``) modules named ``q_a_proj``/``q_b_proj`` (``q_proj`` without q_lora),
``kv_a_proj_with_mqa``, ``kv_b_proj`` and ``o_proj``; the experts are stacked ``nn.Parameter`` tensors
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) that peft adapts through
``target_parameters``. Every base parameter is frozen, so
``build_optimizer`` only sees the adapters.

Generation needs no merge: the absorbed MLA decode reads ``kv_b_proj``'s weight through
``model.layers.applied_weight``, which adds the active adapters. ``export_merged`` merges and writes the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dsalign.model import Transformer, save_checkpoint

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class LoraSettings:
    """Which modules get adapters and how large they are."""

    r: int = field(default=16, metadata={"help": "adapter rank"})
    alpha: float = field(default=32.0, metadata={"help": "scaling numerator: delta W = alpha / r * B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION_TARGETS, metadata={"help": "module names (nn.Linear) that get adapters"}
    )
    experts: bool = field(default=False, metadata={"help": "also adapt the stacked routed experts"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoraSettings: r must be >= 1, got {self.r}")
        unknown = sorted(set(self.target_modules) - set(ATTENTION_TARGETS))
        if unknown:
            raise ValueError(f"LoraSettings: target_modules {unknown} are not MLA projections; "
                             f"choose from {list(ATTENTION_TARGETS)}")  # fmt: skip


def apply_lora(model: Transformer, settings: LoraSettings | None = None) -> Any:
    """Inject adapters in place and freeze everything else; returns peft's ``LoraModel`` (keep it for merging).

    Call ``model(...)`` as before; the returned object is only needed by ``merge_lora``.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    settings = settings or LoraSettings()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in settings.target_modules if t in present]
    if not targets:
        raise ValueError(f"apply_lora: none of {list(settings.target_modules)} exists in the model")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        target_parameters=list(EXPERT_TARGETS) if settings.experts else None,
    )
    lora_model = LoraModel(model, config, "default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return lora_model


def lora_state_dict(model: Transformer) -> dict[str, Any]:
    """What a LoRA run changes, so base + this is the trained model: the adapter tensors and the router biases
    (``e_score_correction_bias``: the bias update keeps balancing the experts during LoRA training). Small."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or k.endswith("e_score_correction_bias")}


def has_adapters(model: Transformer) -> bool:
    """Whether peft has injected (unmerged or merged) adapter layers into ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged_state_dict(model: Transformer) -> dict[str, Any]:
    """The merged network's state dict (adapters folded in, peft's ``base_layer``/``lora_`` keys gone), ``model``
    left as it is. Only the adapted weights are new tensors (``W + scale * B A``, added as peft's merge adds it);
    every other entry is the model's own tensor, so the extra memory is the adapted weights, not a model copy. The
    plain ``state_dict()`` when the model has no adapters. For engines that load plain weights (split-mode rollout
    workers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = model.state_dict()
    if not has_adapters(model):
        return state
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer) or module.merged:
                continue
            base, path = module, name
            while isinstance(base, BaseTunerLayer):  # nested wrappers: one per adapted expert tensor
                base, path = base.base_layer, f"{path}.base_layer"
            key = f"{path}.{getattr(module, 'parameter_name', None) or 'weight'}"
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def merge_lora(lora_model: Any) -> Transformer:
    """Fold ``B A * alpha / r`` into the base weights and remove the adapter modules; returns the plain model."""
    from .step import refresh_fp8_weights

    model = lora_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    # peft folds the delta in through .data, which moves neither a weight's version counter nor its address: the
    # FP8 copies of the merged weights would keep serving the base weights to every later forward
    refresh_fp8_weights(model)
    return model


def export_merged(lora_model: Any, path: str | Path, **kwargs: Any) -> Path:
    """Merge (in place: the model becomes the merged network) and write the HF checkpoint
    (``dsalign.model.save_checkpoint``) that transformers and serving load."""
    return save_checkpoint(merge_lora(lora_model), path, **kwargs)
