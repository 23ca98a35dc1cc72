"""Errors a run ends with, importable without the pipeline's heavy modules (the CLI catches them)."""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage that failed more times than its ``retries`` allow, or whose input is at fault (not retried); the
    message names the stage, the last checkpoint and the error."""
