"""The demo task generator: distinct held-out prompts, the sloppy teacher's slip rate, impossible requests."""

import random

import pytest
from dsalign.pipelines.demo_task import (
    AdditionTask,
    make_prompts,
    make_sft_conversations,
    operand_sets,
    reasoning_trace,
)


def test_prompts_are_distinct_and_exclude_held_out():
    task = AdditionTask(max_value=4)
    held = make_prompts(task, 50, seed=0)
    rows = make_prompts(task, 200, seed=1, exclude=operand_sets(held))
    terms = operand_sets(rows)
    assert len(terms) == 200 and not terms & operand_sets(held)
    assert all(str(sum(t)) == r["answer"] for r, t in zip(rows, [operand_sets([r]).pop() for r in rows]))


def test_asking_for_more_prompts_than_exist_is_an_error_not_a_hang():
    task = AdditionTask(min_terms=2, max_terms=2, max_value=3)  # 9 distinct prompts
    assert task.num_distinct() == 9
    assert len(make_prompts(task, 9, seed=0)) == 9
    held = make_prompts(task, 3, seed=0)
    with pytest.raises(ValueError, match="has 9 distinct prompts, 3 of them held out: cannot make 7"):
        make_prompts(task, 7, seed=1, exclude=operand_sets(held))


def test_sloppy_teacher_slips_at_its_rate_and_stays_self_consistent():
    rng = random.Random(0)
    wrong = 0
    for _ in range(2000):
        trace, result = reasoning_trace((3, 4, 5), verbose=False, slip_rate=0.2, rng=rng)
        last = trace.splitlines()[-1]
        assert last.endswith(f"={result}")
        wrong += result != 12
    # P(final answer wrong) = 1 - P(no slip in 2 steps) minus the rare +1/-1 cancellations: about 0.36 - 0.02
    assert 0.30 < wrong / 2000 < 0.38
    rows = make_sft_conversations(AdditionTask(), make_prompts(AdditionTask(), 20, seed=0), seed=1)
    assert all(r["messages"][-1]["content"].startswith("\\boxed{") for r in rows)
