"""Fixtures of the integration tests that need more than the shared Ray cluster: a served API
(``server``, ``client``, ``http``, over the ``services`` fixture that each API module defines as
its config, WorkQueue and Controller) and a real vLLM OpenAI-compatible server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.api_server import TOKEN, live_server
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


@pytest.fixture(scope="module")
def server(services) -> Iterator[str]:
    """uvicorn serving the app over the module's ``services`` (config, WorkQueue, Controller)."""
    from inference.api.app import create_app

    config, queue, controller = services
    with live_server(create_app(config, queue, controller)) as url:
        yield url


@pytest.fixture()
def client(server: str):
    """The official ``openai`` client of the served API."""
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture()
def http(server: str) -> Iterator[httpx.Client]:
    """An httpx client of the served API, for its native routes."""
    with httpx.Client(
        base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as c:
        yield c
