"""Rollout tests: tiny models, one CPU thread (the machine is shared; OpenMP threads spin badly under load)."""

from __future__ import annotations

import pytest
import torch
from dsalign.model import ModelConfig, Transformer


class ByteTokenizer:
    """Token id = byte value (the tiny preset's vocabulary is 256): enough for stop strings and text."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("latin-1"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("latin-1")


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny").replace(**changes)).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(old)
