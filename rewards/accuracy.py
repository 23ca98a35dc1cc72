"""``math_accuracy``: is the completion's final answer mathematically equal to the gold answer?

The final answer is *extracted* first (last ``\\boxed{}``, else "the answer is ...", else the last number) and only
that short string is handed to ``math-verify``, parsed as LaTeX. We never use math-verify's expression extractor:
it calls ``sympy.parse_expr``, which runs ``eval`` on the text, and model output must never reach ``eval``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any

from .api import completion_text, register_reward

logger = logging.getLogger("dsalign.rewards")

MAX_ANSWER_CHARS = 500
CAS_TIMEOUT_S = 3  # math-verify's own limit on parsing and on comparing (where its signal-based timeout can run)

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
# Answers sympy might spend unbounded time on (an integer power or factorial is evaluated eagerly, and
# 10^{9999 \cdot 9999} is a number with 10^8 digits): these are compared in a killable child process (isolated.py).
_RISKY = re.compile(r"\^|!|\*\*|\\(?:binom|dbinom|tbinom|choose|int|iint|oint|sum|prod|lim)(?![a-zA-Z])")
# Markdown emphasis around an answer ("The answer is **42**.", "**Answer:** 7"): a run of asterisks that does not
# sit between two operands ("2**10", "3*4") or between two spaces ("2 * 3").
_ASTERISKS = re.compile(r"\*{1,3}")
_PYTHON_POWER = re.compile(r"\*\*\s*(-?[\w.]+|\([^()]*\))")


def extract_answer(text: str) -> str | None:
    """The final-answer string of a completion, or ``None`` when it gives none.

    Reasoning inside ``<think>...</think>`` is skipped; an unclosed ``<think>`` means no answer was given.

    >>> extract_answer(r"<think>maybe 3</think>So the answer is \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("The answer is 42.")
    '42'
    >>> extract_answer("3 apples plus 4 apples make 7 apples")
    '7'
    >>> extract_answer("<think>still thinking about 5") is None
    True
    """
    if "<think>" in text and "</think>" not in text:
        return None
    text = _strip_emphasis(text.rsplit("</think>", 1)[-1])
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "\\boxed{" in text or "\\fbox{" in text:
        return None  # an unclosed box: the model was cut off mid-answer; a number inside must not count
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().strip("$").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _strip_emphasis(text: str) -> str:
    """``text`` without markdown bold/italic asterisks; multiplication and power operators are kept.

    >>> _strip_emphasis("**Answer:** the answer is *2**10* or 2 * 512.")
    'Answer: the answer is 2**10 or 2 * 512.'
    """

    def keep(match: re.Match) -> str:
        before = text[match.start() - 1] if match.start() > 0 else " "
        after = text[match.end()] if match.end() < len(text) else " "
        between_operands = (before.isalnum() or before in ")]}") and (after.isalnum() or after in "([{\\-+")
        return match.group() if between_operands or (before.isspace() and after.isspace()) else ""

    return _ASTERISKS.sub(keep, text)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), matching nested braces by hand."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


@register_reward("math_accuracy")
def math_accuracy(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    answer: list[Any] | None = None,
    solution: list[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 if the extracted final answer equals the gold answer (``answer`` column, else ``solution``), else 0.0.

    ``None`` when the gold is missing or unparseable (nothing to compare against). Equality is math-verify's:
    ``0.5 == \\frac{1}{2}``, ``\\frac{2}{4} == \\frac12``, units like ``cm`` are dropped. This is the rule-based
    accuracy reward of DeepSeek-R1 (arXiv:2501.12948, section 2.2.2).

    >>> math_accuracy(["1/2+1/4?"] * 3, [r"\\boxed{\\frac{3}{4}}", "The answer is 0.75.", "I think 1"],
    ...               answer=["3/4"] * 3)
    [1.0, 1.0, 0.0]
    """
    gold_column = answer if answer is not None else solution
    if gold_column is None:
        raise ValueError(f"math_accuracy needs a gold column 'answer' or 'solution'; got columns {sorted(columns)}")
    return [_score(completion_text(c), gold) for c, gold in zip(completions, gold_column, strict=True)]


def gold_missing(gold: Any) -> bool:
    """No gold answer to compare against: absent, empty, or NaN (a Parquet / pandas null); ``math_accuracy``
    scores such a sample None, and preflight refuses rows without one."""
    return gold is None or (isinstance(gold, float) and math.isnan(gold)) or str(gold).strip() == ""


def _score(text: str, gold: Any) -> float | None:
    if gold_missing(gold):
        return None
    gold_text = str(gold)
    gold_answer = extract_answer(gold_text) if ("\\boxed" in gold_text or "answer" in gold_text.lower()) else None
    gold_answer = (gold_answer or gold_text).strip().strip("$").strip()
    predicted = extract_answer(text)
    if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
        return 0.0
    if not (_RISKY.search(predicted) or _RISKY.search(gold_answer)):
        return compare_answers(predicted, gold_answer)
    from .isolated import TIMED_OUT, shared_scorer

    scorer = shared_scorer()
    score = scorer.score(predicted, gold_answer)
    if score is TIMED_OUT:
        logger.warning("math_accuracy: comparing %r with gold %r took over %.0f s (the child was killed); compared "
                       "them as strings instead", predicted[:100], gold_answer[:100], scorer.timeout_s)  # fmt: skip
        return float(_squash(predicted) == _squash(gold_answer))
    return score


def compare_answers(predicted: str, gold_answer: str) -> float | None:
    """math-verify's verdict on two extracted answers: 1.0 equal, 0.0 not, ``None`` for an unparseable gold. A
    prediction math-verify cannot parse is compared with the gold as a whitespace-free string."""
    gold_parsed = _parse(gold_answer)
    if not gold_parsed:
        return None
    predicted_parsed = _parse(predicted)
    if not predicted_parsed:
        return float(_squash(predicted) == _squash(gold_answer))
    from math_verify import verify

    return float(verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout(CAS_TIMEOUT_S)))


def _parse(answer: str) -> list[Any]:
    """math-verify's LaTeX parser only (no ``parse_expr``/``eval``), on ``$answer$``."""
    from math_verify import LatexExtractionConfig, parse

    # math-verify's default normalization (units, malformed_operators and nits on: \frac12, \sqrt2, "5 cm"); a
    # NormalizationConfig(units=True) of our own had turned the other two off
    config = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=True)
    answer = _PYTHON_POWER.sub(r"^{\1}", answer)  # 2**10 as LaTeX; "2^10" would read as 2^1 followed by 0
    timeout = _timeout(CAS_TIMEOUT_S)
    return parse(f"${answer}$", extraction_config=[config], fallback_mode="no_fallback", parsing_timeout=timeout)


def _timeout(seconds: int) -> int | None:
    """math-verify times out with ``signal.alarm``, which only works in the main thread; elsewhere we pass ``None``
    (and silence its warning): answers that could take unbounded time go to the killable child (``isolated.py``),
    where this runs in the main thread; the rest rely on the combiner's per-reward timeout."""
    if threading.current_thread() is threading.main_thread():
        return seconds
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None


def _squash(answer: str) -> str:
    return re.sub(r"\s+|\\[,;!]|\\left|\\right", "", answer)
