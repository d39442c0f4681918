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

CONFIG_ENV = "INFERENCE_SERVE_CONFIG_JSON"  # the checked config, for `--workers` processes


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
    from inference.runner import local_queue_path

    if config.api.state_dir:
        return str(Path(config.api.state_dir).expanduser().absolute())
    return str(Path(local_queue_path(config, config.output.path)).parent)


def server_config(
    config_path: str | Path, host: str | None, port: int | None, workers: int | None = None
) -> Config:
    """The config with host, port, workers and tokens from the command line and environment
    applied, checked for a safe bind."""
    config = load_config(config_path)
    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if workers is not None:
        updates["workers"] = workers
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


def serve(
    config_path: str | Path,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> None:
    """Run the HTTP API until interrupted. Raises ConfigError for a bad config or bind.

    With ``api.workers`` above 1, uvicorn's supervisor runs that many server processes on the
    one port; each joins this process's Ray cluster (``RAY_ADDRESS``) and serves the same
    WorkQueue and Controller. They hold no state of their own but short caches, so any of them
    may answer any request."""
    import ray
    import uvicorn

    from inference.cluster import connect
    from inference.controller import get_or_create_controller
    from inference.queue.actor import get_or_create_queue
    from inference.runner import queue_db_path
    from inference.webhooks import WebhookSettings

    config = server_config(config_path, host, port, workers)
    # The tokens are in the config now: the Ray processes started next inherit none of them.
    os.environ.pop("INFERENCE_API_TOKENS", None)
    connect()
    queue = get_or_create_queue(
        queue_db_path(config, config.output.path),
        config.queue.max_item_bytes,
        config.queue.shared,
    )
    controller = get_or_create_controller(state_dir(config), WebhookSettings.from_api(config.api))
    options: dict[str, Any] = {
        "host": config.api.host,
        "port": config.api.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    logger.info(
        "serving on http://%s:%d (%d process(es))",
        config.api.host,
        config.api.port,
        config.api.workers,
    )
    if config.api.workers == 1:
        from inference.api.app import create_app

        uvicorn.run(create_app(config, queue, controller), **options)
        return
    os.environ[CONFIG_ENV] = config.model_dump_json()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=config.api.workers, **options)


def worker_app() -> Any:
    """The app of one server process under uvicorn's supervisor (``api.workers`` > 1): the
    parent's config (from the environment), its Ray cluster, its actors."""
    from inference.api.app import create_app
    from inference.cluster import connect
    from inference.controller import get_controller
    from inference.queue.actor import get_queue

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = Config.model_validate_json(os.environ[CONFIG_ENV])
    connect()
    return create_app(config, get_queue(), get_controller())
