"""The engine contract, as checks any engine must pass. Used by tests/integration (transformers,
CPU, and vLLM's CPU build) and tests/gpu (vLLM and transformers on CUDA), so both engines are
held to one standard. ``VLLM_CHECKS`` are what vLLM serves beyond it (n, logprobs, penalties,
structured outputs, continuous feeding): the same checks on vLLM's CPU build and on a GPU."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
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


# ---------------------------------------------------------------- what vLLM serves beyond it
def check_n_returns_every_choice_and_bills_each(engine: Any) -> None:
    result = run_one(engine, chat("pick words", n=3, max_tokens=6, temperature=1.0, seed=5))
    assert result.choices is not None and len(result.choices) == 3
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.completion_tokens == sum(c.completion_tokens for c in result.choices) == 18
    assert result.output_text == result.choices[0].text
    assert len({c.text for c in result.choices}) > 1  # sampled, so they differ


def check_logprobs_come_back_per_token_with_alternatives(engine: Any) -> None:
    result = run_one(
        engine, chat("hello", max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3)
    )
    assert result.choices is not None
    content = result.choices[0].logprobs
    assert content is not None and len(content) == 5
    for token in content:
        assert token["logprob"] <= 0.0
        assert len(token["top_logprobs"]) == 3
        best = max(t["logprob"] for t in token["top_logprobs"])
        assert token["logprob"] == pytest.approx(best)  # greedy picks the likeliest


def check_penalties_change_the_sampling(engine: Any) -> None:
    # Long enough that greedy decoding repeats itself, which is what the penalties act on.
    plain = run_one(engine, chat("alpha beta", max_tokens=300, temperature=0.0))
    penalised = run_one(
        engine,
        chat(
            "alpha beta",
            max_tokens=300,
            temperature=0.0,
            presence_penalty=2.0,
            frequency_penalty=2.0,
        ),
    )
    assert plain.output_text != penalised.output_text


SCHEMA = {
    "type": "object",
    # No free-running numbers or strings: the tiny model would run them to max_tokens.
    "properties": {"label": {"enum": ["positive", "negative"]}, "sure": {"type": "boolean"}},
    "required": ["label", "sure"],
    "additionalProperties": False,
}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}


def check_a_json_schema_response_format_is_followed(engine: Any) -> None:
    for text in ("this was great", "awful, simply awful", "meh"):
        result = run_one(
            engine,
            chat(text, max_tokens=60, temperature=0.0, response_format=json_schema(SCHEMA)),
        )
        assert result.finish_reason == "stop", result.output_text
        jsonschema.validate(json.loads(result.output_text or ""), SCHEMA)


def check_a_json_object_response_format_starts_an_object(engine: Any) -> None:
    result = run_one(
        engine,
        chat("json please", max_tokens=8, temperature=0.0, response_format={"type": "json_object"}),
    )
    assert (result.output_text or "").lstrip().startswith("{")


def check_a_schema_vllm_cannot_compile_fails_its_item_alone(engine: Any) -> None:
    bad = json_schema({"type": "no-such-type"})  # the parser's meta-check is bypassed here
    items = [
        engine.prepare(chat("a", max_tokens=4, response_format=bad)),
        engine.prepare(chat("b", max_tokens=4)),
    ]
    refused, fine = engine.run(items)
    assert isinstance(refused, PermanentError) and "no-such-type" in refused.message
    assert isinstance(fine, Result) and fine.completion_tokens == 4


def check_a_long_answer_does_not_hold_short_ones_back(engine: Any) -> None:
    long = engine.prepare(chat("a long one", max_tokens=1500, temperature=0.0))
    engine.submit([long])
    finished: list[str] = []
    waves = 0
    while engine.in_flight():
        if waves < 3 and engine.in_flight() == 1:  # feed short items while the long one runs
            waves += 1
            engine.submit(
                [engine.prepare(chat(f"short {waves}.{i}", max_tokens=4)) for i in range(8)]
            )
        for item, result in engine.step():
            assert isinstance(result, Result)
            finished.append(item.request.messages[0]["content"])
    assert waves == 3
    assert finished[-1] == "a long one"
    assert len(finished) == 25


VLLM_CHECKS = [
    check_n_returns_every_choice_and_bills_each,
    check_logprobs_come_back_per_token_with_alternatives,
    check_penalties_change_the_sampling,
    check_a_json_schema_response_format_is_followed,
    check_a_json_object_response_format_starts_an_object,
    check_a_schema_vllm_cannot_compile_fails_its_item_alone,
    check_a_long_answer_does_not_hold_short_ones_back,
]
