"""The kernels/ folder must not shadow the ``kernels`` distribution when a checkout's root is on sys.path."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    # ``python -c`` puts the working directory first on sys.path, as ``python -m pytest`` does.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _kernels_distribution_installed() -> bool:
    outside = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(ROOT)]
    return importlib.machinery.PathFinder.find_spec("kernels", outside) is not None


def test_top_level_kernels_name_is_not_ours():
    proc = _run_from_root("import kernels, os; print(os.path.realpath(kernels.__file__))")
    if _kernels_distribution_installed():
        assert proc.returncode == 0, proc.stderr
        assert not proc.stdout.strip().startswith(os.path.join(os.path.realpath(ROOT), "kernels")), proc.stdout
    else:  # an empty placeholder, which transformers' is_kernels_available() reports as unusable
        assert proc.returncode == 0, proc.stderr


def test_transformers_deepseek_imports_from_checkout_root():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    code = "from transformers import DeepseekV3ForCausalLM; import dsalign.kernels.cpu_gemm; print('ok')"
    proc = _run_from_root(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
