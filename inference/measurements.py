"""What finished jobs measured of each model, for the next estimate (:mod:`inference.estimate`),
and a job's ``estimate`` against its ``actual`` figures for ``job.json`` (:func:`job_report`).

One small JSON file per model under ``<state dir>/measurements/`` (the Controller's state
folder: ``api.state_dir``, else the folder of the queue's SQLite file, by default
``<output>/_queue/``), so ``inference run``, ``inference serve`` and ``inference estimate`` with
one config read and write the same figures. JSON rather than a table: a few hundred bytes per
model that a person can read and delete, written whole to a temporary name and renamed
(atomic), under a lock file, so two jobs finishing at once do not lose each other's figures.

A file keeps the figures of the model's last :data:`RECENT_JOBS` finished jobs, and the
estimate reads their sums:

- ``tokens_per_s``: prompt plus completion tokens per engine-second of one worker (the queue's
  ``busy_s``), the unit the scaler sizes pools in;
- ``completion_ratio``: completion tokens over the ``max_tokens`` x ``n`` the items allowed
  (known where the job had an estimate, which counted that budget);
- ``startup_s``: the median time an ``inference run`` job spends besides its workers' share of
  engine time (validation, loading the model, draining, finalize): wall time minus
  ``busy_s / workers``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.config import Config

logger = logging.getLogger(__name__)

RECENT_JOBS = 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def measurements_dir(config: Config) -> Path:
    """``<state dir>/measurements``: the state dir as :func:`inference.api.server.state_dir`
    finds it (``api.state_dir``, else beside the queue's SQLite file)."""
    from inference.runner import local_queue_path

    if config.api.state_dir:
        base = Path(config.api.state_dir).expanduser().absolute()
    else:
        base = Path(local_queue_path(config, config.output.path)).parent
    return base / "measurements"


@dataclass(frozen=True, slots=True)
class Measured:
    """One model's figures, from its recent jobs (None where none measured it)."""

    jobs: int = 0
    tokens_per_s: float | None = None
    completion_ratio: float | None = None
    startup_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class JobMeasure:
    """What one finished job of one model did."""

    job_id: str
    tokens: int  # prompt + completion tokens
    busy_s: float  # engine-seconds of all its workers
    completion_tokens: int = 0
    max_output_tokens: int | None = None  # the items' max_tokens x n, where counted
    wall_s: float | None = None  # an `inference run` job's wall time
    workers: int | None = None


def summarize(jobs: list[dict[str, Any]]) -> Measured:
    """The figures of a list of :class:`JobMeasure` records (as stored)."""
    busy = sum(float(j["busy_s"]) for j in jobs)
    tokens = sum(int(j["tokens"]) for j in jobs)
    budgeted = [j for j in jobs if j.get("max_output_tokens")]
    budget = sum(int(j["max_output_tokens"]) for j in budgeted)
    overheads = [
        max(0.0, float(j["wall_s"]) - float(j["busy_s"]) / int(j["workers"]))
        for j in jobs
        if j.get("wall_s") is not None and j.get("workers")
    ]
    return Measured(
        jobs=len(jobs),
        tokens_per_s=tokens / busy if busy > 0 and tokens > 0 else None,
        completion_ratio=(
            min(1.0, sum(int(j["completion_tokens"]) for j in budgeted) / budget)
            if budget
            else None
        ),
        startup_s=statistics.median(overheads) if overheads else None,
    )


class MeasurementStore:
    """The measurements folder: one ``<model>.json`` per model."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, model: str) -> Path:
        return self.folder / f"{_UNSAFE.sub('_', model)[:120] or 'model'}.json"

    def read(self, model: str) -> Measured:
        return summarize(self._jobs(model))

    def record(self, model: str, job: JobMeasure) -> Measured:
        """Add a finished job (replacing an earlier record of the same job id, as a resumed
        job reports again) and return the model's new figures. A job that did no engine work
        changes nothing."""
        if job.busy_s <= 0 or job.tokens <= 0:
            return self.read(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            jobs = [j for j in self._jobs(model) if j.get("job_id") != job.job_id]
            jobs = [*jobs, {**_fields(job), "finished_at": time.time()}][-RECENT_JOBS:]
            measured = summarize(jobs)
            doc = {"model": model, "measured": measured.as_dict(), "jobs": jobs}
            target = self.path(model)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, target)
        logger.info(
            "measured model=%s job=%s tokens_per_s=%s completion_ratio=%s",
            model,
            job.job_id,
            measured.tokens_per_s,
            measured.completion_ratio,
        )
        return measured

    def _jobs(self, model: str) -> list[dict[str, Any]]:
        try:
            doc = json.loads(self.path(model).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:  # a damaged file: estimates fall back, say so
            logger.warning("ignoring unreadable measurements %s: %s", self.path(model), exc)
            return []
        jobs = doc.get("jobs") if isinstance(doc, dict) else None
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _fields(job: JobMeasure) -> dict[str, Any]:
    return {name: getattr(job, name) for name in job.__slots__}


def job_report(
    job_id: str,
    config: Config,
    planned: dict[str, Any] | None,
    before: dict[str, Any],
    final: dict[str, Any],
    wall_s: float | None,
    workers: dict[str, int],
    cost: float,
    store: MeasurementStore | None,
    whole: bool | None = None,
) -> dict[str, Any]:
    """``job.json``'s ``estimate`` (as made before the job) and ``actual`` (this run's
    figures: the stats ``final`` minus those ``before`` it, for a resumed job), and each pool's
    figures recorded in ``store`` for the next estimate. The share of the output budget is
    recorded only when this run did the ``whole`` job (its budget was counted for all items;
    default: nothing was settled ``before``)."""
    if whole is None:
        whole = before.get("done", 0) + before.get("dead", 0) == 0

    def delta(st: dict[str, Any], was: dict[str, Any], key: str) -> float:
        return float(st.get(key, 0)) - float(was.get(key, 0))

    prompt = int(delta(final, before, "prompt_tokens"))
    completion = int(delta(final, before, "completion_tokens"))
    busy_s = delta(final, before, "busy_s")
    n_workers = sum(workers.values())
    actual: dict[str, Any] = {
        "items": int(delta(final, before, "done") + delta(final, before, "dead")),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "engine_s": busy_s,
        "workers": n_workers,
        "duration_s": wall_s,
        "cost": cost,
        "tokens_per_s_per_worker": (prompt + completion) / busy_s if busy_s > 0 else None,
    }
    if store is not None:
        models = planned.get("models") if planned else None
        for name, st in (final.get("pools") or {}).items():
            was = (before.get("pools") or {}).get(name, {})
            tokens = int(delta(st, was, "prompt_tokens") + delta(st, was, "completion_tokens"))
            one = _planned_pool(planned, models, config, name)
            try:
                store.record(
                    name,
                    JobMeasure(
                        job_id,
                        tokens=tokens,
                        busy_s=delta(st, was, "busy_s"),
                        completion_tokens=int(delta(st, was, "completion_tokens")),
                        max_output_tokens=one.get("max_output_tokens") if whole and one else None,
                        wall_s=wall_s,
                        workers=workers.get(name),
                    ),
                )
            except OSError as exc:  # the job is done; only the next estimate is poorer
                logger.warning("job=%s: cannot record measurements of %s: %s", job_id, name, exc)
    return {"estimate": planned, "actual": actual}


def _planned_pool(
    planned: dict[str, Any] | None,
    models: dict[str, Any] | None,
    config: Config,
    pool: str,
) -> dict[str, Any] | None:
    """The part of an estimate about one pool."""
    if planned is None:
        return None
    if models is None:
        return planned if planned.get("model") == pool else None
    for entry in models.values():
        if entry.get("model") == pool:
            return dict(entry)
    return None
