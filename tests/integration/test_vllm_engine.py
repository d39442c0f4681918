"""The vLLM engine on vLLM's CPU build (installed by ``make setup``): the engine contract the
transformers engine passes, every request field vLLM serves, continuous feeding, embeddings
through the pooling runner, and a killed engine core. Never skipped: CI installs vLLM.

The bundled tiny model never emits its end-of-sequence token, so every answer is exactly
``max_tokens`` long (``finish_reason: length``): answer lengths are chosen by the test."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from inference.config import BatchingConfig, EngineConfig
from inference.engines import Engine, is_continuous, make_engine
from inference.engines.vllm import VllmEngine
from inference.errors import EngineFatalError, PermanentError
from inference.schema import Request, Result
from tests import engine_contract
from tests.engine_contract import chat, json_schema, run_one

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


@pytest.mark.parametrize("check", engine_contract.VLLM_CHECKS, ids=lambda c: c.__name__)
def test_vllm_on_cpu_serves_every_field(engine: Engine, check: Callable[[Engine], None]) -> None:
    check(engine)


def test_the_engine_is_fed_continuously(engine: VllmEngine) -> None:
    assert is_continuous(engine)


def test_top_logprobs_over_the_engine_limit_is_refused(engine: VllmEngine) -> None:
    with pytest.raises(PermanentError, match="top_logprobs"):
        engine.prepare(chat("x", logprobs=True, top_logprobs=engine.max_logprobs + 1))


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
