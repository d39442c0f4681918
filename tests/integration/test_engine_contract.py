"""Both engines pass the same contract (tests/engine_contract.py); here the transformers engine
on the CPU with the bundled tiny model. tests/gpu runs the same checks on CUDA and vLLM."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from inference.config import BatchingConfig, EngineConfig
from inference.engines import Engine, make_engine
from inference.errors import PermanentError
from inference.schema import Request, Result
from tests import engine_contract


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine(EngineConfig(model="tiny-llama", device="cpu"), BatchingConfig())


@pytest.mark.parametrize("check", engine_contract.GENERATION_CHECKS, ids=lambda c: c.__name__)
def test_transformers_engine_passes_the_contract(
    engine: Engine, check: Callable[[Engine], None]
) -> None:
    check(engine)


def test_n_above_one_is_refused_with_a_reason(engine: Engine) -> None:
    with pytest.raises(PermanentError, match="n > 1") as info:
        engine.prepare(engine_contract.chat("x", n=2))
    assert info.value.code == "unsupported"


def test_generation_model_refuses_embeddings(engine: Engine) -> None:
    with pytest.raises(PermanentError, match="does not serve embedding"):
        engine.prepare(Request(task="embedding", prompt="x", max_tokens=0))


def test_completion_prompt_runs(engine: Engine) -> None:
    result = engine_contract.run_one(
        engine, Request(task="completion", prompt="Once upon a time", max_tokens=4)
    )
    assert result.completion_tokens <= 4 and result.output_text is not None


def test_embedding_engine_gives_unit_vectors() -> None:
    embedder = make_engine(EngineConfig(model="all-minilm-l6-v2", device="cpu"), BatchingConfig())
    texts = ["a short one", "a somewhat longer sentence about batch inference on GPUs"]
    prepared = [embedder.prepare(Request(task="embedding", prompt=t, max_tokens=0)) for t in texts]
    results = embedder.run(prepared)
    for result in results:
        assert isinstance(result, Result) and result.embedding is not None
        vector = np.array(result.embedding)
        assert vector.shape == (384,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert embedder.context_len == 256  # sentence-transformers' max_seq_length, not 512
