"""``think_format``: DeepSeek-R1's format reward (arXiv:2501.12948, section 2.2.2).

The completion must open with exactly one ``<think>...</think>`` block and then give a non-empty answer. Stricter
than TRL's ``think_format_reward`` on purpose: TRL accepts an empty answer after ``</think>``, which a policy learns
to exploit by stopping right after thinking.
"""

from __future__ import annotations

import re
from typing import Any

from .api import completion_text, register_reward

_THINK = re.compile(r"\A\s*<think>(.*?)</think>(.*)\Z", re.DOTALL)


@register_reward("think_format")
def think_format(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **columns: Any
) -> list[float]:
    """1.0 for ``<think>reasoning</think>answer`` with one think block and a non-empty answer, else 0.0.

    A prompt whose text ends with ``<think>`` (R1's template with thinking on, ``alignment.chat`` with
    ``thinking=True``) has opened the block already: its completion is ``reasoning</think>answer``.

    >>> think_format([""] * 4, ["<think>a</think>b", "<think>a</think>  ", "b<think>a</think>c",
    ...                         "<think>a</think><think>x</think>b"])
    [1.0, 0.0, 0.0, 0.0]
    >>> think_format(["<｜User｜>2+3?<｜Assistant｜><think>\\n"], ["2 plus 3 is 5\\n</think>\\n\\nThe answer is 5."])
    [1.0]
    """
    return [_well_formed(_opened(p) + completion_text(c)) for p, c in zip(prompts, completions, strict=True)]


def _opened(prompt: Any) -> str:
    """``"<think>"`` when a string prompt ends inside an opened think block (its completion starts mid-block)."""
    return "<think>" if isinstance(prompt, str) and prompt.rstrip().endswith("<think>") else ""


def _well_formed(text: str) -> float:
    match = _THINK.match(text)
    if match is None:
        return 0.0
    thought, answer = match.groups()
    if "<think>" in thought or "<think>" in answer or "</think>" in answer:
        return 0.0
    return 1.0 if answer.strip() else 0.0
