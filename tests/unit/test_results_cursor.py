"""The results reader's cursor (inference.results): shards that commit out of their numbering,
abort, or come later are each delivered once, and the cursor stays short."""

from __future__ import annotations

import random
from typing import Any

import pytest

from inference.results import Cursor, advance


class Ledger:
    """A job's shard table as the queue keeps it: numbers from a counter, declared, then
    committed or aborted."""

    def __init__(self) -> None:
        self.shards: dict[int, str] = {}
        self.next = 0

    def declare(self) -> int:
        n = self.next
        self.next += 1
        self.shards[n] = "declared"
        return n

    def shards_from(self, low: int) -> list[dict[str, Any]]:
        return [
            {"n": n, "state": st, "path": f"part-{n}", "rows": 10}
            for n, st in sorted(self.shards.items())
            if n >= low and st in ("declared", "committed")
        ]


def read(cursor: Cursor, ledger: Ledger, max_rows: int | None = None) -> tuple[list[int], Cursor]:
    given, following = advance(cursor, ledger.shards_from(cursor.low), max_rows)
    return [s["n"] for s in given], following


def test_a_shard_that_commits_after_a_later_one_is_still_delivered() -> None:
    ledger = Ledger()
    a, b, c = ledger.declare(), ledger.declare(), ledger.declare()
    ledger.shards[b] = "committed"
    got, cursor = read(Cursor(), ledger)
    assert got == [b]
    assert cursor.low == a  # shard a may still commit
    ledger.shards[a] = "committed"
    got, cursor = read(cursor, ledger)
    assert got == [a]
    assert cursor == Cursor(c, frozenset())  # a and b read; c in flight
    ledger.shards[c] = "aborted"
    got, cursor = read(cursor, ledger)
    assert got == [] and cursor == Cursor(c, frozenset())
    d = ledger.declare()
    ledger.shards[d] = "committed"
    got, cursor = read(cursor, ledger)
    assert got == [d] and cursor == Cursor(d + 1, frozenset())


def test_max_rows_gives_whole_shards_and_the_rest_on_the_next_call() -> None:
    ledger = Ledger()
    for _ in range(5):
        ledger.shards[ledger.declare()] = "committed"
    got, cursor = read(Cursor(), ledger, max_rows=25)
    assert got == [0, 1]
    got, cursor = read(cursor, ledger, max_rows=5)  # below one shard: still one
    assert got == [2]
    got, cursor = read(cursor, ledger)
    assert got == [3, 4] and cursor == Cursor(5, frozenset())


@pytest.mark.parametrize("seed", range(40))
def test_a_reader_following_random_commits_gets_every_shard_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    ledger = Ledger()
    cursor = Cursor()
    delivered: list[int] = []
    for _ in range(400):
        roll = rng.random()
        declared = [n for n, st in ledger.shards.items() if st == "declared"]
        if roll < 0.35 and len(declared) < 6:
            ledger.declare()
        elif roll < 0.75 and declared:
            ledger.shards[rng.choice(declared)] = "committed" if rng.random() < 0.9 else "aborted"
        else:
            got, cursor = read(cursor, ledger, max_rows=rng.choice([None, 10, 30]))
            delivered += got
            cursor = Cursor.decode(cursor.encode())  # what a client sends back
            # Only shards above the oldest in flight are listed: the cursor grows with what
            # commits while one shard is slow, not with the job.
            in_flight = [n for n, st in ledger.shards.items() if st == "declared"]
            assert cursor.low <= min(in_flight, default=cursor.low)
            assert all(ledger.shards[n] == "committed" and n > cursor.low for n in cursor.seen)
    for n in [n for n, st in ledger.shards.items() if st == "declared"]:
        ledger.shards[n] = "committed"
    while True:
        got, cursor = read(cursor, ledger)
        if not got:
            break
        delivered += got
    committed = sorted(n for n, st in ledger.shards.items() if st == "committed")
    assert sorted(delivered) == committed
    assert len(delivered) == len(set(delivered))
    assert cursor.seen == frozenset() and cursor.low <= ledger.next


@pytest.mark.parametrize("text", ["x", "-1", "3.2", "3.3", "01", "1..2", "1.2.", " 1"])
def test_a_cursor_this_server_did_not_give_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="after must be a cursor"):
        Cursor.decode(text)


def test_a_cursor_reads_back_as_written() -> None:
    assert Cursor.decode("") == Cursor()
    assert Cursor.decode("7.9.12") == Cursor(7, frozenset({9, 12}))
    assert Cursor(7, frozenset({12, 9})).encode() == "7.9.12"
