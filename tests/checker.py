"""The exactly-once checker of the crash tests: reads ``data/``, ``errors/`` and the queue's
database after a run and counts what must all be zero.

- lost: accepted by the queue but in neither data nor errors;
- duplicated: in data twice, or in both data and errors;
- unexpected: in the output but never accepted (or under another job id);
- partial: a file in ``data/`` that is unreadable, or whose rows differ from its shard record.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads

from inference.schema import ERROR_SCHEMA, RESULT_SCHEMA


@dataclass
class Verdict:
    accepted: int
    in_data: int
    in_errors: int
    lost: int
    duplicated: int
    unexpected: int
    partial: int

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == self.unexpected == self.partial == 0


def _read(path: Path, schema: object) -> list[str] | None:
    fmt = "ipc" if path.suffix == ".arrow" else "parquet"
    try:
        table = pads.dataset(str(path), format=fmt, schema=schema).to_table()
    except Exception:
        return None
    return table.column("custom_id").to_pylist()


def _queue_rows(db_path: Path | str, job_id: str) -> tuple[set[str], dict[str, set[str]]]:
    """The job's accepted custom ids, and the custom ids of each committed shard by file name,
    from the queue's database: a SQLite file, or a ``postgresql://`` URL."""
    if str(db_path).startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(str(db_path)) as pg:
            ids_of = dict(
                pg.execute("SELECT id, item_id FROM items WHERE job_id = %s", (job_id,)).fetchall()
            )
            shards = pg.execute(
                "SELECT path, tokens FROM shards WHERE job_id = %s AND state = 'committed'",
                (job_id,),
            ).fetchall()
        return set(ids_of.values()), {
            Path(path).name: {ids_of[t[0]] for t in json.loads(tokens)} for path, tokens in shards
        }
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    accepted = {
        row[0] for row in db.execute("SELECT item_id FROM items WHERE job_id = ?", (job_id,))
    }
    shard_rows: dict[str, set[str]] = {}
    for path, tokens in db.execute(
        "SELECT path, tokens FROM shards WHERE job_id = ? AND state = 'committed'", (job_id,)
    ):
        ids = [t[0] for t in json.loads(tokens)]
        names = {
            row[0]
            for row in db.execute(
                "SELECT item_id FROM items WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            )
        }
        shard_rows[Path(path).name] = names
    db.close()
    return accepted, shard_rows


def check(job_dir: Path, db_path: Path | str, job_id: str) -> Verdict:
    accepted, shard_rows = _queue_rows(db_path, job_id)
    data: Counter[str] = Counter()
    partial = 0
    for file in sorted((job_dir / "data").glob("*")):
        ids = _read(file, RESULT_SCHEMA)
        if ids is None or (file.name in shard_rows and set(ids) != shard_rows[file.name]):
            partial += 1
            continue
        if file.name not in shard_rows:
            partial += 1  # visible, yet no committed shard record says it counts
        data.update(ids)
    errors: Counter[str] = Counter()
    for file in sorted((job_dir / "errors").glob("*")):
        ids = _read(file, ERROR_SCHEMA)
        if ids is None:
            partial += 1
            continue
        errors.update(ids)
    seen = set(data) | set(errors)
    duplicated = sum(n - 1 for n in data.values() if n > 1) + len(set(data) & set(errors))
    duplicated += sum(n - 1 for n in errors.values() if n > 1)
    return Verdict(
        accepted=len(accepted),
        in_data=len(data),
        in_errors=len(errors),
        lost=len(accepted - seen),
        duplicated=duplicated,
        unexpected=len(seen - accepted),
        partial=partial,
    )
