"""Fault injection for crash tests: off unless ``INFERENCE_FAULT`` or ``INFERENCE_FAULT_ITEMS``
is set.

**Steps.** ``INFERENCE_FAULT=after_write`` makes the process that reaches that step of the commit
protocol exit at once (``os._exit``, like a kill -9: no cleanup, no flush). With
``INFERENCE_FAULT_ONCE`` set to a folder, each step fires once (a marker file records it), so a
restarted process goes on. Steps: ``before_write``, ``after_write`` (worker), ``before_publish``,
``after_publish``, ``after_complete`` (WorkQueue); ``batch_recorded``, ``batch_created`` (a
provider batch recorded in the ledger and not yet created; created and its id not yet recorded);
``after_lease`` (the worker's lease thread, once it holds new leases). ``raise:<step>`` raises a
``RuntimeError`` at that step instead of exiting (a worker thread that fails).

**Items.** ``INFERENCE_FAULT_ITEMS`` is a JSON object from a ``custom_id`` (or an
:mod:`fnmatch` pattern such as ``"poison-*"``) to an action, applied by the worker's engine
(:func:`arm_item_faults`) to each batch before the engine runs it (a continuous engine: to the
items it is given at ``submit``), for every item of the batch that matches:

- ``sleep:SECONDS``: the batch takes that much longer (the longest sleep of its items);
- ``exit``: the worker process exits at once (``os._exit(17)``), killing the whole batch;
- ``hang``: the engine never returns (the worker goes on heartbeating its leases);
- ``raise:transient`` / ``raise:permanent``: the batch raises a :class:`TransientError` /
  :class:`PermanentError` (code ``injected``), which the worker's batch isolation narrows down
  to the item (a continuous engine refuses the item with that error);
- ``raise:unknown``: the batch raises a ``RuntimeError`` (an error of no known kind).

An action may end in ``@N``: it applies only while the item has fewer than ``N`` past attempts
(``"raise:transient@2"`` fails the first two attempts, the third runs). The worker process reads
the variable when its engine is made, so it must be in the environment of the Ray cluster's
workers (for an embedded cluster: the driver's).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from inference.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

ITEMS_ENV = "INFERENCE_FAULT_ITEMS"
_ACTIONS = ("sleep", "exit", "hang", "raise")
_RAISE_KINDS = ("transient", "permanent", "unknown")


def fault(step: str) -> None:
    """Crash here if a test asked for it (``raise:<step>``: raise a ``RuntimeError`` here
    instead, as a bug or an unexpected library error would)."""
    wanted = os.environ.get("INFERENCE_FAULT")
    if not wanted:
        return
    steps = wanted.split(",")
    if f"raise:{step}" in steps:
        raise RuntimeError(f"fault injection: raised at {step}")
    if step not in steps:
        return
    once = os.environ.get("INFERENCE_FAULT_ONCE")
    if once:
        marker = Path(once) / step
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return
    logger.error("fault injection: exiting at %s (pid %d)", step, os.getpid())
    os._exit(17)


@dataclass(frozen=True)
class ItemFault:
    """One rule of ``INFERENCE_FAULT_ITEMS``."""

    pattern: str
    action: str  # sleep, exit, hang, raise
    arg: str = ""  # the seconds of a sleep, the kind of a raise
    below_attempts: int | None = None  # applies while the item's past attempts are fewer

    def matches(self, custom_id: str, attempts: int) -> bool:
        if self.below_attempts is not None and attempts >= self.below_attempts:
            return False
        return custom_id == self.pattern or fnmatch.fnmatchcase(custom_id, self.pattern)


def parse_item_faults(text: str) -> list[ItemFault]:
    """The rules of an ``INFERENCE_FAULT_ITEMS`` value; raises ValueError on a bad one."""
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ITEMS_ENV} is not JSON: {exc}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{ITEMS_ENV} must be a JSON object of custom_id -> action")
    rules = []
    for pattern, spec in mapping.items():
        if not isinstance(spec, str):
            raise ValueError(f"{ITEMS_ENV}[{pattern!r}]: an action is a string, not {spec!r}")
        body, _, below = spec.partition("@")
        action, _, arg = body.partition(":")
        if action not in _ACTIONS:
            raise ValueError(f"{ITEMS_ENV}[{pattern!r}]: unknown action {action!r}")
        if action == "sleep":
            float(arg)  # ValueError when it is not a number of seconds
        if action == "raise" and arg not in _RAISE_KINDS:
            raise ValueError(f"{ITEMS_ENV}[{pattern!r}]: raise takes one of {_RAISE_KINDS}")
        rules.append(ItemFault(pattern, action, arg, int(below) if below else None))
    return rules


def _custom_id(item: Any) -> tuple[str, int]:
    key = getattr(item, "key", None)
    return str(getattr(key, "item_id", "")), int(getattr(key, "attempts", 0) or 0)


def _hits(rules: list[ItemFault], items: list[Any]) -> list[tuple[Any, ItemFault]]:
    hits = []
    for item in items:
        custom_id, attempts = _custom_id(item)
        for rule in rules:
            if rule.matches(custom_id, attempts):
                hits.append((item, rule))
                break
    return hits


def _error(rule: ItemFault, custom_id: str) -> Exception:
    message = f"injected {rule.arg} error for {custom_id}"
    if rule.arg == "permanent":
        return PermanentError(message, code="injected")
    if rule.arg == "transient":
        return TransientError(message, code="injected")
    return RuntimeError(message)


def _act(hits: list[tuple[Any, ItemFault]]) -> None:
    """Sleep, exit or hang for the batch's hits (raises are the caller's)."""
    sleep_s = max((float(r.arg) for _, r in hits if r.action == "sleep"), default=0.0)
    for item, rule in hits:
        if rule.action in ("exit", "hang"):
            custom_id = _custom_id(item)[0]
            logger.error(
                "fault injection: %s at item %s (pid %d)", rule.action, custom_id, os.getpid()
            )
            if rule.action == "exit":
                os._exit(17)
            threading.Event().wait()
    if sleep_s > 0:
        time.sleep(sleep_s)


E = TypeVar("E")


def arm_item_faults(engine: E) -> E:
    """``engine`` with the item hook of ``INFERENCE_FAULT_ITEMS`` wrapped around its ``run``
    (and ``submit``, for a continuous engine); unchanged when the variable is unset."""
    text = os.environ.get(ITEMS_ENV)
    if not text:
        return engine
    rules = parse_item_faults(text)
    logger.warning("fault injection: item faults armed (%d rule(s))", len(rules))
    run: Callable[[list[Any]], Any] = engine.run  # type: ignore[attr-defined]

    def faulty_run(batch: list[Any]) -> Any:
        hits = _hits(rules, batch)
        _act(hits)
        for item, rule in hits:
            if rule.action == "raise":
                raise _error(rule, _custom_id(item)[0])
        return run(batch)

    engine.run = faulty_run  # type: ignore[attr-defined]
    submit = getattr(engine, "submit", None)
    if submit is not None:

        def faulty_submit(items: list[Any]) -> list[tuple[Any, Any]]:
            hits = _hits(rules, items)
            _act(hits)
            refused = []
            for item, rule in hits:
                if rule.action == "raise":
                    error = _error(rule, _custom_id(item)[0])
                    if not isinstance(error, TransientError | PermanentError):
                        error = TransientError(f"RuntimeError: {error}", code="engine_error")
                    refused.append((item, error))
            gone = {id(item) for item, _ in refused}
            return refused + list(submit([it for it in items if id(it) not in gone]))

        engine.submit = faulty_submit  # type: ignore[attr-defined]
    return engine
