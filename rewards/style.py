"""Style rewards: markdown use and language consistency.

Language consistency is DeepSeek-R1's reward against language mixing (arXiv:2501.12948, section 2.3.2): the share of
the answer written in the prompt's language. We approximate "language" by Unicode script (Latin, CJK, Cyrillic, ...),
which needs no model and separates the mixings seen in practice (Chinese reasoning for an English question); it
cannot tell English from French. Math (``$...$``, LaTeX commands) and code are ignored so that ``x`` and ``\\frac``
in a Chinese answer do not count as English.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from .api import completion_text, last_user_text, register_reward

_MARKDOWN = re.compile(
    r"^\s{0,3}#{1,6}\s"  # header
    r"|(?<![\w*])(\*\*|__)(?=\S)[^*_\n]+?(?<=\S)\1(?![\w*])"  # bold, not x**2 + y**2 or a ** 2
    r"|^\s*[-*+]\s+\S|^\s*\d+\.\s+\S"  # list items
    r"|^\s{0,3}```"  # code fence (up to 3 spaces of indentation, as CommonMark)
    r"|^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$"  # a table's delimiter row
    r"|^\s*\|[^|\n]*\|[^|\n]*\|"  # a row of two or more cells (an absolute value |a - b| has one)
    r"|\[[^\]\n]+\]\([^)\n]+\)",  # link
    re.MULTILINE,
)
# Math and code are not prose. Inline math is pandoc's: $ then a non-space, a closing $ after a non-space and not
# followed by a digit, on one line, so the text between two amounts ("$2 ... $18") stays prose. Only real tags go.
_NOT_PROSE = re.compile(
    r"```.*?```|\$\$.*?\$\$|\$(?=\S)[^$\n]*?(?<=\S)\$(?!\d)|\\[a-zA-Z]+|`[^`\n]*`|</?[A-Za-z][\w-]*>", re.DOTALL
)
_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI", "THAI")


def uses_markdown(text: str) -> bool:
    """Whether ``text`` contains markdown structure (headers, bold, lists, fences, tables, links).

    >>> uses_markdown("## Plan\\n- step one"), uses_markdown("Plain prose, 2 * 3 = 6.")
    (True, False)
    """
    return _MARKDOWN.search(text) is not None


@register_reward("markdown_style")
def markdown_style(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    mode: str = "avoid",
    **columns: Any,
) -> list[float]:
    """``mode="avoid"``: 1.0 for plain text (e.g. voice or API answers); ``mode="require"``: 1.0 when markdown is used.

    >>> markdown_style([""] * 2, ["**Bold** claim", "plain claim"])
    [0.0, 1.0]
    >>> markdown_style([""] * 2, ["**Bold** claim", "plain claim"], mode="require")
    [1.0, 0.0]
    """
    if mode not in ("avoid", "require"):
        raise ValueError(f"markdown_style mode must be 'avoid' or 'require', got {mode!r}")
    want = mode == "require"
    return [1.0 if uses_markdown(completion_text(c)) == want else 0.0 for c in completions]


def script_of(char: str) -> str | None:
    """The Unicode script family of a letter (``"LATIN"``, ``"CJK"``, ...), ``None`` for digits, punctuation, space.

    >>> script_of("a"), script_of("中"), script_of("я"), script_of("7")
    ('LATIN', 'CJK', 'CYRILLIC', None)
    """
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    for script in _SCRIPTS:
        if name.startswith(script):
            return script
    return "LATIN" if name.startswith("LATIN") else "OTHER"


def script_counts(text: str) -> Counter:
    """Letters per script in the prose of ``text`` (math, code and tags removed)."""
    return Counter(s for s in map(script_of, _NOT_PROSE.sub(" ", text)) if s is not None)


@register_reward("language_consistency")
def language_consistency(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **columns: Any
) -> list[float | None]:
    """Share of the completion's letters in the prompt's dominant script; ``None`` if either has no letters.

    CJK ideographs carry a word each while Latin words span several letters, so a CJK character counts as 3 letters.

    >>> language_consistency(["What is 2+2?", "2+2等于几？"], ["It is $4$.", "等于4, that is four"])
    [1.0, 0.375]
    """
    return [_consistency(last_user_text(p), completion_text(c)) for p, c in zip(prompts, completions, strict=True)]


def _consistency(prompt: str, completion: str) -> float | None:
    weight = {"CJK": 3, "HIRAGANA": 3, "KATAKANA": 3, "HANGUL": 2, "JAPANESE": 3}
    prompt_counts, completion_counts = script_counts(prompt), script_counts(completion)
    if not prompt_counts or not completion_counts:
        return None
    if prompt_counts["HIRAGANA"] or prompt_counts["KATAKANA"]:  # Japanese writes kanji and kana together
        prompt_counts, completion_counts = _japanese(prompt_counts), _japanese(completion_counts)
    target = max(prompt_counts, key=lambda s: prompt_counts[s] * weight.get(s, 1))
    weighted = {s: n * weight.get(s, 1) for s, n in completion_counts.items()}
    return round(weighted.get(target, 0) / sum(weighted.values()), 4)


def _japanese(counts: Counter) -> Counter:
    """Kanji (CJK), hiragana and katakana counted as one script, for a Japanese prompt."""
    merged = Counter({s: n for s, n in counts.items() if s not in ("CJK", "HIRAGANA", "KATAKANA")})
    merged["JAPANESE"] = counts["CJK"] + counts["HIRAGANA"] + counts["KATAKANA"]
    return +merged
