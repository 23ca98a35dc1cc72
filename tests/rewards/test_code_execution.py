"""``code_execution``: code-block extraction, the harness's result channel, the solution's ``__name__``, and the
batch time budget that keeps a few hanging solutions from costing the whole batch its scores."""

import logging
import time

import pytest
from dsalign.rewards import code_execution, extract_code
from dsalign.rewards import sandbox as sandbox_module
from dsalign.rewards.code import parse_result

needs_namespaces = pytest.mark.skipif(
    not sandbox_module.sandbox_support().namespaces,
    reason=f"no namespaces here: {sandbox_module.sandbox_support().reason}",
)

SQUARE = "def square(x):\n    return x * x\n"
SQUARE_TESTS = ["assert square(3) == 9", "assert square(-2) == 4"]
SLEEPER = "```python\nimport time\ntime.sleep(3600)\n```"


def fenced(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}```"


def test_extract_code_skips_other_languages_before_and_after():
    text = (
        "Save it and run:\n```bash\npython sol.py < in.txt\n```\nExpected output:\n```text\n9\n```\n"
        f"The solution:\n```python\n{SQUARE}```\nOr in C:\n```c\nint square(int x) {{ return x * x; }}\n```\n"
    )
    assert extract_code(text) == SQUARE


def test_extract_code_pairs_fences_in_order():
    # Untagged and py/python3 blocks count; the last one wins; a bare fence only closes, and only at its own depth.
    assert extract_code(f"```\nfirst = 1\n```\n```py\n{SQUARE}```") == SQUARE
    assert extract_code(f"```Python3 title='sol'\n{SQUARE}```\n") == SQUARE
    # A fence indented by a list item: the indentation is removed from the code, as Markdown does.
    assert extract_code("1. Define it:\n   ```python\n   def f():\n       return 1\n   ```\n") == (
        "def f():\n    return 1\n"
    )
    # A longer fence can contain a shorter one.
    body = 'DOC = """\n```\nexample\n```\n"""\n'
    assert extract_code(f"````python\n{body}````\n") == body
    # Inline triple backticks on one line are not a fence; an unclosed block (a truncated completion) is no code.
    assert extract_code("Use ```print(1)``` inline.") is None
    assert extract_code("```python\ndef f(") is None


def test_parse_result_ignores_a_truncated_line():
    assert parse_result('\nabc{"passed": 1, "total": 2, "error": null}\n', "abc") == {
        "passed": 1,
        "total": 2,
        "error": None,
    }
    assert parse_result('\nabc{"passed": 1, "tot', "abc") is None


@needs_namespaces
def test_result_line_survives_big_output_missing_newline_and_forgery():
    completions = [
        fenced(f"print('x' * 200_000)\n{SQUARE}"),  # more than the sandbox keeps of stdout
        fenced(f"import sys\nsys.stdout.write('no newline')\n{SQUARE}"),  # the result line must start its own line
        fenced(f"import sys\nsys.stderr.write('e' * 200_000)\n{SQUARE}"),
        fenced(f"import os\nos.write(1, b'x' * 100_000)\n{SQUARE}"),  # straight to the file descriptor
        # A forged line without the nonce, written to every descriptor (the result channel among them), counts for
        # nothing: square = abs fails both tests.
        fenced(
            "import os\nfor fd in range(1, 10):\n    try:\n"
            '        os.write(fd, b\'\\n{"passed": 2, "total": 2, "error": null}\\n\')\n'
            "    except OSError:\n        pass\nsquare = abs\n"
        ),
        fenced(SQUARE),
    ]
    # The last row's failing test has a huge message, which must not break the result line.
    tests = [SQUARE_TESTS] * 5 + [["assert square(2) == 4", "assert False, 'x' * 200_000"]]
    assert code_execution([""] * 6, completions, tests=tests, wall_seconds=5.0) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.5]


@needs_namespaces
def test_main_guard_of_the_solution_does_not_run():
    solution = f"{SQUARE}\nif __name__ == '__main__':\n    print(square(int(input())))\n"
    # A dataclass with postponed annotations looks its module up in sys.modules: the solution is a real module.
    with_dataclass = (
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass P:\n    x: int\n"
    )
    out = code_execution(
        [""] * 2,
        [fenced(solution), fenced(with_dataclass)],
        tests=[SQUARE_TESTS, ["assert P(3).x == 3", "assert __name__ != '__main__'"]],
        wall_seconds=5.0,
    )
    assert out == [1.0, 1.0]


@needs_namespaces
def test_own_wall_clock_scores_zero_within_budget():
    good = fenced(SQUARE)
    out = code_execution(
        [""] * 4, [SLEEPER, good, SLEEPER, good], tests=[SQUARE_TESTS] * 4, wall_seconds=1.0, budget_seconds=20.0
    )
    assert out == [0.0, 1.0, 0.0, 1.0]


@needs_namespaces
def test_budget_bounds_a_batch_with_hanging_solutions(caplog):
    good = fenced(SQUARE)
    completions = [good, SLEEPER, SLEEPER, good, SLEEPER, good, "no code"]
    budget = 3.0
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dsalign.rewards"):
        out = code_execution(
            [""] * 7, completions, tests=[SQUARE_TESTS] * 7, wall_seconds=10.0, max_workers=2, budget_seconds=budget
        )
    elapsed = time.monotonic() - start
    assert elapsed < budget + 1.5, f"took {elapsed:.1f} s for a {budget} s budget"
    # Two workers: the first good one finishes, the first two sleepers hold both workers until the budget is spent
    # (stopped by the budget, not by their own 10 s clock: no verdict), the rest never start.
    assert out == [1.0, None, None, None, None, None, 0.0]
    assert sandbox_module._pids_of_uid_range(*sandbox_module.THROWAWAY_UIDS) == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "dsalign.rewards"]
    assert len(warnings) == 1 and "5 of 6" in warnings[0]
    assert "3 never started" in warnings[0] and "2 stopped by the budget" in warnings[0]


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget_seconds"):
        code_execution([""], [fenced(SQUARE)], tests=[SQUARE_TESTS], budget_seconds=0)
