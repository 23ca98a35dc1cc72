"""The demo's verifiable task family: multi-digit addition with column-by-column reasoning traces.

Everything is generated locally from a seed. Each row is a chat prompt with a gold ``answer``; the SFT cold-start
set adds an R1-format reasoning trace (``<think>`` column sums with carries ``</think>`` then ``\\boxed{sum}``).

Two things make the demo's later stages meaningful rather than decorative:
- the cold-start traces come from a sloppy "teacher" that forgets a carry with probability ``carry_error``, so the
  SFT model imitates a real failure mode that a correctness reward (GRPO) can remove;
- traces come in two verbosities (``verbose`` spells out each column, ``concise`` does not), so a length budget in
  the system turn has a lever the length-controlled stage can learn to pull.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

LENGTH_INSTRUCTION = "Answer in about {budget} tokens."


@dataclass
class AdditionTask:
    """Operands are drawn uniformly from ``[10**(min_digits-1), 10**max_digits - 1]``."""

    min_digits: int = field(default=2, metadata={"help": "fewest digits per operand"})
    max_digits: int = field(default=3, metadata={"help": "most digits per operand"})
    carry_error: float = field(default=0.3, metadata={"help": "cold-start traces: chance of dropping each carry"})
    verbose_fraction: float = field(default=0.5, metadata={"help": "cold-start traces: share of verbose traces"})

    def operands(self, rng: random.Random) -> tuple[int, int]:
        lo, hi = 10 ** (self.min_digits - 1), 10**self.max_digits - 1
        return rng.randint(lo, hi), rng.randint(lo, hi)


def question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def reasoning_trace(a: int, b: int, verbose: bool, carry_error: float, rng: random.Random) -> tuple[str, int]:
    """Column-by-column addition, least significant digit first; returns (trace, the sum the trace arrives at).

    With probability ``carry_error`` per carry, the carry is forgotten (the trace stays self-consistent, so the
    final answer is wrong exactly when a carry was dropped)."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, digits, carry = [], [], 0
    names = ["units", "tens", "hundreds", "thousands", "ten-thousands"]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        s = x + y + carry
        digit, new_carry = s % 10, s // 10
        if new_carry and rng.random() < carry_error:
            new_carry = 0
        if verbose:
            tail = f", write {digit}" + (f" carry {new_carry}" if new_carry else "")
            lines.append(f"{names[i]}: {terms}={s}{tail}")
        else:
            lines.append(f"{terms}={s}")
        digits.append(str(digit))
        carry = new_carry
    if carry:
        digits.append(str(carry))
        lines.append(f"final carry {carry}" if verbose else f"{carry}")
    result = int("".join(reversed(digits)))
    return "\n".join(lines), result


def prompt_messages(a: int, b: int, budget: int | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": question(a, b)}]
    if budget is not None:
        msgs.insert(0, {"role": "system", "content": LENGTH_INSTRUCTION.format(budget=budget)})
    return msgs


def make_prompts(
    task: AdditionTask, n: int, seed: int, exclude: set[tuple[int, int]] | None = None, budget: int | None = None
) -> list[dict[str, Any]]:
    """``n`` distinct prompt rows ``{"prompt_id", "prompt", "answer"}``, none of whose operand pairs is in
    ``exclude`` (so held-out prompts never appear in training)."""
    rng = random.Random(seed)
    exclude = exclude or set()
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a, b = task.operands(rng)
        if (a, b) in exclude or (a, b) in seen:
            continue
        seen.add((a, b))
        row = {"prompt_id": f"add-{seed}-{len(rows)}", "prompt": prompt_messages(a, b, budget), "answer": str(a + b)}
        if budget is not None:
            row["length_target"] = budget
        rows.append(row)
    return rows


def operand_pairs(rows: list[dict[str, Any]]) -> set[tuple[int, int]]:
    out = set()
    for row in rows:
        text = row["prompt"][-1]["content"]
        a, b = text.removeprefix("What is ").removesuffix("?").split("+")
        out.add((int(a), int(b)))
    return out


def make_sft_conversations(task: AdditionTask, prompts: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Cold-start SFT rows: each prompt answered by the sloppy teacher in a random verbosity."""
    rng = random.Random(seed)
    rows = []
    for row in prompts:
        a, b = sorted(operand_pairs([row]))[0]
        verbose = rng.random() < task.verbose_fraction
        trace, result = reasoning_trace(a, b, verbose, task.carry_error, rng)
        messages = [
            *row["prompt"],
            {"role": "assistant", "content": f"\\boxed{{{result}}}", "reasoning_content": trace},
        ]
        rows.append({"prompt_id": row["prompt_id"], "messages": messages, "answer": row["answer"]})
    return rows


def corpus_for_tokenizer(task: AdditionTask, n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering every surface form the demo produces (questions, both trace styles, answers, budgets)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        a, b = task.operands(rng)
        trace, result = reasoning_trace(a, b, verbose=i % 2 == 0, carry_error=0.0, rng=rng)
        budget = LENGTH_INSTRUCTION.format(budget=rng.randint(8, 99))
        texts.append(f"{budget}{question(a, b)}\n{trace}\n\\boxed{{{result}}}")
    return texts
