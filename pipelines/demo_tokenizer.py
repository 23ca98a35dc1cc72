"""Train the demo's tokenizer locally (no download) and save it in the HF format with the chat template.

Byte-level BPE with digits split individually (so ``47`` is ``4`` ``7`` and column arithmetic stays learnable) and
DeepSeek-V3's special tokens, wrapped in ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained`` and
``apply_chat_template`` work on the saved directory.
"""

from __future__ import annotations

from pathlib import Path

from dsalign.alignment.chat import ASSISTANT_TAG, THINK_CLOSE, THINK_OPEN, USER_TAG, install_chat_template
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER_TAG, ASSISTANT_TAG, THINK_OPEN, THINK_CLOSE]


def task_tokenizer(task) -> PreTrainedTokenizerFast:
    """The run's ``tokenizer: demo``: trained on the synthetic task's texts (deterministic in the task's knobs)."""
    from .demo_task import corpus_for_tokenizer

    return train_tokenizer(corpus_for_tokenizer(task))


def train_tokenizer(texts: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": [USER_TAG, ASSISTANT_TAG, THINK_OPEN, THINK_CLOSE]})
    install_chat_template(fast, overwrite=True)
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path
