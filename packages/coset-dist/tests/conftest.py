"""Shared fixtures of coset-dist's tests: a one-process gloo group, so that a hook can be called directly on a
``fake_bucket.FakeBucket`` (no DDP, no second process)."""

import os
import tempfile

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo process group of world size 1 for the module's tests (a file store in a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
