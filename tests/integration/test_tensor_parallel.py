"""Multi-GPU models (``engine.tensor_parallel_size``) on vLLM's CPU build.

- **TP 2 on CPU**: vLLM's CPU build runs the tensor parallel ranks as processes of its engine
  core (``distributed_executor_backend: mp``; it has no Ray executor: "current platform cpu
  does not support ray"), each bound to cores of its own (``cpu_rank_binding``); greedy answers
  and their logprobs match TP 1.
- **The placement group**: on a local Ray cluster of its own with two logical GPUs (Ray counts
  them; the model runs on the CPU), a job with ``tensor_parallel_size: 2`` and
  ``gpus_per_worker: 2`` runs its worker inside a STRICT_PACK placement group of two GPU
  bundles (the worker's CPUs in the first) with vLLM's two ranks, and the group is removed when
  the worker ends: drained at the end of the job, or lost (killed while it loads). vLLM's Ray
  executor itself (a rank actor per GPU bundle) needs GPUs: tests/gpu.

The Ray scenario runs as a driver in a subprocess (``python -m
tests.integration.test_tensor_parallel``), as in test_autoscale.py, so it never meets the
session's own Ray cluster; it writes what it saw to a JSON file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from inference.config import EngineConfig
from inference.engines.vllm import VllmEngine
from inference.schema import Result
from tests.engine_contract import chat

REPO = Path(__file__).resolve().parents[2]
CPU_OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
SCENARIO_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="TP 2 on CPU needs a core for each of its 2 ranks"
)


def _answers(world: int) -> tuple[list[Result], dict[str, Any]]:
    """Greedy answers (with logprobs) of a tiny-llama engine of ``world`` TP ranks."""
    cores = os.sched_getaffinity(0)  # an engine pins this process off its ranks' cores
    # An engine of an earlier test in this process left it pinned off that engine's cores; a
    # worker process holds one engine, so start from every core, as a worker does.
    psutil.Process().cpu_affinity([])
    engine = VllmEngine(
        EngineConfig(
            kind="vllm",
            model="tiny-llama",
            dtype="float32",
            max_model_len=256,
            tensor_parallel_size=world,
            options=CPU_OPTIONS,
        )
    )
    try:
        requests = [
            chat(text, max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=1)
            for text in ("Hello, my name is", "The capital of France is", "1 2 3 4", "why?" * 9)
        ]
        results = engine.run([engine.prepare(r) for r in requests])
        parallel = engine.engine.vllm_config.parallel_config
        ranks = [
            sorted(child.cpu_affinity())
            for child in psutil.Process().children(recursive=True)
            if child.name().startswith("VLLM::Worker")
        ]
        seen = {
            "tp": parallel.tensor_parallel_size,
            "backend": parallel.distributed_executor_backend,
            "rank_cores": sorted(ranks),
        }
        assert all(isinstance(r, Result) for r in results), results
        return [r for r in results if isinstance(r, Result)], seen
    finally:
        engine.close()
        os.sched_setaffinity(0, cores)


def test_tp2_on_cpu_generates_what_tp1_does() -> None:
    one, seen_one = _answers(1)
    two, seen_two = _answers(2)
    assert seen_one["tp"] == 1
    assert seen_two["tp"] == 2 and seen_two["backend"] == "mp"
    cores = seen_two["rank_cores"]
    assert len(cores) == 2 and not set(cores[0]) & set(cores[1]), cores  # a core set per rank
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # restored once the engine started
    for a, b in zip(one, two, strict=True):
        assert a.output_text == b.output_text and a.completion_tokens == b.completion_tokens == 12
        assert a.choices is not None and b.choices is not None
        la, lb = a.choices[0].logprobs, b.choices[0].logprobs
        assert la is not None and lb is not None
        for ta, tb in zip(la, lb, strict=True):
            assert ta["token"] == tb["token"]
            assert abs(ta["logprob"] - tb["logprob"]) < 1e-3


def test_a_tp2_worker_runs_in_a_placement_group_of_two_gpu_bundles_freed_when_it_ends(
    tmp_path: Path,
) -> None:
    result_path = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_tensor_parallel", str(tmp_path)],
        cwd=REPO,
        env=env,
        timeout=SCENARIO_TIMEOUT_S + 60,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(result_path.read_text())

    job = seen["job"]
    assert job["done"] == job["total"] == 6 and job["dead"] == 0, job
    group = seen["group_while_running"]
    assert group["bundles"] == {"0": {"GPU": 1.0, "CPU": 2.0}, "1": {"GPU": 1.0}}, group
    assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
    assert group["name"].startswith("tiny-llama-")
    worker = seen["worker_while_running"]
    assert worker["placement_group"] == group["placement_group_id"]  # the worker is in it
    assert worker["tp"] == 2 and worker["ranks"] == 2, (worker, job, proc.stderr[-3000:])
    assert worker["backend"] == "mp"  # vLLM's CPU build has no Ray executor
    assert seen["gpus_free_while_running"] == 0  # the two GPU bundles are held
    assert seen["groups_after_job"] == ["REMOVED"], seen  # drained at the end of the job
    assert seen["gpus_free_after_job"] == 2

    lost = seen["lost"]
    assert lost["state_before"] == "CREATED" and lost["ended"] == [lost["worker"]]
    assert lost["state_after"] == "REMOVED" and lost["gpus_free_after"] == 2
    assert seen["vllm_processes_left"] == [], seen  # nothing of either worker lingers


# ---------------------------------------------------------------------- the scenario driver
def _group(pg_id: str) -> dict[str, Any]:
    from ray.util import placement_group_table

    return dict(placement_group_table()[pg_id])


def _wait(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def _vllm_family(pid: int) -> dict[int, str]:
    """The vLLM processes (engine core, ranks) under process ``pid``: pid -> name."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    family = {}
    for child in children:
        try:
            if child.name().startswith("VLLM::"):
                family[child.pid] = child.name()
        except psutil.Error:
            continue
    return family


def _new_ranks(before: set[int]) -> dict[int, str]:
    """vLLM rank processes (``VLLM::Worker...``) on this machine, less the pids in ``before``."""
    ranks = {}
    for proc in psutil.process_iter(["name"]):
        name = proc.info["name"] or ""
        if name.startswith("VLLM::Worker") and proc.pid not in before:
            ranks[proc.pid] = name
    return ranks


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def _worker_view(handle: Any) -> dict[str, Any]:
    """From inside the worker actor: its placement group and its engine's ranks."""

    def look(worker: Any) -> dict[str, Any]:
        from ray.util import get_current_placement_group

        group = get_current_placement_group()
        parallel = worker.engine.engine.vllm_config.parallel_config
        return {
            "placement_group": group.id.hex() if group else None,
            "tp": parallel.tensor_parallel_size,
            "backend": parallel.distributed_executor_backend,
        }

    import ray

    return dict(ray.get(handle.__ray_call__.remote(look), timeout=120))


def _named_actor(name: str) -> Any:
    """The live actor of that name in the project's namespace; None while there is none."""
    import ray

    from inference.queue.actor import NAMESPACE

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def scenario(work: Path) -> dict[str, Any]:
    import ray

    from inference.config import load_config
    from inference.pool import WorkerPool
    from inference.queue.actor import NAMESPACE, get_or_create_queue
    from inference.runner import run_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(
        address="local",
        num_cpus=3,
        num_gpus=2,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(work / "ray"),
    )
    config = load_config(REPO / "configs/vllm-cpu.yaml").with_updates(
        engine={"tensor_parallel_size": 2, "max_model_len": 256, "options": CPU_OPTIONS},
        output={"path": str(work / "out"), "rows_per_shard": 100, "max_shard_age_s": 1},
        queue={"db_path": str(work / "queue.sqlite"), "lease_s": 120},
        scaling={"gpus_per_worker": 2, "cpus_per_worker": 2, "max_workers": 1},
    )
    path = work / "in.jsonl"
    with path.open("w") as f:
        for i in range(6):
            body = {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"item {i}"}],
                "max_tokens": 200,  # the worker is still busy when the test looks in
                "temperature": 0,
            }
            line = {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")

    seen: dict[str, Any] = {}
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["summary"] = run_job(path, config, job_id="tp2", poll_s=0.2)
        except BaseException as exc:
            box["error"] = repr(exc)

    before = set(_new_ranks(set()))  # rank processes another engine may have left
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    from ray.util import placement_group_table

    pg_id = _wait(
        "a created placement group",
        lambda: next(
            (k for k, v in placement_group_table().items() if v["state"] == "CREATED"), None
        ),
        120,
    )
    group = _group(pg_id)
    seen["group_while_running"] = {
        "placement_group_id": pg_id,
        "name": group["name"],
        "strategy": group["strategy"],
        "state": group["state"],
        "bundles": {str(k): v for k, v in group["bundles"].items()},
    }
    seen["gpus_free_while_running"] = ray.available_resources().get("GPU", 0.0)
    # The group is named after its worker, whose actor may be registered a moment later.
    handle = _wait("the group's worker", lambda: _named_actor(group["name"]), 60)
    from ray._private.state import actors

    worker_pid = _wait("the worker's pid", lambda: actors(handle._actor_id.hex()).get("Pid"), 60)
    # The engine's rank processes are counted all the while the job runs, not once: a fast
    # machine can finish the six items (and close the engine) before a single look lands. They
    # are counted machine-wide, less any that were there before: in full-suite runs none was
    # ever found under the actor's pid (which the lost worker below finds), so the descendants
    # are kept apart, for the failure message.
    most_ranks = [0]
    names_seen: set[str] = set()
    under_worker: set[str] = set()

    def count_ranks() -> None:
        while thread.is_alive():
            ranks = _new_ranks(before)
            names_seen.update(ranks.values())
            under_worker.update(_vllm_family(worker_pid).values())
            most_ranks[0] = max(most_ranks[0], len(ranks))
            time.sleep(0.1)

    counter = threading.Thread(target=count_ranks, daemon=True)
    counter.start()
    seen["worker_while_running"] = _worker_view(handle)
    thread.join(SCENARIO_TIMEOUT_S)
    counter.join(5)
    seen["worker_while_running"]["ranks"] = most_ranks[0]
    seen["worker_while_running"]["vllm_processes"] = sorted(names_seen)
    seen["worker_while_running"]["under_worker_pid"] = sorted(under_worker)
    if "error" in box or "summary" not in box:
        raise RuntimeError(f"the job failed: {box.get('error', 'timed out')}")
    summary = box["summary"]
    seen["job"] = {
        "total": summary.total,
        "done": summary.done,
        "dead": summary.dead,
        "workers": summary.workers,
        "workers_lost": summary.workers_lost,
    }
    seen["groups_after_job"] = sorted({v["state"] for v in placement_group_table().values()})
    seen["gpus_free_after_job"] = _wait(
        "GPUs back", lambda: ray.available_resources().get("GPU", 0.0) == 2 and 2, 30
    )

    # A worker lost while loading: its group goes with it.
    queue = get_or_create_queue(str(work / "queue.sqlite"))
    pool = WorkerPool(config, "tiny-llama", queue)
    pool.start(1)
    (member,) = pool.members.values()
    group_id = member.placement_group.id.hex()
    before = _wait(
        "the lost worker's group", lambda: _group(group_id)["state"] == "CREATED" and "CREATED", 60
    )
    pid = _wait(
        "the lost worker's pid", lambda: actors(member.handle._actor_id.hex()).get("Pid"), 60
    )
    family = _wait(  # it is loading: its engine core has started its ranks
        "the lost worker's ranks",
        lambda: (f := _vllm_family(pid)) and any("Worker" in n for n in f.values()) and f,
        240,  # once in a full-suite run, 120 s was not enough (its first worker took 31 s)
    )
    ray.kill(member.handle, no_restart=True)
    ended = _wait("the lost worker reaped", lambda: pool.check(replace=False), 30)
    seen["lost"] = {
        "worker": member.worker_id,
        "state_before": before,
        "ended": ended,
        "state_after": _group(group_id)["state"],
        "gpus_free_after": _wait(
            "GPUs back", lambda: ray.available_resources().get("GPU", 0.0) == 2 and 2, 30
        ),
    }
    seen["lost"]["vllm_processes"] = sorted(family.values())
    try:  # what the killed worker started notices that its parent is gone
        _wait("the lost worker's vLLM processes gone", lambda: not _alive(list(family)), 30)
        seen["vllm_processes_left"] = []
    except TimeoutError:
        seen["vllm_processes_left"] = [family[pid] for pid in _alive(list(family))]
        for left in _alive(list(family)):  # do not leave them spinning
            with contextlib.suppress(psutil.Error):
                psutil.Process(left).kill()
    ray.shutdown()
    return seen


def main() -> None:
    work = Path(sys.argv[1])
    # A child inherits its parent's CPU affinity: a pytest process an earlier engine pinned off
    # its cores would leave this cluster (and the ranks' binding) one core.
    psutil.Process().cpu_affinity([])
    # The cluster's state under a short path: Ray's socket names have a length limit.
    base = Path(tempfile.mkdtemp(prefix="inf-tp-", dir="/tmp"))
    try:
        seen = scenario(base)
        (work / "result.json").write_text(json.dumps(seen, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
