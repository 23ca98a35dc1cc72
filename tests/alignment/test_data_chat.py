"""Dataset loading (errors name file, row and field), the chat template and assistant-only masks."""

import json

import datasets
import pytest
from dsalign.alignment.chat import ConversationError, render, tokenize_conversation, tokenize_prompt
from dsalign.alignment.data import DataError, load_conversations, load_prompts


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    json.dumps({"id": "q1", "prompt": "What is 2 + 2?", "answer": "4"}),
    json.dumps(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}], "answer": "6"}
    ),
]


def test_broken_row_and_missing_prompt_are_named(tmp_path):
    path = _write_jsonl(
        tmp_path / "prompts.jsonl",
        [GOOD[0], '{"prompt": "unterminated', GOOD[1], json.dumps({"question": "no prompt here", "answer": "1"})],
    )
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    msg = str(err.value)
    assert f"{path}: line 2: field '<json>': not valid JSON" in msg
    assert f"{path}: line 4: field 'prompt': missing (row has keys: answer, question)" in msg
    assert "2 malformed row(s)" in msg and "skip_invalid=True" in msg


def test_skip_invalid_counts_and_reports(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [GOOD[0], "not json", "", GOOD[1], json.dumps({"prompt": [{"role": "assistant", "content": "hi"}]})],
    )
    ds, report = load_prompts(str(path), skip_invalid=True)
    assert len(ds) == report.num_rows == 2 and report.num_invalid == 2
    assert report.problems[0].startswith(f"{path}: line 2:")
    assert report.problems[1].startswith(f"{path}: line 5: field 'prompt'")
    assert ds["prompt_id"] == ["q1", "p.jsonl:4"]
    assert ds[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?", "reasoning_content": None}]
    assert ds["answer"] == ["4", "6"]


def test_parquet_and_saved_dataset_dir(tmp_path):
    rows = [{"prompt": "a?", "answer": "1"}, {"prompt": "", "answer": "2"}, {"prompt": "c?", "answer": "3"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: row 2: field 'prompt': empty string"):
        load_prompts(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([rows[0], rows[2]])}).save_to_disk(str(tmp_path / "hf"))
    ds, report = load_prompts(str(tmp_path / "hf"))
    assert ds["answer"] == ["1", "3"] and report.num_invalid == 0
    with pytest.raises(DataError, match="no split 'test'"):
        load_prompts(str(tmp_path / "hf"), split="test")


def test_hub_name_refused_offline_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="Hub is offline"):
        load_prompts("some-org/some-dataset")
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_conversation_schema_errors(tmp_path):
    path = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}),
        ],
    )
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    assert "line 2: field 'messages': no assistant turn" in str(err.value)
    assert "line 3: field 'messages': messages[1].role is 'bot'" in str(err.value)


CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "two plus two is four"},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Eleven is prime."},
]


def test_template_renders_deepseek_layout(tokenizer):
    text = render(tokenizer, CONV)
    assert text == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2 + 2?<｜Assistant｜>"
        "<think>\ntwo plus two is four\n</think>\n\nThe answer is 4.<｜end▁of▁sentence｜>"
        "<｜User｜>Name a prime number.<｜Assistant｜>Eleven is prime.<｜end▁of▁sentence｜>"
    )
    prompt = tokenizer.decode(tokenize_prompt(tokenizer, CONV[:2], thinking=True))
    assert prompt.endswith("What is 2 + 2?<｜Assistant｜><think>\n")


@pytest.mark.parametrize("thinking", [False, True])
def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer, thinking):
    conv = tokenize_conversation(tokenizer, CONV, thinking=thinking)
    spans, cur = [], []
    for tok, m in zip(conv.input_ids, conv.assistant_mask):
        if m:
            cur.append(tok)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    eos = tokenizer.eos_token
    if thinking:  # "<think>\n" belongs to the prompt, the model writes the rest
        assert spans == [
            f"two plus two is four\n</think>\n\nThe answer is 4.{eos}",
            f"\n</think>\n\nEleven is prime.{eos}",
        ]
    else:
        assert spans == [f"<think>\ntwo plus two is four\n</think>\n\nThe answer is 4.{eos}", f"Eleven is prime.{eos}"]
    # the {% generation %} markers in the template agree with the prefix-rendered mask
    hf = tokenizer.apply_chat_template(
        CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, thinking=thinking
    )
    assert hf["input_ids"] == conv.input_ids and hf["assistant_masks"] == conv.assistant_mask
    labels = conv.labels()
    assert all((lab == -100) != bool(m) for lab, m in zip(labels, conv.assistant_mask))


def test_conversation_errors_and_truncation(tokenizer):
    with pytest.raises(ConversationError, match="row 7: messages\\[1\\] is an assistant turn not preceded"):
        tokenize_conversation(tokenizer, [CONV[0], CONV[2]], where="row 7")
    with pytest.raises(ConversationError, match="no assistant token left after truncation"):
        tokenize_conversation(tokenizer, CONV, max_length=5)
    short = tokenize_conversation(tokenizer, CONV, max_length=30)
    assert len(short.input_ids) == 30 and any(short.assistant_mask)
    full = tokenize_conversation(tokenizer, CONV)
    assert short.truncated and short.full_length == len(full.input_ids) > 30 and not full.truncated


def test_sft_examples_count_truncated_conversations(tokenizer, caplog):
    from dsalign.alignment.sft import SFTConfig, build_sft_examples

    rows = [{"messages": CONV}, {"messages": CONV[:3]}, {"messages": CONV, "prompt_id": "long-2"}]
    full = len(tokenize_conversation(tokenizer, CONV).input_ids)
    short = len(tokenize_conversation(tokenizer, CONV[:3]).input_ids)
    with caplog.at_level("WARNING", logger="dsalign.alignment.sft"):
        examples, skipped = build_sft_examples(rows, tokenizer, SFTConfig(max_length=short))
    assert skipped == 0 and [len(e["input_ids"]) for e in examples] == [short] * 3
    assert f"2 of 3 conversations were cut to max_length={short} tokens (longest {full} tokens; first: row 1)" in (
        caplog.text
    )
    caplog.clear()
    build_sft_examples(rows, tokenizer, SFTConfig(max_length=full))
    assert "were cut" not in caplog.text


def test_json_array_file_is_read_and_a_broken_one_is_named(tmp_path):
    rows = [{"id": "q1", "prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    ds, report = load_prompts(str(good))
    assert ds["answer"] == ["4", "6"] and report.num_invalid == 0
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "a", "answer": "1"},\n  {"prompt": "b" "answer": "2"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: a JSON array that does not parse \(.* line 3"):
        load_prompts(str(bad))
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"prompt": "a", "answer": "1"}, 7]', encoding="utf-8")
    with pytest.raises(DataError, match=r"mixed.json: row 2: .*expected a JSON object, got int"):
        load_prompts(str(mixed))


def test_missing_messages_field_and_no_assistant_turn_are_named(tokenizer):
    from dsalign.alignment.sft import SFTConfig, build_sft_examples

    rows = [{"messages": CONV}, {"conversation": CONV, "prompt_id": "c2"}, {"messages": CONV[:1]}]
    with pytest.raises(ConversationError, match=r"row 2 \(prompt_id c2\): no 'messages' field \(fields: \["):
        build_sft_examples(rows, tokenizer, SFTConfig())
    examples, skipped = build_sft_examples(rows, tokenizer, SFTConfig(skip_invalid=True))
    assert len(examples) == 1 and skipped == 2
    with pytest.raises(ConversationError, match="row 3: no assistant turn to learn from"):
        tokenize_conversation(tokenizer, CONV[:1], where="row 3")
