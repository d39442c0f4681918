"""The vLLM engine on vLLM's CPU build (installed by ``make setup``): the engine contract the
transformers engine passes, every request field vLLM serves, continuous feeding, embeddings
through the pooling runner, and a killed engine core. Never skipped: CI installs vLLM.

The bundled tiny model never emits its end-of-sequence token, so every answer is exactly
``max_tokens`` long (``finish_reason: length``): answer lengths are chosen by the test."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import jsonschema
import numpy as np
import pytest

from inference.config import BatchingConfig, EngineConfig
from inference.engines import Engine, is_continuous, make_engine
from inference.engines.vllm import VllmEngine
from inference.errors import EngineFatalError, PermanentError
from inference.schema import Request, Result
from tests import engine_contract
from tests.engine_contract import chat, run_one

CPU_OPTIONS = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
    # As configs/vllm-cpu.yaml: the tiny model would fill a JSON answer with whitespace.
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def vllm_config(model: str = "tiny-llama", **kw: object) -> EngineConfig:
    return EngineConfig(kind="vllm", model=model, dtype="float32", options=CPU_OPTIONS, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine() -> Iterator[VllmEngine]:
    built = make_engine(vllm_config(), BatchingConfig(max_batch_size=256))
    assert isinstance(built, VllmEngine)
    yield built
    built.close()


@pytest.mark.parametrize("check", engine_contract.GENERATION_CHECKS, ids=lambda c: c.__name__)
def test_vllm_on_cpu_passes_the_engine_contract(
    engine: Engine, check: Callable[[Engine], None]
) -> None:
    check(engine)


def test_the_engine_is_fed_continuously(engine: VllmEngine) -> None:
    assert is_continuous(engine)


def test_n_returns_every_choice_and_bills_each(engine: VllmEngine) -> None:
    result = run_one(engine, chat("pick words", n=3, max_tokens=6, temperature=1.0, seed=5))
    assert result.choices is not None and len(result.choices) == 3
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.completion_tokens == sum(c.completion_tokens for c in result.choices) == 18
    assert result.output_text == result.choices[0].text
    assert len({c.text for c in result.choices}) > 1  # sampled, so they differ


def test_logprobs_come_back_per_token_with_alternatives(engine: VllmEngine) -> None:
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


def test_top_logprobs_over_the_engine_limit_is_refused(engine: VllmEngine) -> None:
    with pytest.raises(PermanentError, match="top_logprobs"):
        engine.prepare(chat("x", logprobs=True, top_logprobs=engine.max_logprobs + 1))


def test_penalties_change_the_sampling(engine: VllmEngine) -> None:
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


def test_a_json_schema_response_format_is_followed(engine: VllmEngine) -> None:
    for text in ("this was great", "awful, simply awful", "meh"):
        result = run_one(
            engine,
            chat(text, max_tokens=60, temperature=0.0, response_format=json_schema(SCHEMA)),
        )
        assert result.finish_reason == "stop", result.output_text
        jsonschema.validate(json.loads(result.output_text or ""), SCHEMA)


def test_a_json_object_response_format_starts_an_object(engine: VllmEngine) -> None:
    result = run_one(
        engine,
        chat("json please", max_tokens=8, temperature=0.0, response_format={"type": "json_object"}),
    )
    assert (result.output_text or "").lstrip().startswith("{")


def test_a_schema_vllm_cannot_compile_fails_its_item_alone(engine: VllmEngine) -> None:
    bad = json_schema({"type": "no-such-type"})  # the parser's meta-check is bypassed here
    items = [
        engine.prepare(chat("a", max_tokens=4, response_format=bad)),
        engine.prepare(chat("b", max_tokens=4)),
    ]
    refused, fine = engine.run(items)
    assert isinstance(refused, PermanentError) and "no-such-type" in refused.message
    assert isinstance(fine, Result) and fine.completion_tokens == 4


def test_a_schema_that_compiles_too_slowly_is_dead_lettered_without_stalling(
    engine: VllmEngine,
) -> None:
    engine.schema_timeout_s = 1e-3
    try:
        # 300 patterned string fields: a grammar that takes far longer than 1 ms to compile.
        fields = {
            f"field_{i}": {"type": "string", "pattern": "[a-z]{3,9}@[a-z]+[.]com"}
            for i in range(300)
        }
        fresh = json_schema({"type": "object", "properties": fields, "required": list(fields)})
        with pytest.raises(PermanentError) as info:
            engine.prepare(chat("x", response_format=fresh))
        assert info.value.code == "schema_timeout"
    finally:
        engine.schema_timeout_s = 10.0
    # The engine went on meanwhile.
    assert run_one(engine, chat("still here", max_tokens=3)).completion_tokens == 3


def test_a_long_answer_does_not_hold_short_ones_back(engine: VllmEngine) -> None:
    long = engine.prepare(chat("a long one", max_tokens=1500, temperature=0.0))
    engine.submit([long])
    finished: list[tuple[str, float]] = []
    waves = 0
    while engine.in_flight():
        if waves < 3 and engine.in_flight() == 1:  # feed short items while the long one runs
            waves += 1
            engine.submit(
                [engine.prepare(chat(f"short {waves}.{i}", max_tokens=4)) for i in range(8)]
            )
        for item, result in engine.step():
            assert isinstance(result, Result)
            finished.append((item.request.messages[0]["content"], time.monotonic()))
    assert waves == 3
    order = [name for name, _ in finished]
    assert order[-1] == "a long one"
    assert len(order) == 25


def test_embeddings_run_through_the_pooling_runner_and_match_transformers() -> None:
    texts = ["a short one", "a somewhat longer sentence about batch inference on GPUs"]
    requests = [Request(task="embedding", prompt=t, max_tokens=0) for t in texts]
    embedder = make_engine(vllm_config("all-minilm-l6-v2"), BatchingConfig())
    try:
        assert not getattr(embedder, "continuous", True)  # one forward pass: batch at a time
        ours = embedder.run([embedder.prepare(r) for r in requests])
    finally:
        embedder.close()
    reference = make_engine(EngineConfig(model="all-minilm-l6-v2", device="cpu"), BatchingConfig())
    theirs = reference.run([reference.prepare(r) for r in requests])
    for a, b in zip(ours, theirs, strict=True):
        assert isinstance(a, Result) and isinstance(b, Result)
        va, vb = np.array(a.embedding), np.array(b.embedding)
        assert va.shape == (384,)
        assert np.linalg.norm(va) == pytest.approx(1.0, abs=1e-4)
        assert float(va @ vb) > 0.999
        assert a.prompt_tokens == b.prompt_tokens


def test_a_killed_engine_core_is_engine_fatal_not_a_hang(engine: VllmEngine) -> None:
    """Last in this module: it kills the module's engine."""
    items = [engine.prepare(chat("story", max_tokens=1000, seed=i)) for i in range(16)]
    engine.submit(items)
    engine.step()
    [pid] = engine.core_pids()
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(EngineFatalError):
        while engine.in_flight():
            engine.step()
    assert time.monotonic() - started < 30
    with pytest.raises(EngineFatalError):
        engine.submit([items[0]])
    assert len(engine.abort()) == 16
