"""Shared fixtures."""

from pathlib import Path

import pytest

from vla_actor import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny look-alike OpenVLA checkpoint (read-only for the tests that share it)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openvla")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (`slow(seconds=...)`, other slow ones ~30 s, the rest after them; stable otherwise),
    so that with `make test`'s two workers the longest start at once and the short ones fill in around them."""
    def expected_seconds(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return 0.0 if slow is None else slow.kwargs.get("seconds", 30.0)

    items.sort(key=expected_seconds, reverse=True)
