"""Fixtures for the captioning tests: a tiny VLM and a small images + scores dataset."""

from __future__ import annotations

import pytest
from caption_fixtures import write_dataset


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny_vlm")


@pytest.fixture(scope="session")
def tiny_cog(tmp_path_factory) -> str:
    """A tiny random native CogVLM (the real architecture) with its tokenizer."""
    from paradiffusion.testing.tiny_cogvlm import build_tiny_cogvlm

    return build_tiny_cogvlm(tmp_path_factory.mktemp("models") / "tiny_cogvlm", "cogvlm")


@pytest.fixture
def dataset(tmp_path) -> dict:
    return write_dataset(tmp_path / "data")
