"""The engine contract: what the batcher and the worker need from any engine.

An engine prepares items one by one (tokenize, check the context length: an item that cannot fit
is a :class:`~inference.errors.PermanentError` before it ever reaches a forward pass) and runs
prepared items in batches, returning exactly one :class:`~inference.schema.Result` or one
:class:`~inference.errors.ItemError` per item, in order. Errors that doom the engine itself are
raised as :class:`~inference.errors.EngineFatalError`.

An engine with a scheduler of its own (vLLM) is also a :class:`ContinuousEngine`: items are
``submit``-ted as they arrive and each comes back from the ``step`` that finished it, so the
worker keeps the engine full across lease boundaries and no item waits for a batch's longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from inference.errors import ItemError
from inference.schema import Request, Result


@dataclass(slots=True)
class Prepared:
    """An item ready for a forward pass."""

    request: Request
    prompt_ids: list[int]
    key: Any = None  # the caller's handle (e.g. the lease), passed through untouched
    extra: dict[str, Any] = field(default_factory=dict)
    # An engine that does not tokenize (a remote API) gives its estimate of the prompt's tokens.
    prompt_estimate: int | None = None

    @property
    def prompt_tokens(self) -> int:
        if self.prompt_estimate is not None:
            return self.prompt_estimate
        return len(self.prompt_ids)

    @property
    def cost_tokens(self) -> int:
        """Tokens this item occupies in a batch: prompt plus what it may generate."""
        return self.prompt_tokens + self.request.max_tokens * self.request.n


class Engine(Protocol):
    """One model loaded on one device (or, for a remote engine, one client of an API).

    ``max_batch_size`` caps the items in one batch, or in flight for a continuous engine; the
    worker's batcher takes the smaller of it and ``batching.max_batch_size``, except for a
    remote engine, whose in-flight limit is ``engine.concurrency`` alone."""

    model_name: str
    tasks: frozenset[str]
    context_len: int
    max_batch_size: int

    def prepare(self, request: Request) -> Prepared:
        """Tokenize and check one request; raises PermanentError when it cannot run here."""
        ...

    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        """One result or one per-item error for each item, in order."""
        ...

    def close(self) -> None: ...


class ContinuousEngine(Engine, Protocol):
    """An engine fed item by item; its own scheduler forms the batches."""

    continuous: bool  # False where this model runs batch at a time (e.g. vLLM embeddings)

    def in_flight(self) -> int:
        """Items submitted and not finished."""
        ...

    def in_flight_tokens(self) -> int:
        """Sum of ``cost_tokens`` of the items in flight."""
        ...

    def submit(self, items: list[Prepared]) -> list[tuple[Prepared, ItemError]]:
        """Add items to the engine; returns those it refused, each with its error."""
        ...

    def step(self) -> list[tuple[Prepared, Result | ItemError]]:
        """Advance the engine; returns the items finished since the last step."""
        ...

    def abort(self) -> list[Prepared]:
        """Take every item out of the engine and return them."""
        ...


def is_continuous(engine: Engine) -> bool:
    return bool(getattr(engine, "continuous", False))
