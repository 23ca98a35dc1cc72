"""Observability: per-step metrics to JSONL and TensorBoard, and the end-of-run report (Markdown + PNG plots)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOTTED = {
    "reward": "reward (mean)",
    "accuracy": "accuracy",
    "response_length": "response length (tokens)",
    "kl": "KL to reference",
    "expert_load_max_over_mean": "expert load max/mean",
    "mtp_acceptance": "MTP acceptance (teacher-forced, greedy)",
    "rollout_mtp_acceptance": "MTP draft acceptance in speculative rollouts",
    "loss": "loss",
}


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` (flushed each line) and mirrors scalars to TensorBoard.

    ``resumed_at``: the step a resumed stage continues after. ``metrics.jsonl`` keeps every row ever logged (the steps
    between that checkpoint and the crash appear twice; ``latest_per_step`` picks the rows of the run that went on),
    and TensorBoard is told to purge its events after that step, so its curves do not double back either.
    """

    def __init__(self, out_dir: str | Path, stage: str, tensorboard: bool = True, resumed_at: int | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.path = self.dir / "metrics.jsonl"
        _drop_torn_tail(self.path)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_at is None else resumed_at + 1
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"stage": self.stage, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed process left unfinished (no newline), so that the next row does not run into it
    and make the file unreadable. Every complete row stays."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropped an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        f.truncate(keep)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl``, in the order logged. A malformed line (an interrupted write, a hand edit)
    is skipped with a warning naming file and line, and appended to ``problems`` when given: the report at the end of
    a run must not fail over one lost row of curves."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("expected a JSON object with an integer 'step'")
        except ValueError as e:  # JSONDecodeError is one
            problem = f"{path}:{i}: skipped a malformed metrics line ({e})"
            log.warning("%s", problem)
            if problems is not None:
                problems.append(problem)
            continue
        rows.append(row)
    return rows


def latest_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step, the last logged, in step order: after a resume, the steps that ran twice (checkpoint to
    crash, then again) show the run that continued."""
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def write_report(out_dir: str | Path, stage_dirs: dict[str, Path], eval_rows: list[dict[str, Any]], title: str) -> Path:
    """``report.md`` plus one PNG per plotted metric (all stages on one figure) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    per_stage = {name: latest_per_step(read_metrics(d / "metrics.jsonl", problems)) for name, d in stage_dirs.items()}
    lines = [f"# {title}", "", "## Held-out evaluation", ""]
    if eval_rows:
        cols = list(eval_rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "-")) for c in cols) + " |" for r in eval_rows]
    lines += data_section(stage_dirs)
    lines += rollout_warnings(per_stage)
    lines += ["", "## Training curves", ""]
    lines += [f"- {p}" for p in problems] + ([""] if problems else [])
    for key, label in PLOTTED.items():
        series = {s: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for s, rows in per_stage.items()}
        series = {s: v for s, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for stage, pts in series.items():  # a lone point needs a marker: a line through one point draws nothing
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage, marker="o" if len(pts) == 1 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        png = out_dir / f"{key}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        lines.append(f"![{label}]({png.name})")
    report = out_dir / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def data_section(stage_dirs: dict[str, Path]) -> list[str]:
    """Report lines for each stage's ``data.json`` (``stages.write_data_summary``): its source, the rows it used and
    the malformed rows ``skip_invalid`` dropped, with the first problems, so a skipped row is never silent."""
    lines = ["", "## Data", "", "| stage | source | rows used | malformed rows skipped |", "|---|---|---|---|"]
    notes = []
    for name, d in stage_dirs.items():
        path = Path(d) / "data.json"
        if not path.is_file():
            continue
        info = json.loads(path.read_text())
        lines.append(f"| {name} | {info['source']} | {info['rows']} | {info['skipped_invalid']} |")
        notes += [f"- {name}: {p}" for p in info.get("problems", [])]
    if len(lines) == 5:
        return []
    return lines + ([""] + notes if notes else [])


def rollout_warnings(per_stage: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Report lines for what the curves alone hide: reward calls that raised (each such sample scored by the
    stage's error policy, not by its reward), steps whose completions all hit ``max_new_tokens`` (with
    ``mask_truncated``, no policy gradient) and steps where no reward scored any sample (all advantages 0). Nothing
    when no stage had any."""
    rows = []
    for name, steps in per_stage.items():
        errors = sum(r.get("reward_errors") or 0 for r in steps)
        cut = sum(r.get("truncated_frac") == 1.0 for r in steps)
        unscored = sum(r.get("unscorable_frac") == 1.0 for r in steps)
        if errors or cut or unscored:
            rows.append(f"| {name} | {errors:g} | {cut} of {len(steps)} | {unscored} of {len(steps)} |")
    if not rows:
        return []
    head = ["", "## Rollout warnings", "", "| stage | reward calls that raised (samples, all steps) | steps with every "
            "completion cut at max_new_tokens | steps where no reward scored any sample |",
            "|---|---|---|---|"]  # fmt: skip
    return head + rows


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r.get(c, "-"))) for r in rows)) for c in cols]
    head = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    body = ["  ".join(_fmt(r.get(c, "-")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join([head, "-" * len(head), *body])
