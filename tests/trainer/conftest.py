"""Trainer tests run single-threaded: the tiny model gains nothing from a second thread on a shared 2-core box."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
