"""Bad dataset input: every error names the file, the row and the problem (type received, column, id), and the
malformed-rows advice comes from the caller."""

import json

import datasets
import pytest
from dsalign.alignment.chat import ConversationError, tokenize_prompt
from dsalign.alignment.data import DataError, load_conversations, load_prompts


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(path, **kwargs):
    with pytest.raises(DataError) as err:
        load_prompts(str(path), **kwargs)
    return str(err.value)


def test_mistyped_prompt_names_the_type_received(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": 5}, {"prompt": []}, {"prompt": {"role": "user", "content": "x" * 200}}, {"prompt": "ok?"}],
    )
    msg = _error(path)
    expected = f"{path}: line {{}}: field 'prompt': expected a non-empty string or a list of messages, got {{}}"
    assert expected.format(1, "int 5") in msg and expected.format(2, "an empty list") in msg
    got = next(line for line in msg.splitlines() if "line 3:" in line).split(", got ")[1]
    assert got.startswith("dict {'role': 'user', 'content': 'xxx") and got.endswith("...") and len(got) <= 70
    assert "'messages' must be" not in msg
    conv = _write_jsonl(tmp_path / "c.jsonl", [{"messages": "hi"}])
    with pytest.raises(DataError, match="field 'messages': expected a non-empty list of messages, got str 'hi'"):
        load_conversations(str(conv))


def test_null_prompt_is_called_null_not_missing(tmp_path):
    rows = [{"prompt": "a?", "answer": "1"}, {"prompt": None, "answer": "2"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "n.parquet"))
    msg = _error(tmp_path / "n.parquet")
    assert "n.parquet: row 2: field 'prompt': expected a non-empty string or a list of messages, got null (None)" in msg
    assert "missing" not in msg
    absent = _write_jsonl(tmp_path / "a.jsonl", [{"question": "q"}])
    assert "line 1: field 'prompt': missing (row has keys: question)" in _error(absent)


def test_mixed_type_column_names_column_and_rows(tmp_path):
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b"}, {"prompt": "c", "answer": 3}, {"prompt": "d", "answer": "4"}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    msg = _error(path)
    assert msg.startswith(f"{path}: rows are valid one by one but column 'answer' mixes types: ")
    assert "line 1 has int 1 but line 4 has str '4'" in msg
    assert "Could not convert" in msg  # pyarrow's own words are kept


def test_non_utf8_line_is_named_and_skippable(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n{"prompt": "b"}\n')
    msg = _error(path)
    assert f"{path}: line 2: field '<encoding>': not valid UTF-8 (byte 0xe9 at byte 16 of the line)" in msg
    ds, report = load_prompts(str(path), skip_invalid=True)
    assert report.num_invalid == 1 and ds["prompt_id"] == ["u.jsonl:1", "u.jsonl:3"]


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Editors on Windows save UTF-8 with a byte-order mark: JSON lines and JSON arrays read as without one."""
    rows = [{"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": "2"}]
    lines = tmp_path / "bom.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    array = tmp_path / "bom.json"
    array.write_text(json.dumps(rows, indent=1), encoding="utf-8-sig")
    for path in (lines, array):
        ds, report = load_prompts(str(path), skip_invalid=True)
        assert report.num_invalid == 0 and ds["answer"] == ["1", "2"], path


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not a parquet file")
    msg = _error(path)
    assert msg.startswith(f"{path}: cannot read as Parquet (") and "magic bytes" in msg


@pytest.mark.parametrize("id_field", ["id", "prompt_id"])
def test_duplicate_prompt_ids_name_both_rows(tmp_path, id_field):
    rows = [{id_field: "q1", "prompt": "a"}, {id_field: "q2", "prompt": "b"}, {id_field: "q1", "prompt": "c"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert f"{path}: line 3: field '{id_field}': duplicate id 'q1', already used by line 1" in _error(path)
    ds, report = load_prompts(str(path), skip_invalid=True)  # configured: the later row is dropped and counted
    assert ds["prompt_id"] == ["q1", "q2"] and report.num_invalid == 1
    # a conversation file may repeat a prompt_id: distillation keeps several traces of one prompt
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    conv = _write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": "q1", "messages": turns}] * 2)
    assert load_conversations(str(conv))[0]["prompt_id"] == ["q1", "q1"]


def test_skip_advice_comes_from_the_caller(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": 5}])
    assert _error(path).endswith("\nFix the rows or set skip_invalid=True to drop them.")
    custom = _error(path, skip_advice="set data.skip_invalid: true in the stage to drop them")
    assert custom.endswith("\nFix the rows or set data.skip_invalid: true in the stage to drop them.")
    bare = _error(path, skip_advice=None)
    assert bare.endswith("\nFix the rows.") and "skip_invalid" not in bare


def test_unknown_role_is_refused_by_loader_and_prompt_tokenizer(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": [{"role": "human", "content": "hi"}]}])
    assert "line 1: field 'prompt': messages[0].role is 'human', expected one of ('system', 'user', 'assistant')" in (
        _error(path)
    )
    # `dsalign generate --prompts` tokenizes its rows directly: a ConversationError (a ValueError, so the CLI prints
    # it) naming the row, not jinja2's TemplateError from inside the template
    human = [{"role": "human", "content": "hi"}]
    with pytest.raises(ConversationError, match=r"p\.jsonl line 3: messages\[0\]\.role is 'human'"):
        tokenize_prompt(tokenizer, human, where="p.jsonl line 3")
    with pytest.raises(ConversationError, match="p.jsonl line 3: the chat template refused the messages: unknown role"):
        tokenize_prompt(tokenizer, human, chat_template=tokenizer.chat_template + " ", where="p.jsonl line 3")
