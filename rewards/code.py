"""``code_execution``: run the completion's Python code block against the row's tests in the sandbox.

The solution and each test run in one sandboxed interpreter: the solution is executed, then every test (a snippet
of asserts) in the same namespace, each inside its own ``try``; the harness prints a result line tagged with a
per-run random nonce. The reward is the fraction of tests passed. A solution that exits early (``os._exit``),
crashes the interpreter or prints a forged line without the nonce scores 0. The sandbox protects the *host*; a
solution that introspects the interpreter to find the nonce could still fake a pass, so treat this as a training
signal, not a security boundary for the reward's integrity.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from .api import completion_text, register_reward
from .sandbox import SandboxLimits, run_many

_FENCE = re.compile(r"```[ \t]*(python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_HARNESS = """
import json as _json
_solution, _tests, _nonce = {solution!r}, {tests!r}, {nonce!r}
_ns = {{"__name__": "__main__"}}
_error = None
try:
    exec(compile(_solution, "<solution>", "exec"), _ns)
except BaseException as _e:
    _error = "solution: " + repr(_e)
_passed = 0
if _error is None:
    for _i, _test in enumerate(_tests):
        try:
            exec(compile(_test, "<test %d>" % _i, "exec"), _ns)
            _passed += 1
        except BaseException as _e:
            _error = _error or "test %d: %r" % (_i, _e)
print(_nonce + _json.dumps({{"passed": _passed, "total": len(_tests), "error": _error}}), flush=True)
"""


def extract_code(text: str) -> str | None:
    """The last fenced code block tagged python (or untagged), or ``None``.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("no code") is None
    True
    """
    blocks = [body for lang, body in _FENCE.findall(text)]
    return blocks[-1] if blocks else None


def harness(solution: str, tests: list[str], nonce: str) -> str:
    """The program run in the sandbox; solution and tests are embedded as string literals via ``repr``."""
    return _HARNESS.format(solution=solution, tests=list(tests), nonce=nonce)


def parse_result(stdout: str, nonce: str) -> dict[str, Any] | None:
    """The harness's result line, only if it carries this run's nonce."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            return json.loads(line[len(nonce) :])
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
    allow_network: bool = False,
    **columns: Any,
) -> list[float | None]:
    """Fraction of the row's ``tests`` (a string or list of strings of asserts) that pass; 0.0 without a code block,
    ``None`` for a row without tests. Runs at most ``max_workers`` sandboxes at once.

    >>> good, wrong = "```python\\ndef add(a, b):\\n    return a + b\\n```", "```python\\nadd = max\\n```"
    >>> code_execution(["add"] * 2, [good, wrong], tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 2)
    [1.0, 0.5]
    """
    if tests is None:
        raise ValueError(f"code_execution needs a 'tests' column; got columns {sorted(columns)}")
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
    limits = SandboxLimits(wall_seconds=wall_seconds, cpu_seconds=max(1, int(wall_seconds)))
    programs = [program for _, _, program in jobs]
    results = run_many(programs, limits, max_workers=max_workers, allow_network=allow_network)
    for (i, nonce, _), result in zip(jobs, results, strict=True):
        parsed = parse_result(result.stdout, nonce)
        rewards[i] = 0.0 if parsed is None or parsed["total"] == 0 else parsed["passed"] / parsed["total"]
    return rewards
