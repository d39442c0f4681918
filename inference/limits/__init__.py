"""One rate limit for a remote engine's API, held for the whole cluster.

Every worker (of every job) that calls the same API under the same key shares one budget, kept
by one detached Ray actor, :class:`RateLimiterActor`, named after the key. A worker's
:class:`Limiter` takes budget from it in small chunks into a local reservoir, so a request does
not pay an actor round trip, and asks for the next chunk before the reservoir runs dry.

The guarantee: over any window of T seconds the cluster starts at most ``capacity + rate * T``
requests (and tokens, net of :meth:`Limiter.settle` corrections; a single request larger than
the token capacity passes alone, once the bucket is full). Chunks could break that by saving
budget up, so two rules hold:

- granted budget lapses :data:`HOLD_S` after the worker asked for it (the actor counts from its
  own, later, grant time, so it never stops counting budget a worker may still spend);
- the bucket refills only to ``capacity - held``, where ``held`` is budget granted and not yet
  reported spent or lapsed (each request for more says how much the worker still holds).
  Budget waiting in reservoirs is part of the capacity, never on top of it.

The provider's own signals (429, ``Retry-After``, ``x-ratelimit-*`` headers) pause the grants
of every worker, so one refusal slows the fleet rather than one worker.
"""

from inference.limits.actor import (
    RateLimiterActor,
    get_or_create_limiter,
    limiter_key,
    limiter_name,
)
from inference.limits.bucket import DEFAULT_PAUSE_S as DEFAULT_PAUSE_S  # tests import it here
from inference.limits.bucket import (
    ProviderSignal,
    TokenBucket,
    parse_duration_s,
    parse_signal,
    pause_s,
)
from inference.limits.client import Limiter
from inference.limits.state import HOLD_S, Grant, RateLimiterState, Report

__all__ = [
    "HOLD_S",
    "Grant",
    "Limiter",
    "ProviderSignal",
    "RateLimiterActor",
    "RateLimiterState",
    "Report",
    "TokenBucket",
    "get_or_create_limiter",
    "limiter_key",
    "limiter_name",
    "parse_duration_s",
    "parse_signal",
    "pause_s",
]
