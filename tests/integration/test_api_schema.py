"""Property-based: schemathesis generates requests (valid and invalid) for every operation of the
server's own ``/openapi.json`` and sends them to a real server; no input may cause a 5xx, and
every documented response must match the document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.integration.test_api import TOKEN, api_config, cluster_services, live_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def schema_server(
    ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from inference.api.app import create_app

    config = api_config(
        tmp_path_factory.mktemp("schema"),
        queue_db,
        tokens=[TOKEN],
        max_wait_s=0.5,
        max_body_bytes=200_000,
    )
    with (
        cluster_services(config) as (queue, controller),
        live_server(create_app(config, queue, controller)) as url,
    ):
        yield url


def _document() -> dict[str, Any]:
    from inference.api.app import create_app
    from inference.config import Config

    return dict(create_app(Config(), None, None).openapi())  # the handles are not used


schema = schemathesis.openapi.from_dict(_document())


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_generated_request_gets_a_server_error(case: Any, schema_server: str) -> None:
    response = case.call(base_url=schema_server, headers=AUTH, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
