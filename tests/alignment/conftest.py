"""A tiny byte-level BPE tokenizer trained in-process (no downloads) with DeepSeek-V3's special tokens."""

import pytest
from dsalign.alignment.chat import ASSISTANT_TAG, THINK_CLOSE, THINK_OPEN, USER_TAG, install_chat_template
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
CORPUS = [
    "You are a helpful assistant. Think step by step.",
    "What is 2 + 2? The answer is 4. Let me add the numbers: two plus two is four.",
    "Name a prime number larger than ten. Eleven is prime, so is thirteen.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices.",
]


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, USER_TAG, ASSISTANT_TAG, THINK_OPEN, THINK_CLOSE]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    return install_chat_template(fast)
