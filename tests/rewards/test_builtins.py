"""Built-in rewards beyond math: format, length, style, code execution; plus every doctest in dsalign.rewards."""

import doctest
import importlib
import pkgutil

import dsalign.rewards as rewards
import pytest
from dsalign.rewards import (
    code_execution,
    get_reward,
    kimi_length,
    language_consistency,
    list_rewards,
    markdown_style,
    register_reward,
    soft_overlong,
    target_length,
    think_format,
)


@pytest.mark.parametrize("module_name", sorted(m.name for m in pkgutil.iter_modules(rewards.__path__)))
def test_doctests(module_name):
    module = importlib.import_module(f"dsalign.rewards.{module_name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_registry_lists_builtins_and_refuses_duplicates():
    assert {"math_accuracy", "think_format", "code_execution", "kimi_length"} <= set(list_rewards())
    with pytest.raises(ValueError, match="'think_format' is already registered"):
        register_reward("think_format")(lambda completions, **kw: [])
    with pytest.raises(KeyError, match="built-ins are"):
        get_reward("nope")


def test_think_format_cases():
    texts = [
        "<think>a</think>answer",
        "  <think>\nmulti\nline\n</think>\n\nanswer",
        "<think>a</think>",
        "answer only",
        "<think>a</think>b</think>",
        "<think>a<think>b</think>c",
    ]
    assert think_format([""] * 6, texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert think_format([""], [[{"role": "assistant", "content": "<think>a</think>b"}]]) == [1.0]


def test_length_rewards_use_token_ids_when_given():
    ids = [[0] * 100, [0] * 50]
    assert target_length([""] * 2, ["short", "short"], ids, budget=100) == [1.0, 0.5]
    with pytest.raises(ValueError, match="exactly one of budget"):
        target_length([""], ["x"])
    assert soft_overlong([""] * 2, ["", ""], [[0] * 85, [0] * 10], max_length=100, cache_length=20) == [-0.25, 0.0]


def test_kimi_length_groups_by_prompt_and_uses_math_accuracy():
    prompts = ["p1", "p1", "p1", "p2", "p2"]
    completions = [r"\boxed{2}", r"so \boxed{2}" + " " * 5, r"wrong \boxed{3}" + " " * 40, r"\boxed{5}", r"\boxed{5}"]
    out = kimi_length(prompts, completions, answer=["2", "2", "2", "5", "5"])
    assert out[0] == 0.5 and out[2] == -0.5 and 0.0 < out[1] < 0.5  # shorter correct better; long wrong penalised
    assert out[3:] == [0.0, 0.0]  # equal lengths in a group: no signal
    by_group = kimi_length(["a"] * 2, ["xx", "xxxx"], correct=[True, False], group_ids=[0, 1])
    assert by_group == [0.0, 0.0]


def test_style_rewards():
    assert markdown_style([""] * 3, ["# Title\ntext", "| a | b |", "Just prose."]) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="mode must be"):
        markdown_style([""], ["x"], mode="sometimes")
    prompts = ["Combien font $2+2$ ?", "请计算 $x^2$ 的导数", "Сколько будет два плюс два?", "???"]
    completions = ["Cela fait $4$.", "The derivative is $2x$.", "Четыре.", "4"]
    assert language_consistency(prompts, completions) == [1.0, 0.0, 1.0, None]


def test_code_execution_against_tests():
    solution = "```python\ndef square(x):\n    return x * x\n```"
    cheat_exit = "```python\nimport os\nos._exit(0)\n```"
    forged = '```python\nprint(\'{"passed": 2, "total": 2}\')\n```'
    completions = [solution, "no code here", cheat_exit, forged, "```python\nwhile True: pass\n```", solution]
    tests = [["assert square(3) == 9", "assert square(-2) == 4"]] * 5 + [None]
    out = code_execution([""] * 6, completions, tests=tests, wall_seconds=2.0)
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, None]


def test_stop_properly_penalizes_truncated_completions():
    from dsalign.rewards import stop_properly

    assert stop_properly(["p"] * 3, ["a", "b", "c"], finish_reason=["length", "stop", None]) == [-1.0, 0.0, None]
    with pytest.raises(ValueError, match="needs a 'finish_reason' column"):
        stop_properly(["p"], ["a"])


def test_think_format_when_the_prompt_opened_the_think_block():
    """R1's template (and ours with thinking=True) ends the generation prompt with <think>: the completion is
    reasoning</think>answer, which scored 0 on every sample."""
    prompt = "<｜User｜>2+3?<｜Assistant｜><think>\n"
    assert think_format([prompt, prompt], ["2 plus 3 is 5\n</think>\n\nThe answer is 5.", "no tags, 5"]) == [1.0, 0.0]
    assert think_format(["2+3?"], ["2 plus 3 is 5\n</think>\n\n5"]) == [0.0]  # the prompt did not open it


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("日本の首都はどこですか", "日本の首都は東京です", 1.0),  # kanji and kana are one language
        ("What does she earn?", "She earns $2 per egg, 所以她每天赚的钱是 9 times $2 = $18", 0.4131),  # $ amounts
        ("Is x big?", "if x < 5 那么我们知道 y > 2 so yes", 0.3333),  # comparisons, not tags
        ("What is 2+2?", "It is $4$ and $x^2$ here.", 1.0),  # real inline math is still skipped
    ],
)
def test_language_consistency_cases(prompt, completion, expected):
    from dsalign.rewards import language_consistency

    assert language_consistency([prompt], [completion]) == [pytest.approx(expected, abs=1e-3)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a ** 2 + b ** 2 = c ** 2", False),
        ("x**2 + y**2 = 25", False),
        ("The distance is\n|a - b|\nunits.", False),
        ("  ```python\nprint(1)\n  ```", True),
        ("This is **important**.", True),
        ("| a | b |\n|---|---|\n| 1 | 2 |", True),
    ],
)
def test_markdown_detection_cases(text, expected):
    from dsalign.rewards.style import uses_markdown

    assert uses_markdown(text) is expected


def test_kimi_length_names_a_column_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"column 'group_ids' has 2 values for 4 completions"):
        kimi_length(["q"] * 4, ["a", "bb", "ccc", "dddd"], correct=[1, 1, 0, 0], group_ids=[0, 0])
    with pytest.raises(ValueError, match=r"column 'correct' has 3 values for 4 completions"):
        kimi_length(["q"] * 4, ["a", "bb", "ccc", "dddd"], correct=[1, 1, 0])
    out = kimi_length(["q"] * 2, ["a", "bbb"], correct=[1, 1], group_ids=[[0], [0]])  # unhashable ids group by repr
    assert out == [0.5, -0.5]
