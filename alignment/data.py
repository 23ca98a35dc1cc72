"""Load prompt and conversation datasets from JSONL, Parquet, a local HF dataset directory, or (online) the Hub.

Two row schemas:

- ``prompt`` (GRPO, distillation): a ``prompt`` field, either a string or a list of chat messages ending with a
  user turn. Strings become ``[{"role": "user", "content": ...}]`` so the column has one type; the row's
  ``TEXT_PROMPT`` column records that it was a string (reward functions get it back as one, TRL's "standard"
  format, and plain-string completions with it; ``rewards.api.trl_reward_inputs``). Other columns
  (``answer``, ``ground_truth``, ``data_source``, ...) pass through untouched: reward functions receive them as
  keyword arguments (SPEC section 8).
- ``conversation`` (SFT): a ``messages`` field, a list of ``{role, content[, reasoning_content]}`` with at least one
  assistant turn (validated by ``chat.validate_messages``).

Every row gets a ``prompt_id`` (the ``id`` column if present, else an existing ``prompt_id`` column, else
``<file name>:<row>``) so traces and rollouts can be traced back to their prompt. In a prompt file the ids must be
unique (rollouts and traces are grouped by ``prompt_id``; two prompts sharing one would be merged); a conversation
file may repeat them (distillation keeps several traces of one prompt).

Malformed rows (broken JSON or UTF-8, missing, null or mistyped field, duplicate prompt id) raise ``DataError``
naming the file, the row (JSONL: the 1-based line number; other formats: the 1-based row number) and the field.
With ``skip_invalid=True`` they are dropped instead, counted in the returned ``LoadReport`` and logged. A file that
cannot be read at all, or a column whose rows disagree on its type, raises ``DataError`` naming the file (and the
column and rows).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .chat import ConversationError, describe_value, validate_messages

log = logging.getLogger(__name__)

SCHEMAS = ("prompt", "conversation")
SKIP_ADVICE = "set skip_invalid=True to drop them"
PROMPT_TYPES = "a non-empty string or a list of messages"
TEXT_PROMPT = "_prompt_is_text"  # True when the file's prompt was a string (internal: rewards do not receive it)
_Located = tuple[str, dict[str, Any]]  # (where: "line 4" / "row 4", normalised row)


class DataError(ValueError):
    """A dataset that cannot be used as is; the message names the file, row and field."""


@dataclass
class DataConfig:
    """Where a dataset lives and how its rows are checked."""

    path: str = field(metadata={"help": "a .jsonl/.json/.parquet file, a save_to_disk directory, or a Hub name"})
    schema: str = field(default="prompt", metadata={"help": "'prompt' (GRPO / distillation) or 'conversation' (SFT)"})
    split: str = field(default="train", metadata={"help": "split of a DatasetDict directory or a Hub dataset"})
    prompt_field: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    messages_field: str = field(default="messages", metadata={"help": "column holding the conversation"})
    id_field: str = field(default="id", metadata={"help": "column copied into prompt_id when present"})
    skip_invalid: bool = field(default=False, metadata={"help": "drop and count malformed rows instead of failing"})
    max_reported: int = field(default=20, metadata={"help": "how many problems an error or report spells out"})
    skip_advice: str | None = field(
        default=SKIP_ADVICE, metadata={"help": "ends the malformed-rows error ('Fix the rows or ...'); None: no advice"}
    )

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise DataError(f"schema {self.schema!r} unknown; use one of {SCHEMAS}")


@dataclass
class LoadReport:
    """What loading found: rows kept, rows skipped, and the first problems in words."""

    source: str
    num_rows: int = 0
    num_invalid: int = 0
    problems: list[str] = field(default_factory=list)


class _RowError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"field {field_name!r}: {message}")


def _present(row: dict[str, Any], name: str, expected: str) -> Any:
    """``row[name]``, or ``_RowError`` saying whether the field is absent or null (a null Parquet cell)."""
    if name not in row:
        raise _RowError(name, f"missing (row has keys: {', '.join(sorted(row)) or 'none'})")
    if row[name] is None:
        raise _RowError(name, f"expected {expected}, got null (None)")
    return row[name]


def _check_prompt(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    prompt = _present(row, cfg.prompt_field, PROMPT_TYPES)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _RowError(cfg.prompt_field, "empty string")
        return [{"role": "user", "content": prompt, "reasoning_content": None}]
    if not isinstance(prompt, list) or not prompt:
        raise _RowError(cfg.prompt_field, f"expected {PROMPT_TYPES}, got {describe_value(prompt)}")
    try:
        msgs = validate_messages(prompt, "prompt")
    except ConversationError as e:
        raise _RowError(cfg.prompt_field, str(e).removeprefix("prompt: ")) from None
    if msgs[-1]["role"] != "user":
        raise _RowError(cfg.prompt_field, f"a chat prompt must end with a user turn, not {msgs[-1]['role']!r}")
    return msgs


def _check_conversation(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    messages = _present(row, cfg.messages_field, "a non-empty list of messages")
    if not isinstance(messages, list) or not messages:
        raise _RowError(cfg.messages_field, f"expected a non-empty list of messages, got {describe_value(messages)}")
    try:
        msgs = validate_messages(messages, "messages")
    except ConversationError as e:
        raise _RowError(cfg.messages_field, str(e).removeprefix("messages: ")) from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise _RowError(cfg.messages_field, "no assistant turn to learn from")
    return msgs


def normalize_row(row: Any, cfg: DataConfig, default_id: str) -> dict[str, Any]:
    """Validate one row and return it with the schema field normalised and ``prompt_id`` set.

    Raises ``_RowError`` (caught by the loader, which adds file and row) on a malformed row.
    """
    if not isinstance(row, dict):
        raise _RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    out = dict(row)
    if cfg.schema == "prompt":
        out[cfg.prompt_field] = _check_prompt(row, cfg)
        out[TEXT_PROMPT] = isinstance(row[cfg.prompt_field], str)
    else:
        out[cfg.messages_field] = _check_conversation(row, cfg)
    rid = row.get(cfg.id_field, row.get("prompt_id"))
    if rid is not None and not isinstance(rid, (str, int)):
        raise _RowError(cfg.id_field, f"must be a string or an integer, got {type(rid).__name__}")
    out["prompt_id"] = str(rid) if rid is not None else default_id
    return out


def _prompt_id_field(row: dict[str, Any], cfg: DataConfig) -> str:
    """The column ``normalize_row`` takes ``prompt_id`` from (``prompt_id`` also when it falls back to the default)."""
    return cfg.id_field if cfg.id_field in row else "prompt_id"


# an undecodable byte b read with errors="surrogateescape" becomes the lone surrogate U+DC00 + b (b >= 0x80)
_UNDECODED = re.compile("[\udc80-\udcff]")


def _parse_line(line: str) -> Any:
    """The JSON object of one line, or the ``_RowError`` saying why it is not valid UTF-8 or JSON."""
    bad = _UNDECODED.search(line)
    if bad:
        byte = ord(bad.group()) - 0xDC00
        column = len(line[: bad.start()].encode("utf-8", "surrogateescape")) + 1
        problem = f"not valid UTF-8 (byte {byte:#04x} at byte {column} of the line); save the file as UTF-8"
        return _RowError("<encoding>", problem)
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return _RowError("<json>", f"not valid JSON ({e.msg}, column {e.colno})")


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed object or its error) for each non-blank line.

    Undecodable bytes are kept as surrogates (not a decode error for the whole file) so the bad line is named and,
    with ``skip_invalid``, dropped like any other malformed row."""
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a leading byte-order mark is not data
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append((f"line {lineno}", _parse_line(line)))
    return rows


def _starts_with_bracket(path: Path) -> bool:
    """Whether the file's first non-blank character is ``[`` (a JSON array, which no JSON-lines row can start)."""
    with path.open("rb") as f:
        chunk = f.read(4096).removeprefix(codecs.BOM_UTF8)
        while chunk:
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
            chunk = f.read(4096)
    return False


def _read_json_array(path: Path) -> list[tuple[str, Any]]:
    """A ``.json`` file holding one array of row objects (``datasets``' other JSON layout); rows are ``row i``. The
    whole file is one document, so a syntax error is the file's, named with its line and column."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            rows = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{path}: a JSON array that does not parse ({e.msg} at {where})") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]  # normalize_row refuses a non-object row


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_parquet(path: Path) -> datasets.Dataset:
    """The Parquet file as a dataset; a corrupt or non-Parquet file raises ``DataError`` naming it (pyarrow's own
    message does not)."""
    try:
        return datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... depending on the damage
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from e


def _read_table(cfg: DataConfig) -> tuple[str, list[tuple[str, Any]]]:
    path = Path(cfg.path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json" and _starts_with_bracket(path):
            return str(path), _read_json_array(path)
        if suffix in (".jsonl", ".json"):
            return str(path), _read_jsonl(path)
        if suffix == ".parquet":
            ds = _read_parquet(path)
        else:
            raise DataError(
                f"{path}: unsupported file type {suffix!r}; use .jsonl, .json (JSON lines or one array of objects) or "
                ".parquet"
            )
    elif path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a directory written by Dataset.save_to_disk ({e})") from None
        except Exception as e:  # corrupt arrow files, a broken state.json, ...
            raise DataError(f"{path}: cannot read the saved dataset ({type(e).__name__}: {e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; available: {', '.join(ds)} (a run config picks one "
                                "with data.split or eval.split)")  # fmt: skip
            ds = ds[cfg.split]
    elif path.suffix or path.is_absolute() or cfg.path.startswith("."):
        raise DataError(f"{cfg.path}: no such file or directory")
    elif _hub_offline():
        raise DataError(f"{cfg.path!r} is not a local path and the Hub is offline (HF_HUB_OFFLINE); pass a local file")
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    return str(path), [(f"row {i + 1}", row) for i, row in enumerate(ds.to_list())]


def _validate_rows(raw: list[tuple[str, Any]], cfg: DataConfig, source: str) -> tuple[list[_Located], LoadReport]:
    """Normalise every row; return the good ones with their locations and a report counting (and naming the first
    ``cfg.max_reported``) bad ones. In a prompt file a repeated ``prompt_id`` is a bad row (see module doc)."""
    report = LoadReport(source=source)
    stem = Path(source).name
    good: list[_Located] = []
    first_seen: dict[str, str] = {}
    for where, row in raw:
        try:
            if isinstance(row, _RowError):
                raise row
            out = normalize_row(row, cfg, default_id=f"{stem}:{where.split()[-1]}")
            pid = out["prompt_id"]
            if cfg.schema == "prompt" and pid in first_seen:
                raise _RowError(_prompt_id_field(row, cfg), f"duplicate id {pid!r}, already used by {first_seen[pid]}")
            first_seen.setdefault(pid, where)
            good.append((where, out))
        except _RowError as e:
            report.num_invalid += 1
            if len(report.problems) < cfg.max_reported:
                report.problems.append(f"{source}: {where}: {e}")
    return good, report


def _invalid_rows_error(report: LoadReport, cfg: DataConfig) -> DataError:
    """The error listing the malformed rows, ending with the caller's advice on dropping them (if it has any)."""
    more = report.num_invalid - len(report.problems)
    advice = f"Fix the rows or {cfg.skip_advice}." if cfg.skip_advice else "Fix the rows."
    return DataError(
        f"{report.num_invalid} malformed row(s) in {report.source}:\n  "
        + "\n  ".join(report.problems)
        + (f"\n  ... and {more} more" if more > 0 else "")
        + f"\n{advice}"
    )


def _arrow_converts(values: list[Any]) -> bool:
    """Whether ``datasets`` can store ``values`` as one column (the same conversion ``Dataset.from_list`` does)."""
    try:
        datasets.Dataset.from_dict({"column": values})
    except Exception:  # pyarrow raises several types for mixed column types
        return False
    return True


def _first_unconvertible(values: list[Any]) -> int:
    """Index of the first value that makes ``values`` unconvertible (``values`` as a whole is): a binary search for
    the shortest failing prefix, since a prefix that fails keeps failing as it grows."""
    lo, hi = 1, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if _arrow_converts(values[:mid]):
            lo = mid + 1
        else:
            hi = mid
    return hi - 1


def _mixed_column(good: list[_Located], columns: list[str]) -> str | None:
    """Which column mixes types, and which two rows disagree; None when no single column fails on its own.

    Only run once ``Dataset.from_list`` has failed, so the per-column conversions cost nothing in the normal case."""
    for col in columns:
        values = [row.get(col) for _, row in good]
        if _arrow_converts(values):
            continue
        bad = _first_unconvertible(values)
        earlier = [i for i in range(bad) if values[i] is not None]
        other = next((i for i in earlier if type(values[i]) is not type(values[bad])), earlier[0] if earlier else None)
        said = f"{good[bad][0]} has {describe_value(values[bad])}"
        if other is not None:
            said = f"{good[other][0]} has {describe_value(values[other])} but {said}"
        return f"column {col!r} mixes types: {said}"
    return None


def _to_dataset(good: list[_Located], source: str) -> datasets.Dataset:
    """The rows as one ``Dataset`` (missing columns as null); a column whose rows disagree on its type raises
    ``DataError`` naming the column and the first row that breaks it."""
    columns = list(dict.fromkeys(k for _, row in good for k in row))
    try:
        return datasets.Dataset.from_list([{k: row.get(k) for k in columns} for _, row in good])
    except Exception as e:  # pyarrow raises several types for mixed column types
        where = _mixed_column(good, columns) or "a column mixes types"
        raise DataError(
            f"{source}: rows are valid one by one but {where} (pyarrow: {e}); give each column one type in every row"
        ) from e


def load_records(cfg: DataConfig) -> tuple[datasets.Dataset, LoadReport]:
    """Load, validate and normalise a dataset; return it with a ``LoadReport``.

    Raises ``DataError`` listing every malformed row (up to ``cfg.max_reported``) unless ``cfg.skip_invalid``.
    """
    source, raw = _read_table(cfg)
    good, report = _validate_rows(raw, cfg, source)
    if report.num_invalid and not cfg.skip_invalid:
        raise _invalid_rows_error(report, cfg)
    if report.num_invalid:
        log.warning("skipped %d malformed row(s) of %s; first: %s", report.num_invalid, source, report.problems[0])
    if not good:
        raise DataError(f"{source}: no valid rows")
    report.num_rows = len(good)
    return _to_dataset(good, source), report


def load_prompts(path: str, **kwargs: Any) -> tuple[datasets.Dataset, LoadReport]:
    """``load_records`` with the ``prompt`` schema; kwargs are ``DataConfig`` fields."""
    return load_records(DataConfig(path=path, schema="prompt", **kwargs))


def load_conversations(path: str, **kwargs: Any) -> tuple[datasets.Dataset, LoadReport]:
    """``load_records`` with the ``conversation`` schema; kwargs are ``DataConfig`` fields."""
    return load_records(DataConfig(path=path, schema="conversation", **kwargs))
