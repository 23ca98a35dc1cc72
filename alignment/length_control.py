"""Length and style targets carried in the prompt (budget-conditioned prompts, L1-style; Aggarwal & Welleck 2025).

A target is sampled per row, written into the system turn as an instruction ("Think for at most 512 tokens."), and
kept as dataset columns (``length_target``, ``style``) so that the reward functions -- which receive every dataset
column as a keyword argument (SPEC section 8) -- can score ``|len - budget|`` (the built-in ``target_length`` reads
``length_target``, as do the pipelines' budget prompts) or style adherence. Sampling is
deterministic per (seed, row index), so a resumed run sees the same targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import datasets

BUDGET_COLUMN = "length_target"  # the column rewards.length.target_length reads
STYLE_COLUMN = "style"


@dataclass
class LengthControlConfig:
    """Which targets to sample and how they are phrased in the system turn."""

    budgets: list[int] = field(default_factory=lambda: [512, 1024, 2048], metadata={"help": "token budgets"})
    styles: list[str] = field(default_factory=list, metadata={"help": "style tags, e.g. ['concise', 'detailed']"})
    budget_template: str = field(default="Think for at most {budget} tokens.", metadata={"help": "uses {budget}"})
    style_template: str = field(default="Answer in a {style} style.", metadata={"help": "uses {style}"})
    probability: float = field(default=1.0, metadata={"help": "fraction of rows that get a target"})
    seed: int = field(default=0, metadata={"help": "targets are a function of (seed, row index)"})
    prompt_field: str = field(default="prompt", metadata={"help": "column holding the chat prompt"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive, got {self.budgets}")
        if not self.budgets and not self.styles:
            raise ValueError("give at least one budget or one style")


def sample_target(cfg: LengthControlConfig, index: int) -> tuple[int | None, str | None]:
    """``(budget, style)`` for row ``index``; either is None when not configured or the row was not picked."""
    rng = random.Random(f"{cfg.seed}:{index}")
    if rng.random() >= cfg.probability:
        return None, None
    budget = rng.choice(cfg.budgets) if cfg.budgets else None
    style = rng.choice(cfg.styles) if cfg.styles else None
    return budget, style


def with_system_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """Append ``instruction`` to the system turn, creating one at the front if the prompt has none."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{instruction}" if out[0]["content"] else instruction
    else:
        out.insert(0, {"role": "system", "content": instruction, "reasoning_content": None})
    return out


def apply_target(row: dict[str, Any], budget: int | None, style: str | None, cfg: LengthControlConfig) -> dict:
    """Return ``row`` with the instruction in its prompt and the ``length_target`` / ``style`` columns set.

    A string prompt becomes a one-message conversation whether or not the row got a target, so that every row of a
    dataset has the same prompt type (a column mixing strings and message lists cannot be stored)."""
    parts = []
    if budget is not None:
        parts.append(cfg.budget_template.format(budget=budget))
    if style is not None:
        parts.append(cfg.style_template.format(style=style))
    out = dict(row)
    prompt = row[cfg.prompt_field]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt, "reasoning_content": None}]
    out[cfg.prompt_field] = with_system_instruction(prompt, " ".join(parts)) if parts else prompt
    out[BUDGET_COLUMN] = budget
    out[STYLE_COLUMN] = style
    return out


def add_length_targets(dataset: datasets.Dataset, cfg: LengthControlConfig) -> datasets.Dataset:
    """Sample a target for every row of a prompt dataset (see ``data.load_prompts``) and write it in."""
    if cfg.prompt_field not in dataset.column_names:
        raise KeyError(f"dataset has no {cfg.prompt_field!r} column; columns: {dataset.column_names}")
    rows = [apply_target(row, *sample_target(cfg, i), cfg) for i, row in enumerate(dataset.to_list())]
    out = datasets.Dataset.from_list(rows)
    # columns that are all None infer as the null type; give them their real types
    out = out.cast_column(BUDGET_COLUMN, datasets.Value("int64"))
    return out.cast_column(STYLE_COLUMN, datasets.Value("string"))
