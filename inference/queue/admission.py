"""What the queue accepts: the checks an enqueue call passes before anything is written.

A call is accepted whole or refused whole, and a refusal names every bad item (up to 20) with
its index, id and reason, so a producer can fix its input in one go.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from inference.errors import QueueError
from inference.queue.records import NewItem
from inference.schema import CUSTOM_ID

MAX_PROBLEMS_SHOWN = 20
_JSON_DECODE = json.JSONDecoder().raw_decode


def admit(
    items: Sequence[NewItem],
    max_item_bytes: int,
    all_json: Callable[[Sequence[str]], bool] | None = None,
) -> tuple[dict[str, NewItem], list[str]]:
    """The items of one call by id, and the ids repeated within it (same payload: duplicates).
    Raises :class:`QueueError` naming the bad items when any is bad.

    ``all_json``, when given, checks a list of texts for strict JSON at once (SQLite's
    ``json_valid``, see :func:`inference.queue.db.json_checker`): a call of plainly good items
    with distinct ids then costs no Python parse at all. Otherwise, or when that check fails,
    most items pass :func:`_plainly_good`, a check in a few C calls; the rest (and every bad
    one) go through :func:`problem_of`, which names what is wrong."""
    if all_json is not None:
        plain = _plainly_good_call(items, max_item_bytes // 4)
        if plain is not None and all_json([item[1] for item in plain.values()]):
            return plain, []
    problems: list[str] = []
    fresh: dict[str, NewItem] = {}
    duplicates: list[str] = []
    short = max_item_bytes // 4  # a character is at most 4 bytes in UTF-8
    for i, item in enumerate(items):
        if _plainly_good(item, short) and item.item_id not in fresh:
            fresh[item.item_id] = item
            continue
        problem = problem_of(item, max_item_bytes)
        if problem is None and item.item_id in fresh:
            if fresh[item.item_id].payload == item.payload:
                duplicates.append(item.item_id)
                continue
            problem = "repeated in this call with another payload"
        if problem is None:
            fresh[item.item_id] = item
        else:
            problems.append(f"items[{i}] ({str(item.item_id)[:140]!r}): {problem}")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise QueueError(
            "enqueue refused, nothing accepted: "
            + "; ".join(shown)
            + (f" (and {more} more)" if more else "")
        )
    return fresh, duplicates


def _plainly_good_call(items: Sequence[NewItem], short_chars: int) -> dict[str, NewItem] | None:
    """The items by id when each is plainly good but for its JSON, which the caller checks
    next, and no id repeats; None means "look closer"."""
    fresh: dict[str, NewItem] = {}
    for item in items:
        try:
            shaped = _plainly_shaped(item, short_chars)
        except (TypeError, ValueError):
            return None
        if not shaped or item[0] in fresh:
            return None
        fresh[item[0]] = item
    return fresh


def _plainly_good(item: NewItem, short_chars: int) -> bool:
    """The common case, checked fast: an id of the pattern, a short payload that is exactly one
    JSON object, default or valid priority, a token count. False means "look closer"."""
    try:
        return _plainly_shaped(item, short_chars) and _JSON_DECODE(item[1])[1] == len(item[1])
    except (ValueError, TypeError):
        return False


def _plainly_shaped(item: NewItem, short_chars: int) -> bool:
    """All of :func:`_plainly_good` but the JSON parse (a payload that starts as an object)."""
    item_id, payload, tokens, priority, pool = item
    return (
        type(item_id) is str
        and CUSTOM_ID.match(item_id) is not None
        and type(payload) is str
        and len(payload) <= short_chars
        and payload[:1] == "{"
        and type(tokens) is int
        and tokens >= 0
        and (priority is None or (type(priority) is int and 0 <= priority <= 9))
        and (pool is None or (type(pool) is str and pool != ""))
    )


def problem_of(item: NewItem, max_item_bytes: int) -> str | None:
    """What is wrong with one item, or None."""
    if not isinstance(item.item_id, str) or not CUSTOM_ID.match(item.item_id):
        return f"id must match {CUSTOM_ID.pattern}"
    payload = item.payload
    if not isinstance(payload, str):
        return "payload must be JSON text"
    # A character is at most 4 bytes in UTF-8: short payloads need no encoding to be sure.
    if len(payload) * 4 > max_item_bytes and len(payload.encode()) > max_item_bytes:
        return f"payload over {max_item_bytes} bytes"
    if not is_json_object(payload):
        return "payload is not a JSON object"
    if item.priority is not None and (
        not isinstance(item.priority, int) or not 0 <= item.priority <= 9
    ):
        return "priority must be an integer in 0..9"
    if not isinstance(item.tokens, int) or item.tokens < 0:
        return "tokens must be a non-negative integer"
    if item.pool is not None and (not isinstance(item.pool, str) or not item.pool):
        return "pool must be a non-empty string"
    return None


def is_json_object(text: str) -> bool:
    """True when ``text`` is exactly one JSON object (C-speed: the decoder's scanner)."""
    if not text.startswith("{"):
        return False
    try:
        value, end = _JSON_DECODE(text)
    except ValueError:
        return False
    return isinstance(value, dict) and (end == len(text) or not text[end:].strip())
