"""Acceptance 1 and 4: TRL rewards load by path and match; broken rewards are contained, counted and reported."""

import asyncio
import logging
import time

import pytest
from dsalign.rewards import (
    RewardCombiner,
    RewardError,
    RewardLoadError,
    RewardSpec,
    combine_rewards,
    completion_text,
    load_reward,
)

CONVERSATIONAL = [
    [{"role": "assistant", "content": "<think>\nreasoning\n</think>\nThe answer is \\boxed{\\frac{1}{3}}"}],
    [{"role": "assistant", "content": "<think>\nreasoning\nno close tag \\boxed{\\frac{1}{2}}"}],
    [{"role": "assistant", "content": "<think>a</think><think>b</think> \\boxed{\\frac{1}{3}}"}],
    [{"role": "assistant", "content": "\\boxed{3}"}],
]
PROMPTS = [[{"role": "user", "content": "What is 1/3?"}]] * 4
SOLUTIONS = [r"\frac{1}{3}", r"\frac{1}{3}", r"\frac{1}{3}", r"\frac{1}{3}"]


@pytest.mark.parametrize(
    "path", ["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward", "trl.rewards.reasoning_accuracy_reward"]
)
def test_trl_rewards_load_by_path_and_match_direct_calls(path):
    fn = load_reward(path)
    direct = fn(prompts=PROMPTS, completions=CONVERSATIONAL, completion_ids=None, solution=SOLUTIONS)
    assert len(set(direct)) > 1, "the batch should separate good from bad completions"
    out = RewardCombiner([RewardSpec(path, weight=2.0)])(PROMPTS, CONVERSATIONAL, None, solution=SOLUTIONS)
    name = next(iter(out.components))
    assert out.components[name] == direct
    assert out.rewards == [None if v is None else 2.0 * v for v in direct]
    assert out.failures == []


def test_trl_factory_reward_with_completion_ids():
    trl_rewards = pytest.importorskip("trl.rewards")
    fn = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    ids = [[1] * 70, [1] * 90, [1] * 100, [1] * 130]
    out = combine_rewards(
        [fn, RewardSpec("soft_overlong", params={"max_length": 100, "cache_length": 20})], PROMPTS, CONVERSATIONAL, ids
    )
    assert out.components["soft_overlong_punishment_reward"] == fn(ids) == out.components["soft_overlong"]


def test_load_by_file_path_and_errors(tmp_path):
    good = tmp_path / "my_reward.py"
    good.write_text(
        "def short(completions, **kw):\n    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    assert load_reward(f"{good}:short")(completions=["abc", "abcdefg"]) == [1.0, 0.0]
    with pytest.raises(RewardLoadError, match="does not exist"):
        load_reward(f"{tmp_path}/missing.py:short")
    with pytest.raises(RewardLoadError, match="has no attribute 'nope'"):
        load_reward(f"{good}:nope")
    with pytest.raises(RewardLoadError, match="not callable"):
        load_reward(f"{good}:NOT_CALLABLE")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(RewardLoadError, match="broken.py.*ModuleNotFoundError"):
        load_reward(f"{broken}:fn")
    with pytest.raises(RewardLoadError, match="importing module 'no_such_pkg.mod' failed"):
        load_reward("no_such_pkg.mod:fn")
    with pytest.raises(RewardLoadError, match="not a built-in"):
        load_reward("no_such_reward")
    with pytest.raises(RewardLoadError, match=r"no parameter\(s\) \['max_lenght'\]"):
        load_reward("soft_overlong", max_lenght=10, cache_length=2)


def test_weighted_nansum_and_dict_components_and_async():
    def partial_reward(completions, **kw):
        return [None, 1.0, None]

    def two_parts(completions, **kw):
        return {"a": [1.0, 1.0, None], "b": [0.5, float("nan"), None]}

    async def slow_async(completions, **kw):
        await asyncio.sleep(0.01)
        return [2.0, 2.0, None]

    combiner = RewardCombiner(
        [RewardSpec(partial_reward, weight=10.0), RewardSpec(two_parts, weight=2.0), RewardSpec(slow_async)]
    )
    out = combiner(["p"] * 3, ["x", "y", "z"])
    assert out.components["two_parts/b"] == [0.5, None, None]  # NaN read as None, like TRL
    assert out.rewards == [2.0 + 1.0 + 2.0, 10.0 + 2.0 + 2.0, None]  # None parts skipped; all-None row is None
    assert out.metrics["reward/none_frac"] == pytest.approx(1 / 3)
    assert out.metrics["errors/total"] == 0.0


def test_duplicate_explicit_names_are_refused():
    with pytest.raises(ValueError, match="two rewards are named 'fmt'"):
        RewardCombiner([RewardSpec("think_format", name="fmt"), RewardSpec("markdown_style", name="fmt")])


def flaky(completions, **kw):
    """Raises on the sample mentioning 'boom' (any batch containing it)."""
    if any("boom" in c for c in completions):
        raise ZeroDivisionError("cannot score boom")
    return [1.0] * len(completions)


def sleepy(completions, **kw):
    time.sleep(5)
    return [1.0] * len(completions)


def wrong_length(completions, **kw):
    return [1.0]


def test_raising_hanging_and_wrong_length_rewards_do_not_kill_the_batch(caplog):
    combiner = RewardCombiner(
        [RewardSpec(flaky), RewardSpec(sleepy, timeout_s=0.3), RewardSpec(wrong_length), RewardSpec("think_format")]
    )
    completions = ["<think>a</think>ok", "<think>a</think>boom", "<think>a</think>fine"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dsalign.rewards"):
        out = combiner(["p"] * 3, completions)
    assert time.monotonic() - start < 3.0
    assert out.components["flaky"] == [1.0, None, 1.0]  # only the offending sample lost its value
    assert out.components["sleepy"] == [None] * 3 and out.components["wrong_length"] == [None] * 3
    assert out.rewards == [2.0, 1.0, 2.0]
    kinds = sorted((f.reward, f.kind, f.sample_index) for f in out.failures)
    assert kinds == [("flaky", "exception", 1), ("sleepy", "timeout", None), ("wrong_length", "length", None)]
    assert out.metrics["errors/flaky"] == 1.0 and out.metrics["errors/total"] == 3.0
    flaky_failure = next(f for f in out.failures if f.reward == "flaky")
    assert "ZeroDivisionError: cannot score boom" in str(flaky_failure) and "boom" in flaky_failure.sample
    assert "cannot score boom" in caplog.text and "returned 1 rewards for 3 completions" in caplog.text


def test_error_value_zero_policy():
    out = RewardCombiner([flaky], error_value=0.0)(["p"] * 2, ["ok", "boom"])
    assert out.components["flaky"] == [1.0, 0.0] and out.rewards == [1.0, 0.0]


def test_strict_makes_failures_fatal_with_the_same_message():
    completions = ["ok", "boom"]
    lenient = RewardCombiner([flaky])(["p"] * 2, completions)
    with pytest.raises(RewardError) as excinfo:
        RewardCombiner([flaky], strict=True)(["p"] * 2, completions)
    assert str(excinfo.value) == str(lenient.failures[0])
    with pytest.raises(RewardError, match=r"'sleepy' failed \(timeout\)"):
        RewardCombiner([RewardSpec(sleepy, timeout_s=0.2)], strict=True)(["p"], ["x"])


VERL_SCORE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, partial=0.0):
    if data_source == "skip":
        return None
    hit = float(ground_truth in solution_str)
    return {"score": hit + partial * (1 - hit), "acc": hit} if extra_info else hit
'''


def test_verl_compute_score_is_adapted(tmp_path):
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)`` (float or dict with "score") is
    called per sample, its ground truth read from ``ground_truth``, ``reward_model["ground_truth"]`` or ``answer``."""
    path = tmp_path / "verl_reward.py"
    path.write_text(VERL_SCORE)
    fn = load_reward(f"{path}:compute_score", partial=0.25)
    completions = ["it is 4", "5", [{"role": "assistant", "content": "4!"}]]
    assert fn(["p"] * 3, completions, answer=["4", "4", "4"]) == [1.0, 0.0, 1.0]
    model_col = [{"ground_truth": "5"}] * 3
    assert fn(["p"] * 3, completions, reward_model=model_col, extra_info=[{"i": 1}] * 3) == [0.25, 1.0, 0.25]
    assert fn(["p"] * 3, completions, ground_truth=["4"] * 3, data_source=["a", "skip", "a"]) == [1.0, None, 1.0]
    combined = RewardCombiner([RewardSpec(f"{path}:compute_score", weight=2.0), RewardSpec("think_format")])
    out = combined(["p"] * 3, completions, answer=["4", "4", "4"])
    assert out.components["compute_score"] == [1.0, 0.0, 1.0] and out.rewards == [2.0, 0.0, 2.0]
    missing = combined(["p"], ["4"])  # no ground truth column: a contained failure naming what is needed
    assert missing.failures and "needs a ground truth per sample" in missing.failures[0].message


def test_timeouts_count_from_the_reward_start_not_from_the_wait():
    """Rewards run in parallel and are collected in order: one collected after a slow reward must not get the slow
    one's time on top of its own budget."""
    def slow_2s(completions, **kw):
        time.sleep(2.0)
        return [1.0] * len(completions)

    def slow_3s(completions, **kw):
        time.sleep(3.0)
        return [1.0] * len(completions)

    combiner = RewardCombiner([RewardSpec(slow_2s, timeout_s=5.0), RewardSpec(slow_3s, timeout_s=2.5)])
    out = combiner(["p"], ["x"])
    assert out.components["slow_2s"] == [1.0]
    assert out.components["slow_3s"] == [None]  # started with slow_2s: its 2.5 s ran out before its 3 s of work
    assert [(f.reward, f.kind) for f in out.failures] == [("slow_3s", "timeout")]


def test_per_sample_retry_spends_the_same_budget_and_starts_no_thread_after_it():
    calls = []

    def fails_on_batches(completions, **kw):
        calls.append(len(completions))
        if len(completions) > 1:
            raise RuntimeError(f"batch of {len(completions)}")
        time.sleep(0.4)
        return [1.0]

    start = time.monotonic()
    out = RewardCombiner([RewardSpec(fails_on_batches, timeout_s=1.0)])(["p"] * 6, ["x"] * 6)
    assert time.monotonic() - start < 1.6, "the retry got a fresh budget"
    scored = [v for v in out.components["fails_on_batches"] if v is not None]
    assert 1 <= len(scored) <= 3 and calls[0] == 6 and len(calls) <= 1 + len(scored) + 1
    timeouts = [f.sample_index for f in out.failures if f.kind == "timeout"]
    assert len(timeouts) == 6 - len(scored)


def test_batch_exception_is_reported_when_every_sample_succeeds_alone():
    def batch_only_bug(completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("cannot handle batches")
        return [1.0]

    out = RewardCombiner([batch_only_bug])(["p"] * 3, ["a", "b", "c"])
    assert out.components["batch_only_bug"] == [1.0, 1.0, 1.0]  # values kept
    assert len(out.failures) == 1 and out.failures[0].sample_index is None
    assert "cannot handle batches" in str(out.failures[0]) and out.metrics["errors/total"] == 1.0
    with pytest.raises(RewardError, match="cannot handle batches"):
        RewardCombiner([batch_only_bug], strict=True)(["p"] * 3, ["a", "b", "c"])


def test_dict_reward_failing_on_one_sample_is_penalised_once():
    def two_parts(completions, **kw):
        if any(c == "bad" for c in completions):
            raise ValueError("bad sample")
        return {"a": [1.0] * len(completions), "b": [1.0] * len(completions)}

    out = RewardCombiner([two_parts], error_value=-1.0)(["p"] * 3, ["ok", "bad", "ok"])
    assert out.rewards == [2.0, -1.0, 2.0]
    assert out.components["two_parts/a"] == [1.0, None, 1.0] and out.components["two_parts/b"] == [1.0, None, 1.0]
    assert out.components["two_parts"] == [None, -1.0, None]
    lenient = RewardCombiner([two_parts])(["p"] * 3, ["ok", "bad", "ok"])
    assert lenient.rewards == [2.0, None, 2.0] and set(lenient.components) == {"two_parts/a", "two_parts/b"}


def test_tool_messages_and_empty_content_are_not_the_answer():
    completion = [
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc", "arguments": "6*7"}}]},
        {"role": "tool", "content": "The answer is 42."},
        {"role": "assistant", "content": [{"type": "text", "text": "So it is \\boxed{41}."}]},
    ]
    out = combine_rewards(["math_accuracy"], ["q"], [completion], answer=["42"])
    assert out.rewards == [0.0]  # graded on what the model said, not on the tool's output
    assert completion_text(completion) == "So it is \\boxed{41}."
