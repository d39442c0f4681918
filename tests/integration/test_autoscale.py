"""Autoscaling on Ray's fake multi-node autoscaler: a backlog brings nodes and workers up, an
empty queue sends them back, and a scale-down while items are leased loses and duplicates
nothing.

The cluster is ``ray start --head --block`` with the fake provider (``RAY_FAKE_CLUSTER=1``),
started here in its own session, temp dir and ports, and stopped by killing that process group:
``ray.cluster_utils.AutoscalingCluster`` would run ``ray stop --force``, which kills every Ray
process on the machine, and its bundled ``example.yaml`` is missing from the 2.60 wheel. Worker
nodes are type ``gpu`` with ``{"CPU": 1, "GPU": 1}`` (a fake GPU: the engine runs on the CPU),
``min_workers: 0, max_workers: 3``, so the GPU path of the scaler (``{"GPU": 1, "CPU": 1}``
bundles) is the one tested.

Each scenario runs as a driver in a subprocess (``python -m tests.integration.test_autoscale``)
so it never meets the session's own local Ray cluster; it writes its figures to a JSON file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
MAX_NODES = 3
SCENARIO_TIMEOUT_S = 170.0


@dataclass
class FakeCluster:
    address: str
    base: Path
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_provider_config(gcs_port: int) -> dict[str, Any]:
    """The full cluster config the fake provider needs (``example.yaml`` is not in the wheel)."""
    return {
        "cluster_name": "inference-autoscale-test",
        "max_workers": MAX_NODES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 1024 * 1024},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _our_processes(marker: str) -> list[int]:
    """Pids whose command line names our temp dir: the processes this test started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
    return pids


def _stop_group(head: subprocess.Popen, marker: str) -> None:
    """Terminate, then kill, the head's process group, then anything still naming ``marker``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    for pid in _our_processes(marker):  # anything that left the group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def ray_head(
    base: Path, args: list[str], env: dict[str, str], attempts: int = 3
) -> Iterator[subprocess.Popen]:
    """``ray start --head --block`` in its own process group, temp dir ``base/r`` and log
    ``base/head.log``; on exit the group is terminated, then killed, and any process still
    naming ``base`` is killed too. Never ``ray stop``: that would stop everyone's Ray.

    A start that fails is tried again: on a loaded machine Ray's fixed 30 s wait for the raylet
    to register can run out."""
    for attempt in range(1, attempts + 1):
        with (base / "head.log").open("wb") as log:
            head = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", f"--temp-dir={base}/r", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the teardown kills only that
            )
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (base / "head.log").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        else:
            break
        _stop_group(head, str(base))
        if attempt == attempts:
            raise RuntimeError((base / "head.log").read_text()[-3000:])
    try:
        yield head
    finally:
        _stop_group(head, str(base))


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[FakeCluster]:
    base = Path(tempfile.mkdtemp(prefix="ias", dir="/tmp"))  # short: unix socket paths
    gcs = _free_port()
    config_path = base / "cluster.json"
    config_path.write_text(json.dumps(_fake_provider_config(gcs)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        AUTOSCALER_METRIC_PORT=str(_free_port()),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    args = [
        f"--port={gcs}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--autoscaling-config={config_path}",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--disable-usage-stats",
    ]
    try:
        with ray_head(base, args, env):
            yield FakeCluster(f"127.0.0.1:{gcs}", base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_scenario(cluster: FakeCluster, kind: str) -> dict[str, Any]:
    work = cluster.base / kind
    work.mkdir()
    out = work / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.test_autoscale",
            kind,
            cluster.address,
            str(work),
            str(out),
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S + 30,
    )
    if proc.returncode != 0 or not out.exists():
        logs = sorted((cluster.base / "r").glob("session_*/logs/monitor.*"))
        tail = "".join(p.read_text()[-2000:] for p in logs)
        raise AssertionError(f"scenario {kind} failed:\n{proc.stderr[-5000:]}\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    print(f"\n{kind}: {json.dumps(result['figures'])}")
    last: tuple[Any, ...] = ()
    for row in result["timeline"]:  # the steps where something changed (shown with -s)
        key = tuple(v for k, v in row.items() if k not in ("t", "needed", "done", "pending"))
        if key != last:
            print(f"  {row}")
            last = key
    return result


def test_backlog_brings_nodes_and_workers_up_and_idle_sends_them_back(
    fake_cluster: FakeCluster,
) -> None:
    result = _run_scenario(fake_cluster, "natural")
    f = result["figures"]
    assert f["first_node_s"] is not None and f["first_worker_s"] is not None
    assert f["max_nodes"] >= 2  # the backlog asked for more than one worker, and got them
    assert f["max_ready_workers"] >= 2
    assert f["queue_empty_s"] is not None
    assert f["scale_in_s"] is not None, "the nodes did not go away after the queue emptied"
    assert f["missing"] == 0 and f["duplicates"] == 0
    assert f["rows"] == f["items"]
    assert f["workers_lost"] == 0
    assert result["final"]["demand"] == 0 and result["final"]["workers"] == 0


def test_scale_down_while_items_are_leased_loses_and_duplicates_nothing(
    fake_cluster: FakeCluster,
) -> None:
    result = _run_scenario(fake_cluster, "forced")
    f = result["figures"]
    assert f["forced_at_s"] is not None, "never had two ready workers to scale down"
    assert f["held_when_drained"] > 0, "the drained workers held no leases"
    assert f["missing"] == 0 and f["duplicates"] == 0
    assert f["rows"] == f["items"]
    assert f["max_attempts"] == 1  # a drain charges no attempt
    assert f["workers_lost"] == 0
    # The demand is lowered only after the drained workers exit: never below what runs.
    for row in result["timeline"]:
        assert row["demand"] >= row["workers"] + row["draining"], row
    after = [r for r in result["timeline"] if r["t"] >= f["forced_at_s"]]
    assert any(r["draining"] > 0 and r["demand"] > r["desired"] for r in after)


def test_the_controller_scales_a_served_job_up_and_back_to_zero(fake_cluster: FakeCluster) -> None:
    result = _run_scenario(fake_cluster, "controller")
    f = result["figures"]
    assert f["pool_errors"] == {}
    assert f["first_node_s"] is not None and f["first_worker_s"] is not None
    assert f["max_nodes"] >= 2 and f["max_ready_workers"] >= 2
    assert f["status"] == "completed"
    assert f["scale_in_s"] is not None, "the Controller did not scale the pool back to zero"
    assert f["missing"] == 0 and f["duplicates"] == 0 and f["rows"] == f["items"]
    assert f["workers_lost"] == 0
    for row in result["timeline"]:  # demand is lowered only after drained workers exit
        assert row["demand"] >= row["workers"] + row["draining"], row


# ---------------------------------------------------------------------- the driver
def _write_input(path: Path, kind: str, count: int) -> None:
    words = ["forecast", "glacier", "camera", "shovel", "poetry", "music", "river", "lamp"]
    with path.open("w") as f:
        for i in range(count):
            body = {
                "model": "tiny-llama",
                "messages": [
                    {"role": "user", "content": f"Tell me about the {words[i % 8]} number {i}."}
                ],
                "max_tokens": 16,
            }
            line = {
                "custom_id": f"{kind}-{i:05d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            f.write(json.dumps(line) + "\n")


def autoscale_config(work: Path) -> Any:
    from inference.config import load_config

    return load_config(REPO / "configs" / "tiny-cpu.yaml").with_updates(
        output={"path": str(work / "out"), "rows_per_shard": 200, "max_shard_age_s": 2},
        queue={"db_path": str(work.parent / "queue.sqlite"), "lease_s": 30},
        batching={"max_batch_size": 32, "prefetch_batches": 2},
        scaling={
            "mode": "autoscale",
            "min_workers": 0,
            "max_workers": MAX_NODES,
            "gpus_per_worker": 1,
            "cpus_per_worker": 1,
            # Short enough that the measured rate still needs more than one worker on a host at
            # full speed (one worker does the whole backlog in ~18 s there; with 30 s the scaler
            # rightly stopped the second worker before it was ready, and the test failed).
            "target_drain_s": 8.0,
            "assumed_tokens_per_s": 1000,  # asks for all three nodes at once; measured later
            "cooldown_s": 3,
            "hysteresis": 0.2,
            "idle_timeout_s": 2,
            "drain_timeout_s": 20,
            "interval_s": 0.5,
        },
    )


def _wait_for_an_empty_cluster(timeout_s: float = 90.0) -> None:
    """Start from a cluster without worker nodes: the scenarios share one cluster, and the
    idle nodes a previous scenario left are being given back; a worker placed on one of them
    would be lost with it."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("GPU", 0) and time.monotonic() < deadline:
        time.sleep(0.5)


def scenario(kind: str, address: str, work: Path) -> dict[str, Any]:
    import ray
    from ray.autoscaler.sdk import request_resources

    from inference.autoscale import Autoscaler, ResourceDemand
    from inference.inputs import read_input
    from inference.queue.actor import NAMESPACE, get_or_create_queue
    from inference.runner import _chunks, finalize, job_spec
    from inference.shards import JobOutput, read_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    _wait_for_an_empty_cluster()
    items = 3000 if kind == "natural" else 2000
    config = autoscale_config(work)
    target_drain_s = config.scaling.target_drain_s
    path = work / "input.jsonl"
    _write_input(path, kind, items)
    queue = get_or_create_queue(config.queue.db_path or "")
    job_id = f"autoscale-{kind}"
    output_root = config.output.path
    ray.get(queue.create_job.remote(job_spec(config, job_id, output_root)))

    t0 = time.monotonic()
    requests: list[tuple[float, int]] = []

    def request(bundles: list[dict[str, float]]) -> None:
        requests.append((round(time.monotonic() - t0, 2), len(bundles)))
        request_resources(bundles=bundles)

    scaler = Autoscaler(config, queue, demand=ResourceDemand(request))
    for chunk in _chunks(read_input(path, config.input, config.engine.model), config):
        ray.get(queue.enqueue.remote(job_id, chunk))
    enqueued_s = time.monotonic() - t0

    figures: dict[str, Any] = {
        "items": items,
        "target_drain_s": target_drain_s,
        "enqueue_s": round(enqueued_s, 2),
        "first_node_s": None,
        "first_worker_s": None,
        "queue_empty_s": None,
        "scale_in_s": None,
        "forced_at_s": None,
        "held_when_drained": 0,
        "max_nodes": 0,
        "max_ready_workers": 0,
    }
    timeline: list[dict[str, Any]] = []
    while time.monotonic() - t0 < SCENARIO_TIMEOUT_S:
        report = scaler.step()
        t = round(time.monotonic() - t0, 2)
        nodes = int(ray.cluster_resources().get("GPU", 0))
        st = ray.get(queue.stats.remote(job_id))
        d = report.decision
        timeline.append(
            {
                "t": t,
                "nodes": nodes,
                "workers": report.workers,
                "ready": report.ready,
                "draining": report.draining,
                "desired": d.desired,
                "needed": round(d.needed, 2),
                "reason": d.reason,
                "demand": report.demand,
                "tokens_per_s": report.tokens_per_s and round(report.tokens_per_s),
                "pending": st["pending"],
                "leased": st["leased"],
                "done": st["done"],
            }
        )
        figures["max_nodes"] = max(figures["max_nodes"], nodes)
        figures["max_ready_workers"] = max(figures["max_ready_workers"], report.ready)
        if nodes and figures["first_node_s"] is None:
            figures["first_node_s"] = t
        if report.ready and figures["first_worker_s"] is None:
            figures["first_worker_s"] = t
        if kind == "forced" and figures["forced_at_s"] is None and report.ready >= 2:
            # Cut the pool to one worker while the ones it drains hold leased items (the
            # scaler drains the youngest ready workers first).
            pool = scaler.pool
            victims = [w for w in reversed(pool.active()) if w in pool.ready][: report.ready - 1]
            infos = ray.get([pool.members[w].handle.info.remote() for w in victims])
            held = sum(i["held"] for i in infos)
            if held and st["pending"]:
                scaler.update_scaling(max_workers=1)
                figures.update(forced_at_s=t, held_when_drained=held, drained=len(victims))
                figures["pending_when_drained"] = st["pending"]
        empty = st["pending"] + st["leased"] == 0
        if empty and figures["queue_empty_s"] is None:
            figures["queue_empty_s"] = t
        if figures["queue_empty_s"] is not None:
            if kind == "forced":
                scaler.close()
                break
            if nodes == 0 and report.workers == 0 and report.draining == 0:
                figures["scale_in_s"] = t
                break
        time.sleep(config.scaling.interval_s)

    final = scaler.step() if kind == "natural" else scaler.last
    stats = ray.get(queue.stats.remote(job_id))
    output = JobOutput(output_root, job_id, config.output.format)
    finalize(queue, output, job_id, stats)
    table = read_results(output.base)
    ids = Counter(table.column("custom_id").to_pylist())
    expected = {f"{kind}-{i:05d}" for i in range(items)}
    figures.update(
        rows=table.num_rows,
        missing=len(expected - set(ids)),
        duplicates=sum(n - 1 for n in ids.values() if n > 1),
        max_attempts=max(table.column("attempts").to_pylist(), default=0),
        workers_lost=scaler.pool.lost,
        done=stats["done"],
        dead=stats["dead"],
        lease_expiries=stats["lease_expiries"],
        requests=requests,
    )
    if figures["queue_empty_s"] is not None and figures["scale_in_s"] is not None:
        figures["empty_to_scale_in_s"] = round(figures["scale_in_s"] - figures["queue_empty_s"], 2)
    if figures["queue_empty_s"] is not None:
        figures["drain_s"] = round(figures["queue_empty_s"] - enqueued_s, 2)
        if figures["first_worker_s"] is not None:
            figures["drain_after_first_worker_s"] = round(
                figures["queue_empty_s"] - figures["first_worker_s"], 2
            )
    assert final is not None
    return {
        "figures": figures,
        "timeline": timeline,
        "final": {"demand": final.demand, "workers": final.workers, "draining": final.draining},
    }


def controller_scenario(address: str, work: Path) -> dict[str, Any]:
    """What ``inference serve`` does: the cluster's Controller sizes the pool of a native job
    from its backlog; this driver only enqueues and watches."""
    import ray

    from inference.controller import get_or_create_controller
    from inference.inputs import read_input
    from inference.queue.actor import NAMESPACE, get_or_create_queue
    from inference.runner import _chunks
    from inference.shards import read_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    _wait_for_an_empty_cluster()
    items, kind, job_id = 2000, "controller", "autoscale-controller"
    config = autoscale_config(work)
    path = work / "input.jsonl"
    _write_input(path, kind, items)
    queue = get_or_create_queue(config.queue.db_path or "")
    controller = get_or_create_controller(work / "state")
    t0 = time.monotonic()
    ray.get(
        controller.create_job.remote(job_id, config.model_dump(mode="json"), config.output.path)
    )
    for chunk in _chunks(read_input(path, config.input, config.engine.model), config):
        ray.get(queue.enqueue.remote(job_id, chunk))
    controller.wake.remote()
    figures: dict[str, Any] = {
        "items": items,
        "first_node_s": None,
        "first_worker_s": None,
        "queue_empty_s": None,
        "completed_s": None,
        "scale_in_s": None,
        "max_nodes": 0,
        "max_ready_workers": 0,
    }
    timeline: list[dict[str, Any]] = []
    job: dict[str, Any] = {}
    while time.monotonic() - t0 < SCENARIO_TIMEOUT_S:
        t = round(time.monotonic() - t0, 2)
        pool = ray.get(controller.snapshot.remote())["pools"].get(config.engine.model, {})
        job = ray.get(controller.job.remote(job_id))
        nodes = int(ray.cluster_resources().get("GPU", 0))
        counts = job.get("stats") or {"done": 0, "dead": 0}
        timeline.append(
            {
                "t": t,
                "nodes": nodes,
                "status": job["status"],
                "workers": pool.get("workers", 0),
                "ready": pool.get("ready", 0),
                "draining": pool.get("draining", 0),
                "desired": pool.get("desired"),
                "demand": pool.get("demand", 0),
                "reason": pool.get("reason"),
                "done": counts["done"],
            }
        )
        figures["max_nodes"] = max(figures["max_nodes"], nodes)
        figures["max_ready_workers"] = max(figures["max_ready_workers"], pool.get("ready", 0))
        if nodes and figures["first_node_s"] is None:
            figures["first_node_s"] = t
        if pool.get("ready") and figures["first_worker_s"] is None:
            figures["first_worker_s"] = t
        settled = counts["done"] + counts["dead"] == items
        if settled and figures["queue_empty_s"] is None:
            figures["queue_empty_s"] = t
        if job["status"] == "completed" and figures["completed_s"] is None:
            figures["completed_s"] = t
        gone = nodes == 0 and pool.get("workers") == 0 and pool.get("draining") == 0
        if figures["completed_s"] is not None and gone and pool.get("demand") == 0:
            figures["scale_in_s"] = t
            break
        time.sleep(0.5)
    table = read_results(Path(config.output.path) / job_id)
    ids = Counter(table.column("custom_id").to_pylist())
    expected = {f"{kind}-{i:05d}" for i in range(items)}
    snap = ray.get(controller.snapshot.remote())
    figures.update(
        rows=table.num_rows,
        missing=len(expected - set(ids)),
        duplicates=sum(n - 1 for n in ids.values() if n > 1),
        workers_lost=snap["pools"].get(config.engine.model, {}).get("lost", 0),
        pool_errors=snap["pool_errors"],
        status=job.get("status"),
    )
    if figures["queue_empty_s"] is not None and figures["scale_in_s"] is not None:
        figures["empty_to_scale_in_s"] = round(figures["scale_in_s"] - figures["queue_empty_s"], 2)
    ray.get(controller.shutdown.remote(), timeout=120)
    ray.kill(controller, no_restart=True)
    return {"figures": figures, "timeline": timeline, "final": timeline[-1] if timeline else {}}


if __name__ == "__main__":
    _kind, _address, _work, _out = sys.argv[1:5]
    if _kind == "controller":
        _result = controller_scenario(_address, Path(_work))
    else:
        _result = scenario(_kind, _address, Path(_work))
    Path(_out).write_text(json.dumps(_result))
