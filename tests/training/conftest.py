"""Fixtures for the trainer tests (shard and config builders live in train_fixtures.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from paradiffusion.testing.tiny_diffusion import build_tiny_diffusion

    return build_tiny_diffusion(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two
    threads that spin-wait for a busy core. Restored after the training tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
