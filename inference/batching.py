"""Dynamic batching: packing prepared items into forward passes, and isolating failures.

:func:`pack` is the pure decision (a token budget, a count limit, items sorted by length to cut
padding). :class:`Batcher` is the buffer between the worker's lease thread and its engine loop:
it hands out the fullest batch it can, waiting at most ``max_wait_ms`` for one to fill.
:func:`run_isolated` runs a batch so that one bad item never fails its neighbours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from inference.engines.base import Engine, Prepared
from inference.errors import EngineFatalError, ItemError, TransientError
from inference.schema import Result

logger = logging.getLogger(__name__)


def _sort_key(item: Prepared) -> tuple[int, int]:
    """Similar generation lengths together (rows that finish early waste their decode steps),
    then by prompt length (less padding). Measured on examples/chat.jsonl: ~4% faster than
    exact max_tokens first, ~30% faster than prompt length first."""
    return (item.request.max_tokens.bit_length(), item.prompt_tokens)


def batch_cost(items: Sequence[Prepared]) -> int:
    """Token slots a padded batch occupies: rows x (longest prompt + largest max_tokens)."""
    if not items:
        return 0
    longest = max(it.prompt_tokens for it in items)
    steps = max(it.request.max_tokens * it.request.n for it in items)
    return len(items) * (longest + steps)


def take_batch(
    items: Sequence[Prepared], max_batch_size: int, max_batch_tokens: int
) -> tuple[list[Prepared], list[Prepared]]:
    """The first batch of ``items`` sorted by length, and the rest. A single item over the
    budget still makes a batch of one (the context check happened in ``prepare``)."""
    ordered = sorted(items, key=_sort_key)
    batch: list[Prepared] = []
    longest = steps = 0
    for i, item in enumerate(ordered):
        new_longest = max(longest, item.prompt_tokens)
        new_steps = max(steps, item.request.max_tokens * item.request.n)
        over = (len(batch) + 1) * (new_longest + new_steps) > max_batch_tokens
        if batch and (len(batch) >= max_batch_size or over):
            return batch, ordered[i:]
        batch.append(item)
        longest, steps = new_longest, new_steps
    return batch, []


def pack(
    items: Sequence[Prepared], max_batch_size: int, max_batch_tokens: int
) -> list[list[Prepared]]:
    """All of ``items`` as batches within the limits."""
    batches = []
    rest = list(items)
    while rest:
        batch, rest = take_batch(rest, max_batch_size, max_batch_tokens)
        batches.append(batch)
    return batches


def run_isolated(engine: Engine, batch: list[Prepared]) -> list[Result | ItemError]:
    """Run a batch; if the engine raises, split it and retry the halves, down to the one item
    that fails, which alone gets the error. Engine-fatal errors propagate."""
    try:
        results = engine.run(batch)
    except EngineFatalError:
        raise
    except Exception as exc:
        if len(batch) == 1:
            if isinstance(exc, ItemError):
                return [exc]
            return [TransientError(f"{type(exc).__name__}: {exc}", code="engine_error")]
        logger.warning("batch of %d failed (%s); bisecting", len(batch), exc)
        mid = len(batch) // 2
        return run_isolated(engine, batch[:mid]) + run_isolated(engine, batch[mid:])
    if len(results) != len(batch):
        raise EngineFatalError(
            f"engine returned {len(results)} results for a batch of {len(batch)}"
        )
    return results


class Batcher:
    """A thread-safe buffer of prepared items that yields batches.

    ``take`` returns at once when a full batch is buffered; otherwise it waits up to
    ``max_wait_ms`` from the first call for more items, then returns a partial batch (or an
    empty list when nothing arrived)."""

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_wait_ms: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self._items: list[Prepared] = []
        self._cond = threading.Condition()

    def add(self, items: Sequence[Prepared]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def buffered_cost(self) -> int:
        with self._cond:
            return sum(it.cost_tokens for it in self._items)

    def _full(self) -> bool:
        if len(self._items) >= self.max_batch_size:
            return True
        return sum(it.cost_tokens for it in self._items) >= self.max_batch_tokens

    def take(self, timeout_s: float | None = None) -> list[Prepared]:
        deadline = time.monotonic() + (self.max_wait_s if timeout_s is None else timeout_s)
        with self._cond:
            while not self._full():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._items:
                return []
            batch, self._items = take_batch(self._items, self.max_batch_size, self.max_batch_tokens)
            return batch

    def take_fill(self, max_items: int, max_tokens: int, timeout_s: float) -> list[Prepared]:
        """For engines fed continuously: up to ``max_items`` buffered items, oldest first,
        whose ``cost_tokens`` fit ``max_tokens`` (the first always does, so an item larger than
        the budget still runs alone). Waits up to ``timeout_s`` for one to arrive."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            taken = 0
            budget = max_tokens
            for item in self._items:
                if taken >= max_items or (taken and item.cost_tokens > budget):
                    break
                budget -= item.cost_tokens
                taken += 1
            batch, self._items = self._items[:taken], self._items[taken:]
            return batch

    def drain(self) -> list[Prepared]:
        """Everything still buffered (for release on shutdown)."""
        with self._cond:
            items, self._items = self._items, []
            return items
