"""The engine contract, as checks any engine must pass. Used by tests/integration (transformers,
CPU) and tests/gpu (vLLM and transformers on CUDA), so both engines are held to one standard."""

from __future__ import annotations

import pytest

from inference.engines.base import Engine
from inference.errors import ItemError, PermanentError
from inference.schema import Request, Result


def chat(text: str, **kw: object) -> Request:
    return Request(task="chat", messages=({"role": "user", "content": text},), **kw)  # type: ignore[arg-type]


def run_one(engine: Engine, request: Request) -> Result:
    [result] = engine.run([engine.prepare(request)])
    assert isinstance(result, Result), result
    return result


def check_one_result_per_item_in_order(engine: Engine) -> None:
    requests = [
        chat(f"item number {i} " * (1 + i % 7), max_tokens=3 + i % 5, temperature=0.0)
        for i in range(12)
    ]
    results = engine.run([engine.prepare(r) for r in requests])
    assert len(results) == len(requests)
    singles = [run_one(engine, r) for r in requests[:4]]
    for batched, single in zip(results[:4], singles, strict=True):
        assert isinstance(batched, Result)
        assert batched.output_text == single.output_text  # batch composition changes nothing
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, Result)
        assert result.prompt_tokens > 0
        assert 0 < result.completion_tokens <= request.max_tokens
        assert result.finish_reason in ("stop", "length")


def check_max_tokens_and_length_finish(engine: Engine) -> None:
    result = run_one(engine, chat("count to one hundred please", max_tokens=5, temperature=0.0))
    assert result.completion_tokens <= 5
    if result.finish_reason == "length":
        assert result.completion_tokens == 5


def check_stop_strings_cut_the_output(engine: Engine) -> None:
    free = run_one(engine, chat("tell me a story", max_tokens=24, temperature=0.0))
    assert free.output_text
    stop = free.output_text[len(free.output_text) // 2 :][:2]
    if not stop.strip():
        pytest.skip("greedy output has no usable stop substring")
    cut = run_one(engine, chat("tell me a story", max_tokens=24, temperature=0.0, stop=(stop,)))
    assert stop not in (cut.output_text or "")
    assert cut.finish_reason == "stop"
    assert free.output_text.startswith(cut.output_text or "")


def check_seeded_sampling_is_reproducible(engine: Engine) -> None:
    request = chat("pick a word", max_tokens=12, temperature=1.0, seed=1234)
    assert run_one(engine, request).output_text == run_one(engine, request).output_text


def check_too_long_is_permanent_before_the_engine(engine: Engine) -> None:
    with pytest.raises(PermanentError) as info:
        engine.prepare(chat("word " * 10, max_tokens=engine.context_len))
    assert info.value.code == "context_length_exceeded"


def check_errors_are_per_item(engine: Engine) -> None:
    prepared = [engine.prepare(chat("fine", max_tokens=2, temperature=0.0)) for _ in range(3)]
    results = engine.run(prepared)
    assert not any(isinstance(r, ItemError) for r in results)


GENERATION_CHECKS = [
    check_one_result_per_item_in_order,
    check_max_tokens_and_length_finish,
    check_stop_strings_cut_the_output,
    check_seeded_sampling_is_reproducible,
    check_too_long_is_permanent_before_the_engine,
    check_errors_are_per_item,
]
