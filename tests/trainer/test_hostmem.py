"""The trainer's host-memory policy: with it, re-allocating a freed large tensor no longer page-faults.

Each case runs in a fresh interpreter: the setting is process-wide and one-way.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

_PROBE = """
import json, resource, sys, torch
from dsalign.alignment.trainer import TrainerConfig, prepare_model
from dsalign.alignment.trainer import hostmem
from dsalign.model import ModelConfig, Transformer

def realloc_faults():
    x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    del x
    r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r

before = realloc_faults()
prepare_model(Transformer(ModelConfig.preset("tiny")), TrainerConfig(retain_host_memory=sys.argv[1] == "1"))
realloc_faults()  # the first block from the heap grows it (faults once)
print(json.dumps({"applied": hostmem._applied, "before": before, "after": realloc_faults()}))
"""


def _probe(retain: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prepare_model_retains_freed_memory():
    r = _probe(retain=True)
    assert r["applied"] is True
    # 64 MiB is 16,384 pages of 4 KiB (32 with transparent huge pages): without the policy each is faulted again.
    assert r["before"] >= 32, r
    assert r["after"] < 32, r


def test_retain_host_memory_off_leaves_allocator_alone():
    r = _probe(retain=False)
    assert r["applied"] is None  # never called
    assert r["after"] >= 32, r
