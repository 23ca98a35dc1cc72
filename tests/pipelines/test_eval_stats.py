"""The noise estimates printed with the held-out table: clustered SE and the paired stage-to-stage difference."""

import math
import random

from dsalign.pipelines.config import ModelSource, RunConfig
from dsalign.pipelines.runner import clustered_se, comparison_label, paired_delta
from dsalign.pipelines.schema import from_dict


def test_clustered_se_matches_formula_and_shrinks_with_n():
    per = [0.0, 0.25, 0.5, 1.0]
    mean = sum(per) / 4
    expect = math.sqrt(sum((a - mean) ** 2 for a in per) / 3 / 4)
    assert math.isclose(clustered_se(per), expect)
    rng = random.Random(0)
    small = [rng.random() for _ in range(50)]
    big = small * 8
    assert clustered_se(big) < clustered_se(small) / 2.5
    assert math.isnan(clustered_se([0.5]))


def test_paired_delta_cancels_shared_prompt_difficulty():
    rng = random.Random(1)
    difficulty = [rng.random() for _ in range(200)]  # prompts differ a lot in how hard they are ...
    base = difficulty
    better = [d + 0.05 for d in difficulty]  # ... but the new model gains the same on each
    text = paired_delta(better, base, "sft")
    assert text.startswith("+0.050 (SE 0.000) vs sft"), text
    assert paired_delta(better, None, "sft") == "-"
    assert paired_delta(better[:10], base, "sft") == "-"  # different prompt sets are not paired


def test_comparison_label_follows_the_stage_source():
    cfg = from_dict(
        RunConfig,
        {
            "name": "t",
            "output_dir": "/tmp/unused",
            "stages": [
                {"name": "sft", "kind": "sft", "model": {"preset": "tiny"}, "data": {"synthetic": "addition"}},
                {"name": "rl", "kind": "grpo", "model": {"from_stage": "sft"}, "data": {"synthetic": "addition"}},
                {
                    "name": "student",
                    "kind": "distill",
                    "model": {"preset": "tiny"},
                    "data": {"synthetic": "addition"},
                    "distill": {"teacher": {"from_stage": "rl"}},
                },
            ],
        },
    )
    assert [comparison_label(s, cfg) for s in cfg.stages] == ["untrained", "sft", "rl"]
    # a checkpoint start is named so; a model the run has no row for gets its own (evaluated before the stage)
    cfg.stages[0].model = ModelSource(checkpoint="/ckpts/base-sft")
    cfg.stages[2].distill.teacher = ModelSource(checkpoint="/runs/x/grpo/final")
    assert [comparison_label(s, cfg) for s in cfg.stages] == ["initial (ckpts/base-sft)", "sft", "teacher (grpo/final)"]


def test_pass_at_k_is_the_chance_that_k_drawn_samples_include_a_correct_one():
    import itertools

    from dsalign.alignment.metrics import pass_at_k

    for n, c, k in [(4, 0, 4), (4, 1, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(d) for d in draws) / len(draws)), (n, c, k)


def test_sample_statistics_pass_and_majority():
    from dsalign.pipelines.stages import sample_statistics

    texts = [r"\boxed{7}", r"\boxed{8}", r"\boxed{8}", "no answer",  # prompt 1: majority 8 (wrong), one correct 7
             r"\boxed{5}", r"\boxed{5}", r"\boxed{6}", r"\boxed{5}"]  # fmt: skip  # prompt 2: majority 5, correct
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert sample_statistics(scores, texts, 4, math=True) == {"pass@4": 1.0, "maj@4": 0.5}
    assert sample_statistics(scores, texts, 4, math=False) == {"pass@4": 1.0}
    assert sample_statistics([0.5] * 8, texts, 4, math=True) == {}  # not a 0/1 reward: no pass@k
    assert sample_statistics(scores[:2], texts[:2], 1, math=True) == {}
