"""Load prompt and conversation datasets from JSONL, Parquet, a local HF dataset directory, or (online) the Hub.

Two row schemas:

- ``prompt`` (GRPO, distillation): a ``prompt`` field, either a string or a list of chat messages ending with a
  user turn. Strings become ``[{"role": "user", "content": ...}]`` so the column has one type. Other columns
  (``answer``, ``ground_truth``, ``data_source``, ...) pass through untouched: reward functions receive them as
  keyword arguments (SPEC section 8).
- ``conversation`` (SFT): a ``messages`` field, a list of ``{role, content[, reasoning_content]}`` with at least one
  assistant turn (validated by ``chat.validate_messages``).

Every row gets a ``prompt_id`` (the ``id`` column if present, else an existing ``prompt_id`` column, else
``<file name>:<row>``) so traces and rollouts can be traced back to their prompt.

Malformed rows (broken JSON, missing or mistyped field) raise ``DataError`` naming the file, the row (JSONL: the
1-based line number; other formats: the 1-based row number) and the field. With ``skip_invalid=True`` they are
dropped instead, counted in the returned ``LoadReport`` and logged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .chat import ConversationError, validate_messages

log = logging.getLogger(__name__)

SCHEMAS = ("prompt", "conversation")


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


def _check_prompt(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    if cfg.prompt_field not in row or row[cfg.prompt_field] is None:
        raise _RowError(cfg.prompt_field, f"missing (row has keys: {', '.join(sorted(row)) or 'none'})")
    prompt = row[cfg.prompt_field]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _RowError(cfg.prompt_field, "empty string")
        return [{"role": "user", "content": prompt, "reasoning_content": None}]
    try:
        msgs = validate_messages(prompt, "prompt")
    except ConversationError as e:
        raise _RowError(cfg.prompt_field, str(e).removeprefix("prompt: ")) from None
    if msgs[-1]["role"] != "user":
        raise _RowError(cfg.prompt_field, f"a chat prompt must end with a user turn, not {msgs[-1]['role']!r}")
    return msgs


def _check_conversation(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    if cfg.messages_field not in row or row[cfg.messages_field] is None:
        raise _RowError(cfg.messages_field, f"missing (row has keys: {', '.join(sorted(row)) or 'none'})")
    try:
        msgs = validate_messages(row[cfg.messages_field], "messages")
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
    else:
        out[cfg.messages_field] = _check_conversation(row, cfg)
    rid = row.get(cfg.id_field, row.get("prompt_id"))
    if rid is not None and not isinstance(rid, (str, int)):
        raise _RowError(cfg.id_field, f"must be a string or an integer, got {type(rid).__name__}")
    out["prompt_id"] = str(rid) if rid is not None else default_id
    return out


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed object or the JSON error) for each non-blank line."""
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"line {lineno}", _RowError("<json>", f"not valid JSON ({e.msg} at column {e.colno})")))
    return rows


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_table(cfg: DataConfig) -> tuple[str, list[tuple[str, Any]]]:
    path = Path(cfg.path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return str(path), _read_jsonl(path)
        if suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json (JSON lines) or .parquet")
    elif path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a directory written by Dataset.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; available: {', '.join(ds)}")
            ds = ds[cfg.split]
    elif path.suffix or path.is_absolute() or cfg.path.startswith("."):
        raise DataError(f"{cfg.path}: no such file or directory")
    elif _hub_offline():
        raise DataError(f"{cfg.path!r} is not a local path and the Hub is offline (HF_HUB_OFFLINE); pass a local file")
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    return str(path), [(f"row {i + 1}", row) for i, row in enumerate(ds.to_list())]


def load_records(cfg: DataConfig) -> tuple[datasets.Dataset, LoadReport]:
    """Load, validate and normalise a dataset; return it with a ``LoadReport``.

    Raises ``DataError`` listing every malformed row (up to ``cfg.max_reported``) unless ``cfg.skip_invalid``.
    """
    source, raw = _read_table(cfg)
    report = LoadReport(source=source)
    stem = Path(source).name
    good: list[dict[str, Any]] = []
    for where, row in raw:
        try:
            if isinstance(row, _RowError):
                raise row
            good.append(normalize_row(row, cfg, default_id=f"{stem}:{where.split()[-1]}"))
        except _RowError as e:
            report.num_invalid += 1
            if len(report.problems) < cfg.max_reported:
                report.problems.append(f"{source}: {where}: {e}")
    if report.num_invalid and not cfg.skip_invalid:
        more = report.num_invalid - len(report.problems)
        raise DataError(
            f"{report.num_invalid} malformed row(s) in {source}:\n  "
            + "\n  ".join(report.problems)
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix the rows or set skip_invalid=True to drop them."
        )
    if report.num_invalid:
        log.warning("skipped %d malformed row(s) of %s; first: %s", report.num_invalid, source, report.problems[0])
    if not good:
        raise DataError(f"{source}: no valid rows")
    report.num_rows = len(good)
    columns = list(dict.fromkeys(k for row in good for k in row))
    try:
        ds = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in good])
    except Exception as e:  # pyarrow raises several types for mixed column types
        raise DataError(f"{source}: rows are valid one by one but a column mixes types: {e}") from e
    return ds, report


def load_prompts(path: str, **kwargs: Any) -> tuple[datasets.Dataset, LoadReport]:
    """``load_records`` with the ``prompt`` schema; kwargs are ``DataConfig`` fields."""
    return load_records(DataConfig(path=path, schema="prompt", **kwargs))


def load_conversations(path: str, **kwargs: Any) -> tuple[datasets.Dataset, LoadReport]:
    """``load_records`` with the ``conversation`` schema; kwargs are ``DataConfig`` fields."""
    return load_records(DataConfig(path=path, schema="conversation", **kwargs))
