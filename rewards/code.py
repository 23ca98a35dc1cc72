"""``code_execution``: run the completion's Python code block against the row's tests in the sandbox.

The solution and each test run in one sandboxed interpreter: the solution is executed as a module named
``__solution__`` (so its ``if __name__ == "__main__":`` block is skipped, as when a test suite imports it), then every
test (a snippet of asserts) in the same namespace, each inside its own ``try``; the harness writes a result line
tagged with a per-run random nonce. The reward is the fraction of tests passed. A solution that exits early
(``os._exit``), crashes the interpreter or prints a forged line without the nonce scores 0.

The result line goes to a copy of the original stdout taken before the solution runs, while file descriptors 1 and 2
(and so ``print``, ``sys.stderr``, ``os.write(1, ...)``) point at ``/dev/null``: the sandbox keeps only the head of
its output, so a correct solution that prints a lot, or prints without a final newline, would otherwise lose the
line; and a solution's output is never part of its score.

The sandbox protects the *host*; a solution that introspects the interpreter to find the nonce or the result
channel could still fake a pass, so treat this as a training signal, not a security boundary for the reward's
integrity.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .api import completion_text, register_reward
from .sandbox import SandboxLimits, run_python

logger = logging.getLogger("dsalign.rewards")

# A fence line: indentation, three or more backticks, an info string without backticks (so ```x``` on one line is
# inline code, not a fence). Matched against a whole line with its trailing whitespace removed.
_FENCE = re.compile(r"( *)(`{3,})([^`]*)")
_PYTHON = {"", "python", "py", "python3"}

# The error text is capped and its repr guarded: an exception (of the solution's own class, maybe) can carry a huge
# message or a repr that raises, and either would cost the result line.
_HARNESS = """
import json as _json, os as _os, sys as _sys, types as _types
_solution, _tests, _nonce = {solution!r}, {tests!r}, {nonce!r}
_result = _os.fdopen(_os.dup(1), "w")
_devnull = _os.open(_os.devnull, _os.O_WRONLY)
_os.dup2(_devnull, 1)
_os.dup2(_devnull, 2)
_module = _sys.modules["__solution__"] = _types.ModuleType("__solution__")
_ns = _module.__dict__
def _describe(e):
    try:
        return repr(e)[:500]
    except BaseException:
        return "<unprintable exception>"
_error = None
try:
    exec(compile(_solution, "<solution>", "exec"), _ns)
except BaseException as _e:
    _error = "solution: " + _describe(_e)
_passed = 0
if _error is None:
    for _i, _test in enumerate(_tests):
        try:
            exec(compile(_test, "<test %d>" % _i, "exec"), _ns)
            _passed += 1
        except BaseException as _e:
            _error = _error or "test %d: %s" % (_i, _describe(_e))
_result.write("\\n" + _nonce + _json.dumps({{"passed": _passed, "total": len(_tests), "error": _error}}) + "\\n")
_result.flush()
"""


def extract_code(text: str) -> str | None:
    """The last fenced code block tagged python, py or python3 (or untagged), or ``None``.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("Run:\\n```bash\\npython f.py\\n```\\nCode:\\n```py\\nx = 1\\n```\\nOutput:\\n```text\\n1\\n```")
    'x = 1\\n'
    >>> extract_code("no code") is None
    True
    """
    blocks = [body for lang, body in _fenced_blocks(text) if lang in _PYTHON]
    return blocks[-1] if blocks else None


def _fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """``(language, body)`` of each closed fenced block, in order; the language is the info string's first word,
    lowercased.

    Fences are paired by walking the lines as Markdown does, not by a regex over the whole text: one that pairs any
    two fences takes the prose between a ```` ```bash ```` block and a python block for code. Outside a block any
    fence opens one; inside, only a bare fence at least as long as the opening one, indented at most 3 spaces more,
    closes it (:func:`_closes`), so a longer fence can quote a shorter one. The opening fence's indentation (a fence
    inside a list item) is removed from the body's lines. An unclosed block (a truncated completion) is not returned.
    """
    opening: re.Match[str] | None = None
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        fence = _FENCE.fullmatch(line.rstrip())
        if opening is None:
            if fence:
                opening, body = fence, []
        elif fence and _closes(fence, opening):
            info = opening[3].split()
            yield (info[0].lower() if info else ""), "".join(body)
            opening = None
        else:
            indent = len(line) - len(line.lstrip(" "))
            body.append(line[min(indent, len(opening[1])) :])


def _closes(fence: re.Match[str], opening: re.Match[str]) -> bool:
    indent, ticks, info = fence.groups()
    return not info.strip() and len(ticks) >= len(opening[2]) and len(indent) <= len(opening[1]) + 3


def harness(solution: str, tests: list[str], nonce: str) -> str:
    """The program run in the sandbox; solution and tests are embedded as string literals via ``repr``."""
    return _HARNESS.format(solution=solution, tests=list(tests), nonce=nonce)


def parse_result(stdout: str, nonce: str) -> dict[str, Any] | None:
    """The harness's result line, only if it carries this run's nonce and is whole (else ``None``)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            try:
                return json.loads(line[len(nonce) :])
            except ValueError:
                return None
    return None


@register_reward("code_execution")
def code_execution(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    tests: list[Any] | None = None,
    wall_seconds: float = 10.0,
    max_workers: int = 2,
    budget_seconds: float = 45.0,
    allow_network: bool = False,
    **columns: Any,
) -> list[float | None]:
    """Fraction of the row's ``tests`` (a string or list of strings of asserts) that pass; 0.0 without a code block,
    ``None`` for a row without tests. Runs at most ``max_workers`` sandboxes at once.

    The call returns within about ``budget_seconds`` (plus process teardown, well under a second): the combiner
    drops *every* sample's score when a reward outlives its ``RewardSpec.timeout_s`` (60 s by default), and a few
    hanging solutions, each holding a worker for ``wall_seconds``, would otherwise get there. Each run's wall clock
    is ``min(wall_seconds, budget left)``. A run stopped by its own ``wall_seconds`` failed its tests (0.0); one the
    budget stopped earlier, or one that never started because the budget was spent, gets ``None`` (no verdict), and
    a warning on the ``dsalign.rewards`` logger counts them. Keep the budget below the reward's ``timeout_s``.

    >>> good, wrong = "```python\\ndef add(a, b):\\n    return a + b\\n```", "```python\\nadd = max\\n```"
    >>> code_execution(["add"] * 2, [good, wrong], tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 2)
    [1.0, 0.5]
    """
    if tests is None:
        raise ValueError(f"code_execution needs a 'tests' column; got columns {sorted(columns)}")
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
    rewards: list[float | None] = [None] * len(completions)
    jobs: list[tuple[int, str, str]] = []
    for i, (completion, row_tests) in enumerate(zip(completions, tests, strict=True)):
        row_tests = [row_tests] if isinstance(row_tests, str) else list(row_tests or [])
        if not row_tests:
            continue
        code = extract_code(completion_text(completion))
        if code is None:
            rewards[i] = 0.0
            continue
        nonce = secrets.token_hex(16)
        jobs.append((i, nonce, harness(code, row_tests, nonce)))
    deadline = time.monotonic() + budget_seconds
    limits = SandboxLimits(wall_seconds=wall_seconds, cpu_seconds=max(1, int(wall_seconds)))

    def score(job: tuple[int, str, str]) -> float | str:
        """The reward, or why there is none (a run only starts when a worker comes free, maybe past the deadline)."""
        _, nonce, program = job
        left = deadline - time.monotonic()
        if left <= 0:
            return "never started"
        wall = min(wall_seconds, left)
        result = run_python(program, dataclasses.replace(limits, wall_seconds=wall), allow_network=allow_network)
        parsed = parse_result(result.stdout, nonce)
        if parsed is None and result.timed_out and wall < wall_seconds:
            return "stopped by the budget"
        return 0.0 if parsed is None or parsed["total"] == 0 else parsed["passed"] / parsed["total"]

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="code_execution") as pool:
        outcomes = list(pool.map(score, jobs))
    for (i, _, _), outcome in zip(jobs, outcomes, strict=True):
        rewards[i] = None if isinstance(outcome, str) else outcome
    unscored = collections.Counter(outcome for outcome in outcomes if isinstance(outcome, str))
    if unscored:
        logger.warning(
            "code_execution: %d of %d sandbox runs got no score within budget_seconds=%g (%s); they get None. "
            "Raise budget_seconds (and the reward's timeout_s) or max_workers, or lower wall_seconds.",
            sum(unscored.values()),
            len(jobs),
            budget_seconds,
            ", ".join(f"{count} {why}" for why, count in unscored.items()),
        )
    return rewards
