"""bench/grpo.py at a toy size (tiny preset, P=2, G=2, 4 new tokens), so the benchmark cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "grpo.py"
TOY = [
    "--preset",
    "tiny",
    "--prompts",
    "2",
    "--group",
    "2",
    "--max-new-tokens",
    "4",
    "--iters",
    "1",
    "--warmup",
    "1",
    "--threads",
    "1",
]
pytest.importorskip("trl")


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"metric"')]


def _check(rows: list[dict], with_rss: bool, new_tokens: int = 4) -> None:
    assert all(f"_new{new_tokens}_" in r["metric"] for r in rows), rows
    names = [r["metric"].split("_tiny_")[0] for r in rows]
    expected = ["grpo_iteration_s", "grpo_iteration_cpu_s", "grpo_generated_tokens_per_s", "grpo_generate_s",
                "grpo_score_and_update_s", "grpo_generated_tokens"]  # fmt: skip
    expected += ["grpo_peak_rss"] if with_rss else []
    assert names == expected
    for r in rows:
        for key in ("ours", "baseline", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, r
    tokens = rows[names.index("grpo_generated_tokens")]
    assert tokens["ours"] == tokens["baseline"] == 2 * 2 * new_tokens  # both sides generate exactly max_new_tokens


def test_bench_grpo_toy_in_process(capsys):
    """Two completion lengths in one run: one set of rows per length, all printed at the end."""
    spec = importlib.util.spec_from_file_location("bench_grpo", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    two = TOY[: TOY.index("4") + 1] + ["6"] + TOY[TOY.index("4") + 1 :]  # --max-new-tokens 4 6
    returned = bench.main([*two, "--in-process"])
    out = capsys.readouterr().out
    printed = _json_lines(out)
    assert printed == returned
    assert [line.startswith('{"metric"') for line in out.splitlines()][-len(printed) :] == [True] * len(printed)
    half = len(printed) // 2
    _check(printed[:half], with_rss=False, new_tokens=4)
    _check(printed[half:], with_rss=False, new_tokens=6)


@pytest.mark.slow
def test_bench_grpo_toy_subprocesses():
    out = subprocess.run([sys.executable, str(SCRIPT), *TOY], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    _check(_json_lines(out.stdout), with_rss=True)
