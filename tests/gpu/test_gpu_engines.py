"""The engine contract on a GPU: vLLM and transformers on CUDA, the same checks as the CPU tests
(vLLM's CPU build runs them in every CI run), and a whole job through vLLM on a GPU worker.
Skipped (saying why) where CUDA, or vLLM for the vLLM engine, is missing. ``INFERENCE_GPU_MODEL``
names another local model folder to run the contract on (bench/gpu_check.sh passes it through);
the checks of what vLLM serves beyond it assume the bundled tiny model (its answers always run
to ``max_tokens``), so they run on tiny-llama only."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from inference.config import BatchingConfig, EngineConfig, load_config
from inference.engines import Engine, make_engine
from tests import engine_contract
from tests.conftest import REPO

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
MODEL = os.environ.get("INFERENCE_GPU_MODEL", "tiny-llama")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU_OPTIONS = {
    "gpu_memory_utilization": 0.5,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


@pytest.fixture(scope="module")
def cuda_transformers() -> Engine:
    return make_engine(EngineConfig(model=MODEL, device="cuda", dtype="float32"), BatchingConfig())


@pytest.fixture(scope="module")
def vllm_engine() -> Engine:
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    return make_engine(
        EngineConfig(kind="vllm", model=MODEL, options=GPU_OPTIONS),
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


@pytest.mark.skipif(MODEL != "tiny-llama", reason="these checks assume the bundled tiny model")
@pytest.mark.parametrize("check", engine_contract.VLLM_CHECKS, ids=lambda c: c.__name__)
def test_vllm_on_cuda_serves_every_field(
    vllm_engine: Engine, check: Callable[[Engine], None]
) -> None:
    check(vllm_engine)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")
def test_a_job_through_vllm_on_a_gpu_worker_streams_and_keeps_every_field(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_engine: Engine
) -> None:
    from tests.integration.test_vllm_job import check_a_streaming_job

    vllm_engine.close()  # free the GPU for the job's worker
    config = load_config(REPO / "configs/vllm-gpu.yaml").with_updates(
        engine={"options": GPU_OPTIONS},
        output={"path": str(tmp_path / "out"), "rows_per_shard": 200, "max_shard_age_s": 2},
        queue={"db_path": str(queue_db), "max_attempts": 3, "backoff_base_s": 0.1},
        batching={"max_batch_size": 64, "max_batch_tokens": 1 << 20},
        scaling={"max_workers": 1},
    )
    check_a_streaming_job(tmp_path, queue_db, config)
