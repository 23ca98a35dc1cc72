"""The run-config reference (``docs/CONFIG.md``), generated from the dataclasses in ``config.py``.

``dsalign config reference`` prints it; a test keeps the committed file equal to what this module writes, so the
reference cannot drift from the schema. Defaults come from default instances, so a block whose defaults differ by
context (GRPO's ``optim`` starts at lr 2e-4, SFT's at 1e-3) shows the defaults that apply there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from .config import DistillParams, GRPOParams, RunConfig, SFTParams, StageConfig

HEADER = """# Run configuration reference

Generated from `pipelines/config.py` by `dsalign config reference` (a test keeps this file in sync). A run config
is one YAML file; `dsalign config show CONFIG` prints it resolved (every default filled in) after the same checks
`dsalign run` makes. Any key can be overridden on the command line: `--set stages.grpo.grpo.iterations=10` (list
elements by index or, for stages, by name). Unknown keys and wrong types fail naming the key path and the valid keys;
out-of-range values fail naming the key and what was expected. Complete examples: `pipelines/demo.yaml`,
`configs/tiny.yaml`.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + (" | null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        item = typing.get_args(tp)[0]
        return "list of mappings" if dataclasses.is_dataclass(item) else f"list of {_type_name(item)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _block_type(tp: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _default(f: dataclasses.Field, instance: Any) -> str:
    if instance is not None:
        value = getattr(instance, f.name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, (list, dict)) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return f"`{value}`"


# A shared block's field that means something else where it is used (the help text is the field's elsewhere).
HELP_IN_CONTEXT = {"eval.reward.weight": "ignored: the evaluation averages the reward itself"}


def _rows(cls: type, prefix: str, instance: Any, own_section: tuple[str, ...] = ()) -> list[str]:
    """Table rows for ``cls``'s fields; nested blocks get a row and are flattened below it as ``block.key`` (lists
    of blocks as ``block[].key``), except those in ``own_section`` (documented in a section of their own)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        block = _block_type(tp)
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        nested = block or (item if item is not None and dataclasses.is_dataclass(item) else None)
        help_text = HELP_IN_CONTEXT.get(key, f.metadata.get("help", ""))
        if f.name in own_section:
            rows.append(_row(key, _type_name(tp), _default(f, instance), f"{help_text} (own section below)"))
        elif block is not None and _default(f, instance) != "null":
            rows.append(_row(key, "mapping", "", help_text))
            rows += _rows(block, key + ".", getattr(instance, f.name) if instance is not None else None)
        elif block is not None:  # an optional block, off (null) unless given; its keys default as listed
            rows.append(_row(key, "mapping | null", "null", help_text))
            rows += _rows(block, key + ".", None)
        elif nested is not None:
            rows.append(_row(key, "list of mappings", _default(f, instance), help_text))
            rows += _rows(nested, key + "[].", None)
        else:
            rows.append(_row(key, _type_name(tp), _default(f, instance), help_text))
    return rows


def _cell(text: str) -> str:
    # a literal bar inside a Markdown table cell; angle brackets would read as HTML tags
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _row(key: str, kind: str, default: str, help_text: str) -> str:
    return f"| `{key}` | {_cell(kind)} | {default} | {_cell(help_text)} |"


def _table(title: str, intro: str, rows: list[str]) -> list[str]:
    return [f"## {title}", "", intro, "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]


def config_reference() -> str:
    """The Markdown reference of every run-config key: type, default and meaning."""
    stage_keys = ("sft", "grpo", "distill")
    out = [HEADER]
    out += _table("Top level", "The run as a whole.", _rows(RunConfig, "", None, own_section=("stages",)))
    out += _table(
        "Stages (`stages[]`)",
        "Each stage: its kind, the model it starts from (exactly one of `model.preset`, `model.checkpoint`, "
        "`model.from_stage`), its data (exactly one of `data.path`, `data.synthetic`), rewards, resources, and the "
        "hyperparameter block matching `kind` (below; its defaults apply when it is omitted).",
        _rows(StageConfig, "", None, own_section=stage_keys),
    )
    blocks = (("sft", SFTParams, "Supervised fine-tuning on conversations (assistant tokens only, plus MTP)."),
              ("grpo", GRPOParams, "GRPO: sample a group per prompt, score, group-relative advantages, clipped "
                                   "policy update."),
              ("distill", DistillParams, "Distillation. `mode: traces` (R1-style): the teacher samples traces, "
                                         "rewards filter them, the student is fine-tuned on the kept ones. "
                                         "`mode: on_policy`: the student samples, the teacher scores its tokens "
                                         "(`on_policy` block)."))  # fmt: skip
    for key, cls, intro in blocks:
        out += _table(f"`{key}` block (`stages[].{key}`)", intro, _rows(cls, "", cls()))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
