import pytest

from inference.batching import Batcher, batch_cost, pack, run_isolated, take_batch
from inference.engines.base import Prepared
from inference.errors import EngineFatalError, ItemError, PermanentError, TransientError
from inference.schema import Request, Result


def _item(prompt: int, max_tokens: int, key: str = "") -> Prepared:
    return Prepared(
        Request(task="completion", prompt="x", max_tokens=max_tokens), [1] * prompt, key=key
    )


def test_pack_respects_the_token_budget_and_batch_size() -> None:
    items = [_item(p, 10) for p in range(1, 101)]
    batches = pack(items, max_batch_size=16, max_batch_tokens=600)
    assert sum(len(b) for b in batches) == 100
    assert all(len(b) <= 16 for b in batches)
    assert all(batch_cost(b) <= 600 for b in batches if len(b) > 1)


def test_items_are_sorted_by_length_to_cut_padding() -> None:
    items = [_item(p, 8) for p in (50, 3, 49, 2, 48, 1)]
    batch, rest = take_batch(items, max_batch_size=3, max_batch_tokens=10_000)
    assert sorted(i.prompt_tokens for i in batch) == [1, 2, 3]
    assert len(rest) == 3


def test_an_item_over_budget_still_runs_alone() -> None:
    batch, rest = take_batch([_item(500, 500), _item(1, 1)], 8, 100)
    assert len(batch) == 1 and len(rest) == 1


class _PoisonEngine:
    """A real engine contract implementation that fails any batch containing 'poison'."""

    model_name = "poison"
    tasks = frozenset({"completion"})
    context_len = 10_000
    max_batch_size = 64

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, request: Request) -> Prepared:
        return Prepared(request, [1])

    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        self.calls += 1
        if any(it.key == "poison" for it in batch):
            raise ValueError("cannot digest this")
        return [Result(output_text=str(it.key)) for it in batch]

    def close(self) -> None:
        pass


def test_poison_item_is_isolated_from_its_batch() -> None:
    engine = _PoisonEngine()
    batch = [_item(1, 1, key=str(i)) for i in range(15)] + [_item(1, 1, key="poison")]
    results = run_isolated(engine, batch)
    assert len(results) == 16
    assert all(isinstance(r, Result) for r in results[:15])
    assert isinstance(results[15], TransientError)
    assert "cannot digest" in results[15].message


def test_item_error_raised_for_a_single_item_keeps_its_kind() -> None:
    class Engine(_PoisonEngine):
        def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
            raise PermanentError("bad input", code="invalid_request")

    [result] = run_isolated(Engine(), [_item(1, 1)])
    assert isinstance(result, PermanentError)


def test_engine_fatal_error_is_not_blamed_on_items() -> None:
    class Engine(_PoisonEngine):
        def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
            raise EngineFatalError("gone")

    with pytest.raises(EngineFatalError):
        run_isolated(Engine(), [_item(1, 1), _item(1, 1)])


def test_batcher_returns_a_partial_batch_after_max_wait() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=10)
    batcher.add([_item(1, 1)])
    assert len(batcher.take()) == 1
    assert batcher.take() == []


def test_batcher_returns_at_once_when_full() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_tokens=10_000, max_wait_ms=60_000)
    batcher.add([_item(1, 1), _item(1, 1), _item(1, 1)])
    assert len(batcher.take()) == 2
    assert len(batcher.drain()) == 1
