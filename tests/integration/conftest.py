"""Fixtures of the integration tests that need more than the shared Ray cluster."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vllm_server import vllm_server


@pytest.fixture(scope="module")
def vllm_openai_server() -> Iterator[str]:
    """A real vLLM OpenAI-compatible server of the tiny model (served as ``tiny-llama``),
    shared by the tests of a module (a module scope, so it is stopped before the suite's own
    vLLM tests bind the same cores); yields its base URL
    (``http://127.0.0.1:PORT/v1``). Its log lives in a temp folder under /tmp, removed after a
    clean stop."""
    log_dir = Path(tempfile.mkdtemp(prefix="vllm-server-", dir="/tmp"))
    with vllm_server(log_dir) as base_url:
        yield base_url
    shutil.rmtree(log_dir, ignore_errors=True)
