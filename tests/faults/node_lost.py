"""The scenario of case 12, a node lost, as a driver of its own (``python -m
tests.faults.node_lost RAY_TMP WORK OUT SEED``): a ``ray.cluster_utils.Cluster`` with a head of
no CPUs and two nodes of one CPU each (one tiny-model worker on each), a job in a thread, and
once a seeded share of it is done, one node removed without warning
(``remove_node(allow_graceful=False)``: its raylet and every process on it are killed) and a
fresh node added. Writes what happened to OUT as JSON; the test checks the output."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

# Fast node-death detection: the pool sees the lost worker in seconds, not half a minute.
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def main(ray_tmp: str, work: Path, out: Path, seed: int) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from inference.queue.actor import NAMESPACE
    from tests.faults.harness import config_for, job_done_share, run_in_thread, write_items

    rng = random.Random(seed)
    result: dict[str, Any] = {}
    # Cluster writes its address to <RAY_TMPDIR or /tmp>/ray/ray_current_cluster and does not
    # create the folder: a fresh machine has none. Keep it in this scenario's own temp dir.
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": ray_tmp, "_system_config": SYSTEM_CONFIG},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        path = write_items(work / "in.jsonl", 1200, 12 + seed, max_tokens=(6, 12))
        config = config_for(work, work / "queue.sqlite", lease_s=10).with_updates(
            scaling={"max_workers": 2}
        )
        thread, box = run_in_thread(path, config, "node-lost")
        mark = rng.uniform(0.15, 0.4)
        deadline = time.monotonic() + 150
        while (
            thread.is_alive() and time.monotonic() < deadline and job_done_share("node-lost") < mark
        ):
            time.sleep(0.05)
        result["share_at_removal"] = job_done_share("node-lost")
        result["alive_at_removal"] = thread.is_alive()
        victim = rng.choice(sorted(cluster.worker_nodes, key=lambda n: n.unique_id))
        cluster.remove_node(victim, allow_graceful=False)
        result["removed_at_s"] = round(time.monotonic() - deadline + 150, 1)
        cluster.add_node(num_cpus=1)
        thread.join(180)
        result["finished"] = not thread.is_alive()
        if "error" in box:
            result["error"] = repr(box["error"])
        if "summary" in box:
            s = box["summary"]
            result["summary"] = {"output": str(s.output), "workers_lost": s.workers_lost}
    finally:
        out.write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
