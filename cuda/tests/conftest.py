"""Shared fixtures of coset-cuda's tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference runs many tiny ops; torch's intra-op threads only add contention on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
