"""dsalign.model: the DeepSeek-V3 network (MLA, DeepSeekMoE, MTP) and its HF checkpoint format."""

from .cache import FP8LatentCache, LatentCache
from .checkpoint import build_model, check_checkpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .moe import apply_bias_update, bias_update_delta, load_imbalance, sequence_balance_loss, token_sequences
from .transformer import (
    ModelOutput,
    Transformer,
    build_attention_mask,
    causal_lm_loss,
    mtp_acceptance,
    mtp_loss,
    next_token_targets,
)

__all__ = [
    "PRESETS",
    "FP8LatentCache",
    "LatentCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "apply_bias_update",
    "bias_update_delta",
    "build_attention_mask",
    "build_model",
    "check_checkpoint",
    "causal_lm_loss",
    "load_checkpoint",
    "load_imbalance",
    "mtp_acceptance",
    "mtp_loss",
    "next_token_targets",
    "save_checkpoint",
    "sequence_balance_loss",
    "token_sequences",
]
