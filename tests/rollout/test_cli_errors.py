"""Acceptance 5 (clear errors) and the ``dsalign generate`` / ``dsalign chat`` commands on a tiny checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dsalign.alignment.chat import ASSISTANT_TAG, USER_TAG, install_chat_template
from dsalign.alignment.rollout import RolloutEngine
from dsalign.alignment.sampling_params import SamplingParams
from dsalign.model import save_checkpoint
from dsalign.pipelines.cli import main
from dsalign.pipelines.generate import ChatSession, check_checkpoint_dir, load_engine

from .conftest import tiny_model

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[BOS, EOS, USER_TAG, ASSISTANT_TAG],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, how are you today?"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    return install_chat_template(fast, overwrite=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    torch.manual_seed(0)
    model = tiny_model(vocab_size=320, eos_token_id=1, bos_token_id=0)
    save_checkpoint(model, path, write_extra=lambda d: _tokenizer().save_pretrained(str(d)))
    return path


def test_bad_prompts_and_stop_types_are_refused():
    engine = RolloutEngine(tiny_model(), max_batch_size=2, max_len=16)
    with pytest.raises(ValueError, match="prompt 1: prompt of 16 tokens does not fit the context of 16"):
        engine.generate([[3, 4], [5] * 16])
    with pytest.raises(ValueError, match="prompt 0: empty prompt"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="string prompt needs a tokenizer"):
        engine.generate(["hello"])
    with pytest.raises(TypeError, match="stop must be a string or a list of strings, got int"):
        SamplingParams(stop=5)
    with pytest.raises(TypeError, match="stop strings must be str, got int"):
        SamplingParams(stop=["ok", 7])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate([[3]], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="speculative=True needs an MTP module"):
        RolloutEngine(tiny_model(num_nextn_predict_layers=0), speculative=True)


def test_checkpoint_directory_missing_files(tmp_path, checkpoint, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "nope", need_tokenizer=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing: config.json .*; model.safetensors"):
        check_checkpoint_dir(tmp_path / "empty", need_tokenizer=False)
    only_weights = tmp_path / "weights"
    only_weights.mkdir()
    for f in ("config.json", "model.safetensors"):
        (only_weights / f).write_bytes((checkpoint / f).read_bytes())
    check_checkpoint_dir(only_weights, need_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="tokenizer.json / tokenizer_config.json"):
        check_checkpoint_dir(only_weights, need_tokenizer=True)
    assert main(["chat", "--checkpoint", str(only_weights)]) == 2  # the CLI prints the message, exit code 2
    for row in ({"text": "hello"}, {"prompt": "hello"}):  # generate without a tokenizer: only prompt_ids work
        (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
        assert main(["generate", "--checkpoint", str(only_weights), "--prompts", str(tmp_path / "p.jsonl")]) == 2
        assert "has no tokenizer.json / tokenizer_config.json; give prompt_ids instead" in capsys.readouterr().err
    assert main(["model", "info", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="is a file; give the checkpoint's directory"):
        check_checkpoint_dir(only_weights / "config.json", need_tokenizer=False)


def test_generate_command_matches_engine(tmp_path, checkpoint, capsys):
    prompts = tmp_path / "p.jsonl"
    rows = [{"text": "hello world"}, {"prompt_ids": [5, 6, 7]}, {"prompt": [{"role": "user", "content": "hi"}]},
            {"prompt": "hi"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(out)]
    args += ["--device", "cpu"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "6", "--speculative"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    engine = load_engine(checkpoint, need_tokenizer=True, max_batch_size=2)
    want = engine.generate(
        [
            engine.encode("hello world", "x"),
            [5, 6, 7],
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
            ),
            engine.tokenizer.apply_chat_template(  # a string prompt is a user turn, as in the pipelines' files
                [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
            ),
        ],
        SamplingParams(max_new_tokens=6, temperature=0),
    )
    assert [r["token_ids"] for r in got] == [c.token_ids for c in want]
    assert [r["text"] for r in got] == [c.text for c in want]
    assert "MTP acceptance" in capsys.readouterr().err
    prompts.write_text('{"prompt": ""}\n')
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts)]) == 2
    assert "p.jsonl line 1: empty prompt" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a", "text": "b"}\n')
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts)]) == 2
    assert "line 1: expected an object with exactly one of prompt, text, prompt_ids, got ['prompt', 'text']" in (
        capsys.readouterr().err
    )
    prompts.write_text('{"prompt": "a"}\n{"prompt": [{"role": "human", "content": "hi"}]}\n')
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts)]) == 2
    assert "p.jsonl line 2: messages[0].role is 'human', expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exit code 2 with the flag named
        main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--batch-size", "0"])
    assert "argument --batch-size: expected a positive integer, got 0" in capsys.readouterr().err


def test_generate_seed_gives_each_prompt_its_own_stream(tmp_path, checkpoint):
    """--seed S: reproducible, and identical prompts still sample independently (seed S * 1000003 + line index, as
    the pipelines' rollouts derive per-prompt seeds); one shared seed made every prompt draw the same random stream."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [5, 6, 7]}) + "\n" + json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        args = ["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(out)]
        assert main([*args, "--device", "cpu", "--seed", "7", "--max-new-tokens", "24", "--temperature", "1.5"]) == 0
        outs.append([json.loads(line)["token_ids"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1]  # reproducible
    assert outs[0][0] != outs[0][1]  # the same prompt twice: two different samples


def test_chat_is_multi_turn_and_streams(checkpoint):
    engine = load_engine(checkpoint, need_tokenizer=True, max_batch_size=1)
    session = ChatSession(engine, SamplingParams(max_new_tokens=5, temperature=0))
    stream = io.StringIO()
    first = session.send("hello", stream=stream)
    assert stream.getvalue() == first + "\n"
    ids_after_first = session.prompt_ids()  # history rendered through the template, ending with the reply
    session.send("how are you", stream=io.StringIO())
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first
    rendered = engine.tokenizer.decode(ids_after_first)
    assert USER_TAG + "hello" + ASSISTANT_TAG in rendered
    stdin = io.StringIO("hello\n/reset\nhi\n/exit\n")
    out = io.StringIO()
    from dsalign.pipelines.generate import run_chat

    args = SimpleNamespace(
        checkpoint=str(checkpoint),
        max_len=None,
        speculative=True,
        system=None,
        max_new_tokens=4,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=None,
        stop=[],
    )
    assert run_chat(args, stdin=stdin, out=out) == 0
    assert out.getvalue().count("> ") == 4


def test_unreadable_config_or_tokenizer_is_named(tmp_path, checkpoint, capsys):
    """A checkpoint whose config.json or tokenizer files do not parse: one error line naming the file (transformers'
    own errors name none, or come as a traceback), for ``chat`` and ``eval`` and at preflight."""
    import shutil

    import yaml
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.preflight import PreflightError, preflight

    bad_config, bad_tok = tmp_path / "bad_config", tmp_path / "bad_tok"
    shutil.copytree(checkpoint, bad_config)
    (bad_config / "config.json").write_text("{bad")
    shutil.copytree(checkpoint, bad_tok)
    (bad_tok / "tokenizer.json").write_text((bad_tok / "tokenizer.json").read_text()[:12])
    assert main(["chat", "--checkpoint", str(bad_config)]) == 2
    assert f"{bad_config / 'config.json'}: not valid JSON" in capsys.readouterr().err
    for command in (["chat", "--checkpoint", str(bad_tok)], ["eval", str(bad_tok)]):
        assert main(command) == 2
        assert f"{bad_tok}: the tokenizer does not load (JSONDecodeError" in capsys.readouterr().err
    run = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    run.update(output_dir=str(tmp_path / "out"), tokenizer=str(bad_tok))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    with pytest.raises(PreflightError, match=f"tokenizer: {bad_tok}: the tokenizer does not load"):
        preflight(load_config(tmp_path / "run.yaml"))


def test_chat_with_a_stop_string_never_shows_it(checkpoint):
    """Streaming holds back text that may start a stop string, so the terminal shows the reply exactly once."""
    engine = load_engine(checkpoint, need_tokenizer=True, max_batch_size=1)
    base = ChatSession(engine, SamplingParams(max_new_tokens=12, temperature=0)).send("hello", stream=io.StringIO())
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    assert len(stop) == 3
    stream = io.StringIO()
    reply = ChatSession(engine, SamplingParams(max_new_tokens=12, temperature=0, stop=[stop])).send("hello", stream)
    assert stop not in reply and base.startswith(reply)
    assert stream.getvalue() == reply + "\n"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt_ids": [3.9, 4.2]}, r"line 1: token ids must be integers, got 3\.9 \(float\)"),
        ({"prompt_ids": "12"}, r"line 1: prompt_ids must be a list of token ids, got str"),
        ({"prompt_ids": [True, 5]}, r"line 1: token ids must be integers, got True \(bool\)"),
        ({"prompt": ["hi"]}, r"line 1: a chat prompt is a list of \{role, content\} messages, got an item 'hi'"),
    ],
)
def test_generate_refuses_malformed_prompt_rows(checkpoint, tmp_path, row, message):
    from dsalign.pipelines.generate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises((TypeError, ValueError), match=message):
        read_prompts(path, load_engine(checkpoint, need_tokenizer=True, max_batch_size=1))


def test_generate_names_the_line_of_bytes_that_are_not_utf8(checkpoint, tmp_path):
    """A prompts file with invalid UTF-8 names its line (it was a bare codec error); a byte-order mark is accepted."""
    from dsalign.pipelines.generate import read_prompts

    engine = load_engine(checkpoint, need_tokenizer=True, max_batch_size=1)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt_ids": [3, 4]}\n\xff\xfe{"prompt_ids": [3]}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 2: not valid UTF-8 \(byte 0xff\); save the file as UTF-8"):
        read_prompts(path, engine)
    path.write_bytes(b'\xef\xbb\xbf{"prompt_ids": [3, 4]}\n')
    assert read_prompts(path, engine) == [[3, 4]]


def test_max_len_past_the_models_positions_is_refused(checkpoint):
    limit = load_engine(checkpoint, need_tokenizer=True, max_batch_size=1).cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"--max-len {limit + 1}: .* has max_position_embeddings {limit}"):
        load_engine(checkpoint, need_tokenizer=True, max_batch_size=1, max_len=limit + 1)
    assert load_engine(checkpoint, need_tokenizer=True, max_batch_size=1, max_len=limit).max_len == limit


def _think_tokenizer():
    from dsalign.pipelines.demo_task import AdditionTask
    from dsalign.pipelines.demo_tokenizer import task_tokenizer

    return task_tokenizer(AdditionTask())  # <think> / </think> are special tokens there, as in many tokenizers


def test_completion_text_keeps_the_think_tags_and_drops_the_stop_token():
    from dsalign.alignment.rollout import completion_text

    tok = _think_tokenizer()
    reply = "<think>\n1+2=3\n</think>\n\n\\boxed{3}"
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) != reply  # what the engine's text was before
    assert completion_text(tok, ids, {tok.eos_token_id}) == reply
    assert completion_text(tok, ids[:-1], {tok.eos_token_id}) == reply  # cut by length: nothing to drop


def test_chat_shows_the_reasoning_and_keeps_it_in_the_history():
    """A reply ``<think>..</think>\\n\\nanswer`` is shown with its tags and goes back into the history as it was
    generated: the next turn's prompt holds the reply's own tokens."""
    from dsalign.alignment.chat import tokenize_prompt
    from dsalign.alignment.rollout import Completion, completion_text

    tok = _think_tokenizer()
    reply = "<think>\n1+2=3\n</think>\n\n\\boxed{3}"
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompts = []

    class Engine:  # the engine's contract as the session uses it, with a scripted reply
        tokenizer, default_stop_ids = tok, frozenset({tok.eos_token_id})
        stop_ids = RolloutEngine.stop_ids

        def generate(self, prompt_ids, params, on_token=None):
            prompts.append(prompt_ids[0])
            for i in range(len(reply_ids)):
                on_token(0, 0, reply_ids[i : i + 1])
            return [Completion(0, 0, prompt_ids[0], reply_ids, [0.0] * len(reply_ids), "stop", tok.eos_token_id,
                               completion_text(tok, reply_ids, self.default_stop_ids))]  # fmt: skip

    session = ChatSession(Engine(), SamplingParams(max_new_tokens=20, temperature=0))
    stream = io.StringIO()
    assert session.send("1 + 2?", stream=stream) == reply
    assert stream.getvalue() == reply + "\n"
    assert session.messages[1] == {"role": "assistant", "content": reply, "reasoning_content": None}
    session.send("and 2 + 2?", stream=io.StringIO())
    history = tokenize_prompt(tok, session.messages[:1], chat_template=tok.chat_template)
    assert prompts[1][: len(history)] == history
    assert prompts[1][len(prompts[0]) : len(prompts[0]) + len(reply_ids)] == reply_ids  # the reply as generated
