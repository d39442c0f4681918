"""A multi-GPU model on real GPUs: a job with ``engine.tensor_parallel_size: 2`` runs its worker
in a placement group of two GPU bundles, vLLM's Ray executor puts a rank actor on each (they
hold the group's GPUs), the answers are TP 1's, and the group is gone once the job ends.

Skipped (saying why) without two CUDA GPUs or without vLLM. vLLM's CPU build has no Ray executor
("current platform cpu does not support ray"), so on CPUs the same placement group is tested
with vLLM's ranks as engine-core processes: tests/integration/test_tensor_parallel.py."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from inference.config import EngineConfig, load_config
from inference.engines.vllm import VllmEngine
from inference.queue.actor import NAMESPACE
from tests.conftest import REPO
from tests.engine_contract import chat
from tests.integration.test_tensor_parallel import _wait, _worker_view

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="tensor_parallel_size 2 needs two CUDA GPUs",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed (pip install -e '.[vllm]')",
    ),
]
OPTIONS = {"gpu_memory_utilization": 0.4}
TEXTS = [f"item {i}" for i in range(6)]


def test_a_tp2_job_runs_vllm_rank_actors_in_the_workers_placement_group(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    import ray
    from ray.util import placement_group_table

    from tests.faults.harness import run_in_thread
    from tests.integration.test_vllm_job import chat_body, rows, write_jsonl

    config = load_config(REPO / "configs/vllm-gpu.yaml").with_updates(
        engine={"tensor_parallel_size": 2, "dtype": "float32", "options": OPTIONS},
        output={"path": str(tmp_path / "out"), "rows_per_shard": 100, "max_shard_age_s": 1},
        queue={"db_path": str(queue_db), "max_attempts": 3, "backoff_base_s": 0.1},
        scaling={"gpus_per_worker": 2, "max_workers": 1},
    )
    path = write_jsonl(
        tmp_path / "in.jsonl", [(f"c{i}", chat_body(t, 12)) for i, t in enumerate(TEXTS)]
    )
    known = set(placement_group_table())
    thread, box = run_in_thread(path, config, "gpu-tp2")
    pg_id = _wait(
        "the worker's placement group",
        lambda: next(
            (
                k
                for k, v in placement_group_table().items()
                if k not in known and v["state"] == "CREATED"
            ),
            None,
        ),
        300,
    )
    group = placement_group_table()[pg_id]
    assert [b.get("GPU") for b in group["bundles"].values()] == [1.0, 1.0]
    assert group["strategy"] == "STRICT_PACK"
    view = _worker_view(ray.get_actor(group["name"], namespace=NAMESPACE))
    assert view["placement_group"] == pg_id
    assert view["tp"] == 2 and view["backend"] == "ray"
    # Both of the group's GPUs are held by vLLM's rank actors (the worker holds none).
    held = _wait(
        "the rank actors",
        lambda: ray.available_resources().get(f"GPU_group_{pg_id}", 2.0) == 0 and "held",
        120,
    )
    assert held
    thread.join(600)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary.done == len(TEXTS) and summary.dead == 0
    deadline = time.monotonic() + 30
    while placement_group_table()[pg_id]["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placement_group_table()[pg_id]["state"] == "REMOVED"

    by_id = {r["custom_id"]: r["output_text"] for r in rows(Path(summary.output))}
    one = VllmEngine(
        EngineConfig(kind="vllm", model="tiny-llama", dtype="float32", options=OPTIONS)
    )
    try:
        requests = [chat(t, max_tokens=12, temperature=0.0) for t in TEXTS]
        expected = [
            getattr(r, "output_text", r) for r in one.run([one.prepare(r) for r in requests])
        ]
    finally:
        one.close()
    assert [by_id[f"c{i}"] for i in range(len(TEXTS))] == expected, json.dumps(by_id)
