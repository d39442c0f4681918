"""The engine contract on a GPU: vLLM and transformers on CUDA, the same checks as the CPU tests.
Skipped (saying why) where CUDA, or vLLM for the vLLM engine, is missing. ``INFERENCE_GPU_MODEL``
names another local model folder to run them on (bench/gpu_check.sh passes it through)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest

from inference.config import BatchingConfig, EngineConfig
from inference.engines import Engine, make_engine
from tests import engine_contract

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
MODEL = os.environ.get("INFERENCE_GPU_MODEL", "tiny-llama")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def cuda_transformers() -> Engine:
    return make_engine(EngineConfig(model=MODEL, device="cuda", dtype="float32"), BatchingConfig())


@pytest.fixture(scope="module")
def vllm_engine() -> Engine:
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    return make_engine(
        EngineConfig(kind="vllm", model=MODEL, options={"gpu_memory_utilization": 0.5}),
        BatchingConfig(max_batch_size=256),
    )


@pytest.mark.parametrize("check", engine_contract.GENERATION_CHECKS, ids=lambda c: c.__name__)
def test_transformers_on_cuda_passes_the_contract(
    cuda_transformers: Engine, check: Callable[[Engine], None]
) -> None:
    check(cuda_transformers)


@pytest.mark.parametrize("check", engine_contract.GENERATION_CHECKS, ids=lambda c: c.__name__)
def test_vllm_passes_the_contract(vllm_engine: Engine, check: Callable[[Engine], None]) -> None:
    check(vllm_engine)
