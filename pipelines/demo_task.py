"""The demo's verifiable task family: sums of small numbers with running-total reasoning traces.

Everything is generated locally from a seed. Each row is a chat prompt with a gold ``answer``; the SFT cold-start
set adds an R1-format reasoning trace (``<think>`` running totals ``</think>`` then ``\\boxed{sum}``).

Two things make the demo's later stages meaningful rather than decorative:
- the cold-start traces come from a sloppy "teacher" that slips by one with probability ``slip_rate`` per step, so
  the SFT model imitates a real failure mode that a correctness reward (GRPO) can remove;
- traces come in two verbosities (``7 plus 8 makes 15`` vs ``7+8=15``), so a length budget in
  the system turn has a lever the length-controlled stage can learn to pull.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

LENGTH_INSTRUCTION = "Answer in about {budget} tokens."


@dataclass
class AdditionTask:
    """Sums of ``min_terms``..``max_terms`` numbers in ``[1, max_value]``, reasoned as a chain of running totals.

    A running-total chain keeps every step local (the next term is right there in the question), so a
    few-million-parameter model learns the format and most of the arithmetic in a few hundred CPU steps.
    """

    min_terms: int = field(default=3, metadata={"help": "fewest numbers to add"})
    max_terms: int = field(default=5, metadata={"help": "most numbers to add"})
    max_value: int = field(default=9, metadata={"help": "largest term"})
    slip_rate: float = field(default=0.12, metadata={"help": "cold-start traces: chance each step is off by one"})
    verbose_fraction: float = field(default=0.5, metadata={"help": "cold-start traces: share of verbose traces"})
    budget_prompt_fraction: float = field(
        default=0.5, metadata={"help": "cold-start prompts carrying a random (not yet obeyed) length budget"}
    )

    def __post_init__(self) -> None:  # the schema prefixes the block's path ("task: slip_rate: ...")
        checks = [("min_terms", self.min_terms >= 2, "at least 2 numbers to add"),
                  ("max_terms", self.max_terms >= self.min_terms, f">= min_terms ({self.min_terms})"),
                  ("max_value", self.max_value >= 1, "a largest term >= 1")]  # fmt: skip
        checks += [(k, 0 <= getattr(self, k) <= 1, "a probability in [0, 1]")
                   for k in ("slip_rate", "verbose_fraction", "budget_prompt_fraction")]  # fmt: skip
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"{key}: expected {expected}, got {getattr(self, key)!r}")

    def num_distinct(self) -> int:
        """How many different term tuples the task can produce."""
        return sum(self.max_value**n for n in range(self.min_terms, self.max_terms + 1))

    def operands(self, rng: random.Random) -> tuple[int, ...]:
        n = rng.randint(self.min_terms, self.max_terms)
        return tuple(rng.randint(1, self.max_value) for _ in range(n))


def question(terms: tuple[int, ...]) -> str:
    return "What is " + "+".join(map(str, terms)) + "?"


def reasoning_trace(terms: tuple[int, ...], verbose: bool, slip_rate: float, rng: random.Random) -> tuple[str, int]:
    """Running totals, one line per addition; returns (trace, the total the trace arrives at).

    With probability ``slip_rate`` per step the sloppy teacher writes a total off by one and carries the slip on
    (the trace stays self-consistent, so its final answer is wrong exactly when it slipped)."""
    total = terms[0]
    lines = []
    for t in terms[1:]:
        new = total + t
        if rng.random() < slip_rate:
            new += rng.choice((-1, 1))
        lines.append(f"{total} plus {t} makes {new}" if verbose else f"{total}+{t}={new}")
        total = new
    return "\n".join(lines), total


def prompt_messages(terms: tuple[int, ...], budget: int | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": question(terms)}]
    if budget is not None:
        msgs.insert(0, {"role": "system", "content": LENGTH_INSTRUCTION.format(budget=budget)})
    return msgs


def make_prompts(
    task: AdditionTask, n: int, seed: int, exclude: set[tuple[int, ...]] | None = None, budget: int | None = None
) -> list[dict[str, Any]]:
    """``n`` distinct prompt rows ``{"prompt_id", "prompt", "answer"}``, none of whose term tuples is in
    ``exclude`` (so held-out prompts never appear in training)."""
    rng = random.Random(seed)
    exclude = exclude or set()
    available = task.num_distinct() - len(exclude)
    if n > available:
        raise ValueError(
            f"the addition task (min_terms={task.min_terms}, max_terms={task.max_terms}, max_value={task.max_value}) "
            f"has {task.num_distinct()} distinct prompts, {len(exclude)} of them held out: cannot make {n} distinct "
            f"rows (at most {available}); lower num_rows or widen the task"
        )
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < n:
        terms = task.operands(rng)
        if terms in exclude or terms in seen:
            continue
        seen.add(terms)
        row = {
            "prompt_id": f"add-{seed}-{len(rows)}",
            "prompt": prompt_messages(terms, budget),
            "answer": str(sum(terms)),
        }
        if budget is not None:
            row["length_target"] = budget
        rows.append(row)
    return rows


def terms_of(row: dict[str, Any]) -> tuple[int, ...]:
    text = row["prompt"][-1]["content"]
    return tuple(int(v) for v in text.removeprefix("What is ").removesuffix("?").split("+"))


def operand_sets(rows: list[dict[str, Any]]) -> set[tuple[int, ...]]:
    return {terms_of(row) for row in rows}


def make_sft_conversations(task: AdditionTask, prompts: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Cold-start SFT rows: each prompt answered by the sloppy teacher in a random verbosity."""
    rng = random.Random(seed)
    rows = []
    for row in prompts:
        verbose = rng.random() < task.verbose_fraction
        trace, result = reasoning_trace(terms_of(row), verbose, task.slip_rate, rng)
        prompt = row["prompt"]
        if rng.random() < task.budget_prompt_fraction and prompt[0]["role"] != "system":
            # The format of a budget instruction is seen in SFT, its meaning is left for length-controlled RL.
            prompt = prompt_messages(terms_of(row), budget=rng.randint(20, 60))
        messages = [
            *prompt,
            {"role": "assistant", "content": f"\\boxed{{{result}}}", "reasoning_content": trace},
        ]
        rows.append({"prompt_id": row["prompt_id"], "messages": messages, "answer": row["answer"]})
    return rows


def corpus_for_tokenizer(task: AdditionTask, n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering every surface form the demo produces (questions, both trace styles, answers, budgets)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        terms = task.operands(rng)
        trace, result = reasoning_trace(terms, verbose=i % 2 == 0, slip_rate=0.0, rng=rng)
        budget = LENGTH_INSTRUCTION.format(budget=rng.randint(8, 99))
        texts.append(f"{budget}{question(terms)}\n{trace}\n\\boxed{{{result}}}")
    return texts
