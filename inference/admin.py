"""What the operator commands (`inference status | cancel | dlq | export`) need: the WorkQueue of
the running cluster (``RAY_ADDRESS``), or, when no cluster runs (an embedded `inference run` has
ended), the queue's database opened directly. Only one of the two may write at a time: a command
that writes (cancel, redrive) takes the database's owner lock, which a live WorkQueue holds, and
refuses (saying to set ``RAY_ADDRESS``) while it is held; one that only reads (status, dlq list,
export) opens the file read-only and never writes it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inference.config import Config
from inference.errors import QueueError
from inference.export import error_jsonl, output_jsonl
from inference.progress import TokenPrices, job_cost, model_shares
from inference.schedule import describe_next_run
from inference.shards import JobOutput


def migrate_queue(target: str) -> tuple[int | None, int]:
    """Bring the queue database at ``target`` (a SQLite file or a PostgreSQL URL) to this
    version's schema, as its owner (refused while a WorkQueue runs on it). Returns the version
    before (None: there was no schema) and after."""
    import sqlite3
    from contextlib import closing

    from inference.queue import pg
    from inference.queue.db import SCHEMA_VERSION
    from inference.queue.store import QueueStore

    before: int | None = None
    if pg.is_postgres_url(target):
        look = pg.PgConnection(target, read_only=True)
        try:
            before = pg.schema_version(look)
        finally:
            look.close()
    elif Path(target).is_file():
        with closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True)) as db:
            before = int(db.execute("PRAGMA user_version").fetchone()[0]) or None
    QueueStore(target, owner_wait_s=0.0).close()  # opening as the owner migrates
    return before, SCHEMA_VERSION


class QueueAccess:
    """Calls on the WorkQueue actor, or on the store itself when no cluster runs."""

    def __init__(self, config: Config, write: bool = False) -> None:
        from inference.runner import queue_db_path

        self._actor: Any = None
        self._store: Any = None
        if os.environ.get("RAY_ADDRESS"):
            from inference.cluster import connect
            from inference.queue.actor import get_queue

            connect()
            self._actor = get_queue()
        else:
            from inference.queue.pg import is_postgres_url
            from inference.queue.shared import open_store

            target = queue_db_path(config, config.output.path)
            if not is_postgres_url(target) and not Path(target).is_file():
                raise QueueError(
                    f"no queue database at {target} (set --output, queue.db_path or queue.url)"
                )
            # A write takes the owner lock (held until this process ends); a look takes none.
            self._store = open_store(
                target,
                shared=config.queue.shared,
                read_only=not write,
                owner_wait_s=0.0 if write else None,
            )

    def call(self, method: str, *args: Any) -> Any:
        if self._actor is not None:
            import ray

            return ray.get(getattr(self._actor, method).remote(*args))
        return getattr(self._store, method)(*args)

    def job_ids(self) -> list[str]:
        return list(self.call("stats")["jobs"])

    def progress(self) -> dict[str, dict[str, Any]]:
        """The Controller's progress (rates, ETA) by job, when a cluster with one runs."""
        if self._actor is None:
            return {}
        import ray

        from inference.queue.actor import NAMESPACE

        try:
            controller = ray.get_actor("Controller", namespace=NAMESPACE)
            natives: list[dict[str, Any]] = ray.get(controller.jobs.remote(100, None), timeout=10)[
                0
            ]
            batches: list[dict[str, Any]] = ray.get(
                controller.batches.remote(100, None), timeout=10
            )[0]
        except Exception:  # no Controller (an `inference run` job): counts only
            return {}
        return {r["id"]: r["progress"] for r in [*natives, *batches] if r.get("progress")}


def status_rows(access: QueueAccess, job_id: str | None) -> list[dict[str, Any]]:
    jobs = [job_id] if job_id else access.job_ids()
    progress = access.progress()
    rows = []
    for jid in jobs:
        stats = access.call("stats", jid)
        spec = access.call("job_spec", jid)
        price = float(spec.settings.get("cost_per_gpu_hour", 0.0))
        tokens = {p: tuple(v) for p, v in spec.settings.get("token_prices", {}).items()}
        settled = stats["done"] + stats["dead"]
        total = stats["total"] or 1
        rows.append(
            {
                "job": jid,
                "state": "completed"
                if settled == stats["total"] and stats["total"]
                else stats["state"],
                "done %": f"{100.0 * settled / total:.1f}",
                "done": stats["done"],
                "dead": stats["dead"],
                "pending": stats["pending"],
                "leased": stats["leased"],
                "tokens": stats["prompt_tokens"] + stats["completion_tokens"],
                "busy s": f"{stats['busy_s']:.1f}",
                "cost": f"{job_cost(stats, price, tokens)[0]:.4f}",
                **_live_columns(stats, progress.get(jid), price, tokens),
            }
        )
        rows.extend(_model_rows(jid, stats, spec.settings.get("models"), rows[-1], tokens))
    return rows


def _model_rows(
    job_id: str,
    stats: dict[str, Any],
    prices: dict[str, Any] | None,
    job_row: dict[str, Any],
    token_prices: TokenPrices | None = None,
) -> list[dict[str, Any]]:
    """A job of several models: a row per model under the job's (which gets their cost)."""
    if not prices:
        return []
    shares = model_shares(
        stats.get("pools", {}), {p: (n, c) for p, (n, c) in prices.items()}, token_prices
    )
    job_row["cost"] = f"{sum(m['cost'] for m in shares.values()):.4f}"
    rows = []
    for pool_name, (name, _) in prices.items():
        m = shares.get(name)
        if m is None:  # no items of this model
            continue
        pool = stats["pools"][pool_name]
        row = dict.fromkeys(job_row, "")
        row.update(
            {
                "job": f"  {job_id} · {name}",
                "state": "",
                "done %": f"{100.0 * m['fraction']:.1f}",
                "done": m["done"],
                "dead": m["dead"],
                "pending": m["pending"],
                "leased": m["leased"],
                "tokens": pool["prompt_tokens"] + pool["completion_tokens"],
                "busy s": f"{m['busy_s']:.1f}",
                "cost": f"{m['cost']:.4f}",
            }
        )
        rows.append(row)
    return rows


def _live_columns(
    stats: dict[str, Any],
    progress: dict[str, Any] | None,
    price: float,
    token_prices: TokenPrices | None = None,
) -> dict[str, str]:
    """Throughput, ETA and cost to finish: rates from the Controller when a cluster runs."""
    _, to_finish = job_cost(stats, price, token_prices)
    remaining = stats["pending"] + stats["leased"]
    eta = progress.get("eta_s") if progress and remaining else (0.0 if not remaining else None)
    return {
        "items/s": f"{progress['items_per_s']:.2f}" if progress else "-",
        "tokens/s": f"{progress['tokens_per_s']:.1f}" if progress else "-",
        "eta": "-" if eta is None else _duration(eta),
        "next run": (
            describe_next_run(float(stats.get("next_run_at") or 0.0), time.time())
            if remaining
            else "-"
        ),
        "to finish": "-" if to_finish is None else f"{to_finish:.4f}",
    }


def _duration(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def export_jsonl(
    config: Config, job_id: str, out_dir: Path, endpoint: str | None = None
) -> tuple[Path, Path]:
    """Write ``<job>_output.jsonl`` and ``<job>_errors.jsonl`` (OpenAI batch line format).
    ``endpoint`` shapes the answers (``/v1/completions``: text completions); None: each row
    decides by its ``url`` (in shards older than that column: an embedding, else chat)."""
    job_dir = JobOutput(config.output.path, job_id, config.output.format).base
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    outputs = output_jsonl(job_dir, endpoint)
    for name, chunks in (("output", outputs), ("errors", error_jsonl(job_dir))):
        path = out_dir / f"{job_id}_{name}.jsonl"
        _write_chunks(path, chunks)
        written.append(path)
    return written[0], written[1]


def _write_chunks(path: Path, chunks: Iterator[bytes]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
    tmp.replace(path)
