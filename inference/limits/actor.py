"""The Ray side of the cluster's budget: :class:`RateLimiterActor`, one detached actor per key
wrapping :class:`~inference.limits.state.RateLimiterState`, its name (:func:`limiter_name`), the
key a worker draws on (:func:`limiter_key`), and :func:`get_or_create_limiter`, which finds or
starts it on the head node."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from inference.limits.bucket import ProviderSignal
from inference.limits.state import Grant, RateLimiterState, Report

if TYPE_CHECKING:
    from inference.config import EngineConfig, LimitsConfig

logger = logging.getLogger(__name__)


class RateLimiterActor:
    """The cluster's budget for one key: a Ray shell around :class:`RateLimiterState`.

    One per key, detached and named :func:`limiter_name`; its calls are short and run one at a
    time, which is what makes each grant's check and take one step.
    """

    def __init__(self, key: str, config: LimitsConfig) -> None:
        self._key = key
        self._state = RateLimiterState(config)

    def configure(self, config: LimitsConfig) -> bool:
        changed = self._state.configure(config)
        if changed:
            logger.info("limiter %r limits set: %s", self._key, config.model_dump())
        return changed

    def grant(
        self,
        client_id: str,
        requests: int,
        tokens: int,
        report: Report | None = None,
        prefetch: bool = False,
    ) -> Grant:
        return self._state.grant(client_id, requests, tokens, report, prefetch)

    def release(self, client_id: str, report: Report | None = None) -> None:
        self._state.release(client_id, report)

    def signal(self, signal: ProviderSignal) -> float:
        return self._state.signal(signal)

    def paused_s(self) -> float:
        return self._state.paused_s()

    def view(self) -> tuple[float, bool, bool]:
        return self._state.view()

    def stats(self) -> dict[str, Any]:
        return {"key": self._key, **self._state.stats()}


def limiter_name(key: str) -> str:
    """The actor's name: a short digest, so any key (a URL, a secret-looking string) fits."""
    return f"limiter:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def limiter_key(engine: EngineConfig, limits: LimitsConfig) -> str:
    """Which budget a worker draws on: ``limits.key``, else the API's base_url and model."""
    return limits.key or f"{engine.base_url} {engine.model}"


def get_or_create_limiter(key: str, config: LimitsConfig) -> Any:
    """The limiter actor of ``key``, created on the head node when it does not exist yet, with
    ``config`` as its limits (a worker connecting with other limits replaces them, warned)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from inference.queue.actor import NAMESPACE, head_node_id

    handle: Any = (
        ray.remote(RateLimiterActor)
        .options(
            name=limiter_name(key),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=True),
        )
        .remote(key, config)
    )
    if ray.get(handle.configure.remote(config)):
        logger.warning("limiter %s: limits changed to %s", limiter_name(key), config.model_dump())
    return handle
