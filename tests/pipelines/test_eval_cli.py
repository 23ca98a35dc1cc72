"""``dsalign eval``: paired held-out evaluation of checkpoints outside a run; bad inputs fail before any model loads."""

from __future__ import annotations

import json

import pytest
from dsalign.model import save_checkpoint
from dsalign.pipelines.cli import main
from dsalign.pipelines.config import AdditionTask
from dsalign.pipelines.demo_tokenizer import task_tokenizer
from dsalign.pipelines.stages import load_source

REWARD = '''
def odd_length(prompts, completions, completion_ids=None, answer=None, **kwargs):
    return [float(len(ids) % 2) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different untrained ``tiny`` checkpoints with the demo tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    tok = task_tokenizer(AdditionTask())
    paths = []
    for seed in (0, 1):
        model = load_source({"preset": "tiny"}, tok, seed)
        paths.append(str(save_checkpoint(model, root / f"m{seed}", write_extra=lambda d: tok.save_pretrained(str(d)))))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
                               for a, b in [(1, 2), (3, 4), (5, 1)]))  # fmt: skip
    (root / "rew.py").write_text(REWARD)
    return root, paths, prompts


def _eval(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_eval_scores_every_sample_and_pairs_checkpoints(checkpoints, capsys, tmp_path):
    root, (m0, m1), prompts = checkpoints
    out = tmp_path / "samples.jsonl"
    reward = f"{root}/rew.py:odd_length"
    common = ["--prompts", str(prompts), "--samples", "3", "--max-new-tokens", "9", "--reward", reward]
    code, text, _ = _eval(capsys, m0, m1, m0, *common, "--output", str(out), "--json")
    assert code == 0
    rows = [json.loads(line) for line in text.splitlines()]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and len(samples) == 3 * 3 * 3
    for row in rows:
        mine = [s for s in samples if s["checkpoint"] == row["checkpoint"]][:9]  # m0 appears twice: its first pass
        assert all(s["reward"] == float(s["num_tokens"] % 2) for s in mine)  # the reward saw each completion
        assert row["accuracy"] == pytest.approx(sum(s["reward"] for s in mine) / 9)
    # the same checkpoint again: the same samples (per-prompt seeds), so a paired difference of exactly 0
    assert rows[2]["delta_vs_first"] == 0 and rows[2]["delta_se"] == 0
    assert [s["completion"] for s in samples[18:]] == [s["completion"] for s in samples[:9]]
    assert [s["completion"] for s in samples[9:18]] != [s["completion"] for s in samples[:9]]  # another model
    code, table, _ = _eval(capsys, m0, m1, *common)
    assert code == 0 and "vs #1" in table.splitlines()[3] and "accuracy" in table.splitlines()[0]


def test_eval_reports_every_input_problem_before_loading(checkpoints, capsys, tmp_path):
    root, (m0, _), _ = checkpoints
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code, _, err = _eval(capsys, m0, str(tmp_path / "nowhere"), "--prompts", str(no_answer),
                         "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert code == 2 and "eval.path: 1 of 1 rows have no 'answer'" in err  # math_accuracy needs the gold answer
    assert f"checkpoint directory {tmp_path / 'nowhere'} does not exist" in err
    code, _, err = _eval(capsys, m0, "--reward", "nope:fn")
    assert code == 2 and "eval.reward.fn 'nope:fn'" in err
    code, _, err = _eval(capsys, m0, "--prompts", str(tmp_path / "missing.jsonl"))
    assert code == 2 and f"eval.path: {tmp_path / 'missing.jsonl'} does not exist" in err
    code, _, err = _eval(capsys, m0, "--samples", "0")
    assert code == 2 and "samples_per_prompt" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval: [\n")
    code, _, err = _eval(capsys, m0, "--config", str(bad))  # read as `dsalign run` reads configs
    assert code == 2 and f"{bad}: not valid YAML" in err
    assert not (tmp_path / "out.jsonl").exists()  # nothing written by a refused run


def test_eval_refuses_a_negative_length_target_and_a_non_mapping_eval_block(checkpoints, capsys, tmp_path):
    root, (m0, _), prompts = checkpoints
    with pytest.raises(SystemExit) as exit_:
        main(["eval", m0, "--length-target", "-3"])
    assert exit_.value.code == 2 and "--length-target: expected a positive integer, got -3" in capsys.readouterr().err
    listed = tmp_path / "listed.yaml"
    listed.write_text("name: x\noutput_dir: .\nstages: []\neval: [1, 2]\n")
    code, _, err = _eval(capsys, m0, "--config", str(listed), "--samples", "2")
    assert code == 2 and f"{listed}: eval: expected a mapping, got list [1, 2]" in err


def test_eval_json_is_strict_json_with_one_prompt(checkpoints, capsys, tmp_path):
    root, (m0, _), prompts = checkpoints
    one = tmp_path / "one.jsonl"
    one.write_text(prompts.read_text().splitlines()[0] + "\n")
    code, text, _ = _eval(capsys, m0, "--prompts", str(one), "--samples", "1", "--max-new-tokens", "4", "--json")
    row = json.loads(text.splitlines()[0], parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert code == 0 and row["acc_se"] is None  # the standard error of one prompt is undefined
