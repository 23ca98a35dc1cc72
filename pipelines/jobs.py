"""Ray Jobs: submit a run to a cluster, and follow or stop it (``dsalign submit|status|logs|stop``).

The job's working directory (default: the config file's directory) is packaged by Ray and unpacked on the
cluster; the entrypoint is ``python -m dsalign.pipelines.cli run <config relative to it>``, so dsalign itself must be
installed on the cluster's nodes (the same image), while the config and local data files travel with the job.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path

DEFAULT_EXCLUDES = [".git", "runs", "outputs", "*.safetensors", "__pycache__", ".venv", ".whl", ".gl"]


def dsalign_settings() -> dict[str, str]:
    """This shell's ``DSALIGN_*`` variables (e.g. ``DSALIGN_CPU_GEMM``), which a run's workers get too: a cluster's
    workers do not inherit the environment of the shell that started or submitted the run."""
    return {k: v for k, v in os.environ.items() if k.startswith("DSALIGN_")}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:  # ray's own ConnectionError subclasses the builtin
        raise ValueError(f"cannot reach a Ray job server at {address} ({str(e).splitlines()[0]}); give the "
                         "head node's dashboard address, e.g. http://HEAD:8265") from None  # fmt: skip


@contextlib.contextmanager
def _job_server(address: str, what: str):
    """A failed request to the job server as one ``ValueError`` naming what was asked, of whom, and the server's
    answer (unknown job id, no agent, missing token, ...), for the CLI's one-line error instead of a traceback.
    Every request goes through it, the client's creation included (its first request)."""
    from ray.exceptions import RayError

    try:
        yield
    except (RuntimeError, ConnectionError, PermissionError, RayError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if ("authenticat" in str(e).lower() or "unauthorized" in str(e).lower()) and "RAY_AUTH_MODE" not in str(e):
            hint = "; the cluster uses Ray's token authentication: set RAY_AUTH_MODE=token and its token in this shell"
        raise ValueError(f"{what} at the Ray job server {address}: {type(e).__name__}: {first}{hint}") from None


def job_paths(config: str | Path, working_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(root, config relative to it)``: the directory Ray packages and runs the job in (default: the config's
    directory), where the config's relative paths (data files, checkpoints, output_dir) resolve on the cluster."""
    config = Path(config).resolve()
    root = Path(working_dir).resolve() if working_dir else config.parent
    try:
        return root, config.relative_to(root)
    except ValueError as e:
        raise ValueError(f"config {config} is not inside the job's working dir {root}") from e


def submit(
    config: str | Path,
    address: str,
    working_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> str:
    """Submit ``dsalign run CONFIG`` as a Ray Job; returns the job id."""
    root, rel = job_paths(config, working_dir)
    args = ["python", "-m", "dsalign.pipelines.cli", "run", str(rel)]
    if resume:
        args.append("--resume")
    for ov in overrides or []:
        args += ["--set", ov]
    runtime_env = {"working_dir": str(root), "excludes": DEFAULT_EXCLUDES, "env_vars": dsalign_settings()}
    with _job_server(address, f"submitting {config}"):
        return _client(address).submit_job(entrypoint=shlex.join(args), runtime_env=runtime_env)


def status(job_id: str, address: str) -> str:
    with _job_server(address, f"status of job {job_id}"):
        return str(_client(address).get_job_status(job_id))


def logs(job_id: str, address: str) -> str:
    with _job_server(address, f"logs of job {job_id}"):
        return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    with _job_server(address, f"stopping job {job_id}"):
        return bool(_client(address).stop_job(job_id))


def wait(job_id: str, address: str, timeout_s: float = 900.0, poll_s: float = 2.0) -> str:
    """Block until the job reaches a terminal state (or the timeout); returns the final status."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    with _job_server(address, f"waiting for job {job_id}"):
        client = _client(address)
        while True:
            st = client.get_job_status(job_id)
            if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(st)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st} after {timeout_s:.0f}s")
            time.sleep(poll_s)
