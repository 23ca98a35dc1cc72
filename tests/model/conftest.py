"""Shared fixtures for model tests: random tiny configs and a transformers reference built from the same config."""

from __future__ import annotations

import pytest
import torch
from dsalign.model import ModelConfig

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**changes)


def hf_reference(cfg: ModelConfig, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM with random weights (and a non-zero routing bias), fp32, eval mode."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.uniform_(0.0, 0.1)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
