"""``dsalign eval``: the pipeline's held-out evaluation for any checkpoints, outside a run (no Ray).

Each checkpoint answers the same prompts with the same per-prompt sampling seeds, so two checkpoints are compared on
paired samples: the table's ``vs`` column is the accuracy change against the first checkpoint with its paired
standard error (the run report's statistic). The evaluation is the run config's ``eval`` block (``--config``, or its
defaults), with the flags below overriding its keys; ``--output`` keeps every sample with its reward.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, Any

# flag -> eval key (the run config's ``eval`` block)
EVAL_FLAGS = {
    "prompts": "path",
    "num_prompts": "num_prompts",
    "samples": "samples_per_prompt",
    "temperature": "temperature",
    "max_new_tokens": "max_new_tokens",
    "seed": "seed",
    "batch_size": "max_batch_size",
}


def eval_config(args: Any):
    """The ``RunConfig`` whose ``eval`` block (and synthetic ``task``) the command evaluates with."""
    from .config import DEMO_CONFIG, config_from_data, read_config_data

    data: dict[str, Any] = {"name": "eval", "output_dir": ".", "stages": []}
    where = ""
    if args.config:
        where = str(DEMO_CONFIG if args.config == "demo" else args.config)
        data = read_config_data(where)
    ev = data.setdefault("eval", {})
    if ev is None:  # "eval:" with nothing after it
        ev = data["eval"] = {}
    if not isinstance(ev, dict):
        from .schema import ConfigError

        raise ConfigError(f"{where}: eval: expected a mapping, got {type(ev).__name__} {ev!r}")
    for flag, key in EVAL_FLAGS.items():
        if getattr(args, flag, None) is not None:
            ev[key] = getattr(args, flag)
    if args.reward is not None:
        ev["reward"] = {"fn": args.reward}
    return config_from_data(data, args.set, where)


def check_eval_inputs(run, checkpoints: list[str]) -> None:
    """Every problem with the prompts, the reward and the checkpoints, in one error, before any model loads."""
    from .generate import check_checkpoint_dir
    from .preflight import PreflightError, _check_eval_file, _check_reward

    problems: list[str] = []
    if run.eval.path is not None:
        _check_eval_file(run, problems)
    _check_reward(run.eval.reward, "eval.reward", problems)
    for ckpt in checkpoints:
        try:
            check_checkpoint_dir(ckpt, need_tokenizer=True)
        except FileNotFoundError as e:
            problems.append(str(e))
    if problems:
        raise PreflightError(problems)


def run_eval(args: Any, out: IO[str] | None = None) -> int:
    """``dsalign eval``; writes the table (or JSON lines) to ``out``, default the ``sys.stdout`` of the call (not of
    the import: a default bound at import time outlives a replaced stream, e.g. a test's captured one)."""
    import torch
    from dsalign.model import load_checkpoint

    from .report import format_table, write_text_atomic
    from .runner import clustered_se, paired_delta, paired_difference
    from .stages import evaluate, held_out_prompts, load_tokenizer

    out = out or sys.stdout
    run = eval_config(args)
    check_eval_inputs(run, args.checkpoints)
    ev = run.eval
    rows = held_out_prompts(run, args.length_target)
    source = ev.path or ("the synthetic task's held-out set" + ("" if args.config else " (default task knobs; "
                                                                   "--config RUN.yaml for a run's)"))  # fmt: skip
    print(f"dsalign eval: {len(rows)} prompts of {source} x {ev.samples_per_prompt} samples, temperature "
          f"{ev.temperature}, reward {ev.reward.fn}", file=sys.stderr)  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    table, records, first = [], [], None
    for ckpt in args.checkpoints:
        model = load_checkpoint(ckpt, device=device).eval()
        samples: list[dict[str, Any]] = []
        result = evaluate(model, load_tokenizer(ckpt), run, rows, samples=samples)
        del model
        per = result.pop("per_prompt")
        row = {"#": len(table) + 1, "checkpoint": ckpt, "accuracy": result["accuracy"], "acc_se": clustered_se(per),
               "format": result["format"], "mean_length": result["mean_length"]}  # fmt: skip
        row.update({key: v for key, v in result.items() if key.startswith(("pass@", "maj@"))})
        if "length_target" in result:
            row["length_target"] = result["length_target"]
        if first is None:
            first = per
            row["vs"] = "-"
        else:
            row["vs"] = paired_delta(per, first, "#1")
            row["delta_vs_first"], row["delta_se"] = paired_difference(per, first)
        table.append(row)
        records += [{"checkpoint": ckpt, **s} for s in samples]
    if args.output:  # all samples at once, renamed into place: an interrupted run leaves no half-written file
        write_text_atomic(Path(args.output), "".join(json.dumps(r) + "\n" for r in records))
    if args.json:
        for row in table:
            # strict JSON: a NaN (the standard error of one prompt) is written as null
            plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            out.write(json.dumps({k: v for k, v in plain.items() if k not in ("#", "vs")}) + "\n")
    else:
        out.write(format_table([{k: v for k, v in r.items() if not k.startswith("delta")} for r in table]) + "\n")
        if len(table) > 1:
            out.write("vs: accuracy change against the first checkpoint on the same prompts and sampling seeds, with "
                      "its paired standard error\n")  # fmt: skip
    return 0
