"""Shared fixtures."""

from pathlib import Path

import pytest

from vla_actor import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny look-alike OpenVLA checkpoint (read-only for the tests that share it)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openvla")
