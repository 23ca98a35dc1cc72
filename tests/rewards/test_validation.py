"""Bad rewards are refused when loaded, not on every sample: signatures the combiner cannot call, non-finite weights
and values; and one function may be used twice without naming it."""

import inspect
import math

import pytest
from dsalign.rewards import (
    RewardCombiner,
    RewardError,
    RewardLoadError,
    RewardSignatureError,
    RewardSpec,
    load_reward,
)

USER_REWARDS = """
def wrong_sig(x):
    return [1.0]

def no_args():
    return [1.0]

def only_args(*args):
    return [1.0]

def no_completion_ids(prompts, completions):
    return [1.0] * len(completions)

def positional_only(prompts, completions, /, **kw):
    return [1.0] * len(completions)

def withparam(prompts, completions, scale, **kw):
    return [scale] * len(completions)

def column(completions, answer, **kw):
    return [float(c == a) for c, a in zip(completions, answer)]

def verl_without_data_source(solution_str, ground_truth):
    return 1.0

def verl_unbound(data_source, solution_str, ground_truth, extra_info, method):
    return 1.0
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


@pytest.mark.parametrize(
    ("fn", "problem"),
    [
        ("wrong_sig", r"cannot take \['prompts', 'completions', 'completion_ids'\] by keyword"),
        ("no_args", r"cannot take \['prompts', 'completions', 'completion_ids'\] by keyword"),
        ("only_args", r"cannot take \['prompts', 'completions', 'completion_ids'\] by keyword"),
        ("no_completion_ids", r"cannot take \['completion_ids'\] by keyword"),
        ("positional_only", r"required parameter\(s\) \['prompts', 'completions'\] are positional-only"),
        ("verl_without_data_source", r"cannot take \['data_source', 'extra_info'\] by keyword"),
        ("verl_unbound", r"nothing fills its required parameter\(s\) \['method'\]"),
    ],
)
def test_uncallable_signatures_are_refused_at_load_time(user_file, fn, problem):
    spec = f"{user_file}:{fn}"
    with pytest.raises(ValueError, match=problem) as excinfo:
        load_reward(spec)
    assert isinstance(excinfo.value, RewardLoadError) and isinstance(excinfo.value, RewardSignatureError)
    assert repr(spec) in str(excinfo.value) and "cannot be called as fn(" in str(excinfo.value)
    with pytest.raises(ValueError, match=problem):
        RewardCombiner([spec])  # what a GRPO stage builds; pipelines' preflight calls load_reward


def test_unbound_named_parameters_are_taken_for_dataset_columns(user_file):
    """A required parameter that params do not bind is most likely a column (``answer``): accepted at load time."""
    assert load_reward(f"{user_file}:withparam", scale=2.0)(prompts=["p"], completions=["c"]) == [2.0]
    assert load_reward(f"{user_file}:withparam")(prompts=["p"], completions=["c"], scale=3.0) == [3.0]
    out = RewardCombiner([f"{user_file}:column"])(["p"] * 2, ["4", "5"], answer=["4", "4"])
    assert out.rewards == [1.0, 0.0] and out.failures == []
    assert load_reward(f"{user_file}:verl_unbound", method="strict")(["p"], ["x"], answer=["x"]) == [1.0]


def test_unfilled_parameters_against_known_columns(user_file):
    """Once the data's columns are known (the pipeline's preflight), a required parameter that neither params nor a
    column fills is named: ``soft_overlong`` without its two params would fail on every sample."""
    from dsalign.rewards import unfilled_parameters

    assert unfilled_parameters(load_reward("soft_overlong"), {"answer"}) == ["max_length", "cache_length"]
    assert unfilled_parameters(load_reward("soft_overlong", max_length=9, cache_length=2), {"answer"}) == []
    assert unfilled_parameters(load_reward(f"{user_file}:column"), {"answer", "prompt_id"}) == []
    assert unfilled_parameters(load_reward(f"{user_file}:column"), {"prompt_id"}) == ["answer"]
    assert unfilled_parameters(load_reward(f"{user_file}:withparam", scale=2.0), set()) == []
    assert unfilled_parameters(load_reward(f"{user_file}:verl_unbound", method="strict"), set()) == []  # verl


def test_params_may_not_bind_what_the_trainer_passes():
    with pytest.raises(RewardSignatureError, match=r"params \['completions'\] cannot be bound"):
        load_reward("think_format", completions=["x"])


def test_callable_without_signature_is_accepted():
    with pytest.raises(ValueError):
        inspect.signature(math.hypot)
    assert load_reward(math.hypot) is math.hypot


def infinite(completions, **kw):
    return [math.inf if "inf" in c else -math.inf if "neg" in c else 1.0 for c in completions]


def infinite_parts(completions, **kw):
    return {"a": [1.0] * len(completions), "b": [math.inf if "inf" in c else 0.5 for c in completions]}


def test_infinite_values_fail_only_their_samples_and_are_counted():
    out = RewardCombiner([infinite, "think_format"])(["p"] * 3, ["ok", "inf", "neg"])
    assert out.components["infinite"] == [1.0, None, None]
    assert out.rewards == [1.0, 0.0, 0.0] and all(math.isfinite(r) for r in out.rewards)
    assert [(f.kind, f.sample_index) for f in out.failures] == [("value", 1), ("value", 2)]
    assert "returned inf at index 1, expected a finite float | None" in out.failures[0].message
    assert out.metrics["errors/infinite"] == 2.0 and math.isfinite(out.metrics["reward/mean"])
    penalised = RewardCombiner([infinite], error_value=0.0)(["p"] * 2, ["ok", "inf"])
    assert penalised.rewards == [1.0, 0.0]
    parts = RewardCombiner([infinite_parts])(["p"] * 2, ["ok", "inf"])
    assert parts.components["infinite_parts/b"] == [0.5, None] and parts.components["infinite_parts/a"] == [1.0, 1.0]
    assert [f.sample_index for f in parts.failures] == [1]


def test_infinite_values_in_the_per_sample_retry_are_caught():
    def raises_on_boom(completions, **kw):
        if any("boom" in c for c in completions):
            raise ZeroDivisionError("boom")
        return [math.inf if "inf" in c else 1.0 for c in completions]

    out = RewardCombiner([raises_on_boom])(["p"] * 3, ["ok", "boom", "inf"])
    assert out.components["raises_on_boom"] == [1.0, None, None]
    assert sorted((f.kind, f.sample_index) for f in out.failures) == [("exception", 1), ("value", 2)]


def test_infinite_values_are_fatal_under_strict():
    with pytest.raises(RewardError, match=r"'infinite' failed \(value\) on sample 1"):
        RewardCombiner([infinite], strict=True)(["p"] * 2, ["ok", "inf"])


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_non_finite_or_non_numeric_weights_are_refused(weight):
    with pytest.raises(ValueError, match=r"RewardSpec\('think_format'\): weight must be a finite number, got"):
        RewardSpec("think_format", weight=weight)


def test_non_finite_error_value_is_refused():
    with pytest.raises(ValueError, match="error_value must be None or a finite number, got inf"):
        RewardCombiner(["think_format"], error_value=math.inf)


def test_one_function_twice_gets_distinct_default_names():
    combiner = RewardCombiner(
        [
            RewardSpec("math_accuracy"),
            RewardSpec("math_accuracy", weight=0.5),
            RewardSpec("target_length", params={"budget": 10}),
            RewardSpec("math_accuracy", weight=0.25),
        ]
    )
    assert list(combiner.fns) == ["math_accuracy", "math_accuracy_2", "target_length", "math_accuracy_3"]
    assert combiner.weights == {"math_accuracy": 1.0, "math_accuracy_2": 0.5, "target_length": 1.0,
                                "math_accuracy_3": 0.25}  # fmt: skip
    out = combiner(["q"] * 2, [r"\boxed{4}", r"\boxed{5}"], answer=["4", "4"])
    assert out.components["math_accuracy_2"] == [1.0, 0.0] and out.components["target_length"] == [0.9, 0.9]
    assert out.rewards == pytest.approx([1.0 + 0.5 + 0.9 + 0.25, 0.9])
    assert "errors/math_accuracy_3" in out.metrics


def test_default_names_skip_explicit_ones():
    names = RewardCombiner(
        [RewardSpec("think_format"), RewardSpec("markdown_style", name="think_format_2"), RewardSpec("think_format")]
    ).fns
    assert list(names) == ["think_format", "think_format_2", "think_format_3"]
    explicit_first = RewardCombiner([RewardSpec("markdown_style", name="think_format"), RewardSpec("think_format")])
    assert list(explicit_first.fns) == ["think_format", "think_format_2"]


def test_array_returns_are_read_and_text_is_refused():
    """TRL iterates a reward's return, so numpy arrays and torch tensors work there: here too (1-D only). A string
    such as "1.0" is a bug in the reward, not a score."""
    import numpy as np
    import torch

    def as_numpy(completions, **kw):
        return np.array([1.0, np.nan])

    def as_tensor(completions, **kw):
        return {"t": torch.tensor([0.5, 2.0])}

    def as_text(completions, **kw):
        return ["1.0", 0.0]

    def as_matrix(completions, **kw):
        return np.ones((2, 1))

    out = RewardCombiner([as_numpy, as_tensor, as_text, as_matrix])(["p"] * 2, ["a", "b"])
    assert out.components["as_numpy"] == [1.0, None] and out.components["as_tensor/t"] == [0.5, 2.0]
    assert out.components["as_text"] == [None, None]  # a bad return fails the reward on its whole batch
    text, matrix = (next(f.message for f in out.failures if f.reward == name) for name in ("as_text", "as_matrix"))
    assert "returned '1.0' at index 0, expected float | None, not text" in text
    assert "returned ndarray of shape (2, 1), expected a list (or 1-D array)" in matrix
