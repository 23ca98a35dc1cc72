"""``dsalign submit`` against a Ray head started with ``ray start --head`` on this machine (slow)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_submit_runs_a_one_stage_config_as_a_ray_job(tmp_path):
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI is not installed")
    data = yaml.safe_load(TINY.read_text())
    data["stages"] = data["stages"][:1]
    data["output_dir"] = "out"  # relative: lands in the job's unpacked working dir on the cluster
    data["eval"]["num_prompts"] = 2
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "run.yaml").write_text(yaml.safe_dump(data))
    dash = _port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    temp = Path(tempfile.mkdtemp(prefix="dsr", dir="/tmp"))  # unix socket paths must stay under 108 bytes
    subprocess.run(["ray", "start", "--head", "--num-cpus=2", f"--dashboard-port={dash}", "--include-dashboard=true",
                    f"--temp-dir={temp}", "--port", str(_port())], check=True, env=env, timeout=180)  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dash}"
        env["RAY_AUTH_MODE"] = "token"  # `ray start` enables token auth and writes the token to ~/.ray/auth_token
        out = subprocess.run(
            [sys.executable, "-m", "dsalign.pipelines.cli", "submit", str(job_dir / "run.yaml"), "--address", address,
             "--wait", "600"],
            capture_output=True, text=True, env=env, timeout=700,
        )  # fmt: skip
        job_id = out.stdout.split()[0] if out.stdout.split() else ""
        logs = subprocess.run([sys.executable, "-m", "dsalign.pipelines.cli", "logs", job_id, "--address", address],
                              capture_output=True, text=True, env=env, timeout=60).stdout  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr + logs
        assert "SUCCEEDED" in out.stdout
        assert "Held-out evaluation" in logs and "[sft] step 4/4" in logs
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_dsalign_settings_reach_ray_workers_and_jobs(monkeypatch, tmp_path):
    """``DSALIGN_*`` variables of the driver (e.g. ``DSALIGN_CPU_GEMM``) go into the workers' runtime env: a local
    Ray's workers inherit the shell, a cluster's do not."""
    import ray
    from dsalign.pipelines import jobs, runner
    from dsalign.pipelines.config import load_config

    for name in [k for k in os.environ if k.startswith("DSALIGN_")]:  # e.g. the suite's DSALIGN_AUTOTUNE
        monkeypatch.delenv(name)
    monkeypatch.setenv("DSALIGN_CPU_GEMM", "torch")
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(TINY)
    runner.init_ray(cfg)
    assert seen["init"]["runtime_env"]["env_vars"] == {"TOKENIZERS_PARALLELISM": "false", "DSALIGN_CPU_GEMM": "torch"}
    # inside a submitted job the job's runtime env already carries it (Ray refuses a key set twice)
    job_env = {"runtime_env": {"env_vars": {"DSALIGN_CPU_GEMM": "torch"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_env))
    assert runner.worker_env() == {"TOKENIZERS_PARALLELISM": "false"}

    class Client:
        def submit_job(self, entrypoint, runtime_env):
            seen["job"] = runtime_env
            return "job-1"

    monkeypatch.setattr(jobs, "_client", lambda address: Client())
    (tmp_path / "run.yaml").write_text(TINY.read_text())
    assert jobs.submit(tmp_path / "run.yaml", "127.0.0.1:8265") == "job-1"
    assert seen["job"]["env_vars"] == {"DSALIGN_CPU_GEMM": "torch"}


def test_submit_checks_paths_where_the_job_runs_and_names_an_unreachable_address(tmp_path, monkeypatch, capsys):
    """The job runs in the config's directory (its working dir), so preflight resolves the config's relative paths
    there, whatever this shell's directory; an address nobody answers on is a clear error, not a traceback."""
    from dsalign.pipelines.cli import main

    data = yaml.safe_load(TINY.read_text())
    data["stages"] = data["stages"][1:2]
    data["stages"][0].update(model={"preset": "tiny"}, data={"path": "prompts.jsonl"})
    data["output_dir"] = "out"
    job = tmp_path / "project" / "configs"
    job.mkdir(parents=True)
    (job / "run.yaml").write_text(yaml.safe_dump(data))
    rows = [{"prompt": f"What is {i}+2?", "answer": str(i + 2)} for i in range(4)]  # a round takes 4 prompts
    (job / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path / "project")
    assert main(["submit", "configs/run.yaml", "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl does not exist" not in err  # found next to the config, where the job will look
    assert "cannot reach a Ray job server at http://127.0.0.1:1" in err
    (job / "prompts.jsonl").rename(tmp_path / "project" / "prompts.jsonl")  # only in this shell's directory
    assert main(["submit", "configs/run.yaml", "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl does not exist" in err and f"checked from {job}, the job's working directory" in err


@pytest.mark.parametrize(
    "error, message",
    [
        (RuntimeError("Request failed with status code 404: Job raysubmit_x does not exist."),
         r"status of job raysubmit_x at the Ray job server http://h:8265: RuntimeError: Request failed with status "
         r"code 404: Job raysubmit_x does not exist\.$"),
        ("auth", r"status of job raysubmit_x at the Ray job server http://h:8265: AuthenticationError: "
                 r"Authentication required.*RAY_AUTH_MODE"),
    ],
)
def test_job_server_errors_become_one_line(monkeypatch, capsys, error, message):
    """The job server's answers (unknown job, missing token, no agent) reach the user as `dsalign: error: ...`
    naming the request and the server, not as a traceback."""
    import ray.job_submission
    from dsalign.pipelines.cli import main
    from ray.exceptions import AuthenticationError

    if error == "auth":
        error = AuthenticationError("Authentication required: Unauthorized: Missing authentication token")

    class Client:
        def __init__(self, address):
            pass

        def get_job_status(self, job_id):
            raise error

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    assert main(["status", "raysubmit_x", "--address", "http://h:8265"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsalign: error: ") and "Traceback" not in err
    import re

    assert re.search(message, err.splitlines()[0]), err
