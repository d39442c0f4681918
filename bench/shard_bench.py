"""Write throughput of committed shards (issue 5): rows/s and MB/s through the whole commit
protocol (declare on the WorkQueue actor, write + fsync under _tmp/, publish and complete on the
actor), with results shaped like the demo's (a few hundred characters of text per row).
Prints a final JSON line. Run it alone on the machine."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import ray

from inference.queue.actor import NAMESPACE, get_or_create_queue
from inference.queue.store import JobSpec, NewItem
from inference.shards import JobOutput, results_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--format", default="parquet", choices=["parquet", "arrow"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace=NAMESPACE,
        _temp_dir=str(folder / "ray"),
        log_to_driver=False,
    )
    queue = get_or_create_queue(folder / "queue.sqlite")
    job = "shard-bench"
    spec = JobSpec(job, settings={"output_path": str(folder / "out"), "output_format": args.format})
    ray.get(queue.create_job.remote(spec))
    for first in range(0, args.rows, 5000):
        chunk = [NewItem(f"r{i}", "{}") for i in range(first, min(first + 5000, args.rows))]
        ray.get(queue.enqueue.remote(job, chunk))
    output = JobOutput(str(folder / "out"), job, args.format)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    written = rows_done = 0
    start = time.perf_counter()
    while True:
        leased = ray.get(queue.lease.remote("bench", args.rows_per_shard, None, 60.0))
        if not leased:
            break
        now = datetime.now(UTC)
        rows = [
            {
                "job_id": job,
                "custom_id": it.item_id,
                "output_text": " ".join(rng.choices(words, k=40)),
                "embedding": None,
                "finish_reason": "length",
                "prompt_tokens": 120,
                "completion_tokens": 40,
                "model": "tiny-llama",
                "attempts": 1,
                "worker": "bench",
                "latency_ms": 12.5,
                "completed_at": now,
            }
            for it in leased
        ]
        tokens = [it.token for it in leased]
        declared = ray.get(queue.declare_shard.remote(job, tokens, "bench"))
        nbytes = output.write_table(results_table(rows), declared.tmp_path)
        result = ray.get(queue.commit_shard.remote(job, declared.n, len(rows), nbytes, None))
        assert result.committed, result
        written += nbytes
        rows_done += len(rows)
    wall = time.perf_counter() - start
    ray.shutdown()
    print(
        json.dumps(
            {
                "format": args.format,
                "rows": rows_done,
                "rows_per_shard": args.rows_per_shard,
                "committed_rows_per_s": round(rows_done / wall),
                "committed_mb_per_s": round(written / wall / 1e6, 2),
                "bytes_per_row": round(written / rows_done, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
