"""``inference serve``: join the Ray cluster (``RAY_ADDRESS``) or start an embedded one, get or
create the WorkQueue and the Controller, and serve the API with uvicorn.

Binds 127.0.0.1 unless told otherwise, and refuses any non-loopback address without tokens
(``api.tokens``, or ``INFERENCE_API_TOKENS``: comma-separated, kept out of config files).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from inference.config import Config, load_config
from inference.errors import ConfigError

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def state_dir(config: Config) -> str:
    """Where the Controller keeps its registry and files: ``api.state_dir``, else beside the
    queue database."""
    from inference.runner import queue_db_path

    if config.api.state_dir:
        return str(Path(config.api.state_dir).expanduser().absolute())
    return str(Path(queue_db_path(config, config.output.path)).parent)


def server_config(config_path: str | Path, host: str | None, port: int | None) -> Config:
    """The config with host, port and tokens from the command line and environment applied,
    checked for a safe bind."""
    config = load_config(config_path)
    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    env_tokens = [t.strip() for t in os.environ.get("INFERENCE_API_TOKENS", "").split(",")]
    if any(env_tokens):
        updates["tokens"] = [*config.api.tokens, *(t for t in env_tokens if t)]
    if updates:
        config = config.with_updates(api=updates)
    if not is_loopback(config.api.host) and not config.api.tokens:
        raise ConfigError(
            f"refusing to bind {config.api.host} without tokens: set api.tokens (or "
            "INFERENCE_API_TOKENS), or bind 127.0.0.1"
        )
    return config


def serve(config_path: str | Path, host: str | None = None, port: int | None = None) -> None:
    """Run the HTTP API until interrupted. Raises ConfigError for a bad config or bind."""
    import uvicorn

    from inference.api.app import create_app
    from inference.cluster import connect
    from inference.controller import get_or_create_controller
    from inference.queue.actor import get_or_create_queue
    from inference.runner import queue_db_path

    config = server_config(config_path, host, port)
    connect()
    queue = get_or_create_queue(
        queue_db_path(config, config.output.path), config.queue.max_item_bytes
    )
    controller = get_or_create_controller(state_dir(config))
    app = create_app(config, queue, controller)
    logger.info("serving on http://%s:%d", config.api.host, config.api.port)
    uvicorn.run(
        app,
        host=config.api.host,
        port=config.api.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
