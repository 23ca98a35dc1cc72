"""Suite-wide test setup.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when ``dsalign.kernels`` is first
imported, which may happen while collecting any test folder. Without CUDA the kernels can only run in the
interpreter, so turn it on before anything is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One config per autotuned kernel: on CUDA every new test shape would otherwise compile and time them all (minutes);
# the kernels' results do not depend on the tile config, and bench/gemm_kernels.py tunes for real.
os.environ.setdefault("DSALIGN_AUTOTUNE", "0")


@pytest.fixture
def launch_workers():
    """``launch_workers(script, world, args, timeout)``: see ``_launch_workers``."""
    return _launch_workers


def _launch_workers(script: str, world: int, args: list[str], timeout: float) -> list[str]:
    """Run ``python script RANK WORLD PORT *args`` for every rank on a free port; return each rank's output.

    A rank that exits non-zero fails the calling test with the end of its output.
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), str(world), port, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            pytest.fail(f"{script} rank exited {p.returncode}:\n{out[-4000:]}")
        outputs.append(out)
    return outputs
