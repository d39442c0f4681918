"""The Controller's registry is one server's: a second server on the same state is refused (on a
shared queue, two servers that shared a registry would each take the other's jobs for its own
and finalize them twice)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inference.controller import Registry
from inference.errors import QueueError


def test_a_second_server_on_the_same_state_is_refused_naming_api_state_dir(
    tmp_path: Path,
) -> None:
    first = Registry(tmp_path / "controller.sqlite", owner_wait_s=0)
    with pytest.raises(QueueError, match=r"in use by another running server.*api\.state_dir"):
        Registry(tmp_path / "controller.sqlite", owner_wait_s=0)
    os.close(first._owner)  # the first server ends: the state is free again
    Registry(tmp_path / "controller.sqlite", owner_wait_s=0)
