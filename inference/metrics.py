"""Metrics of jobs, the queue and the workers: Prometheus text for ``/metrics``, and the same
figures as ``ray.util.metrics`` gauges so they appear beside Ray's own in its Grafana.

Pure functions over what the queue, the Controller and the workers report (queue ``stats()``
per job, the Controller's progress per job, worker ``info()``); no global registry. Series::

    inference_leases                       items leased now
    inference_lease_expiries_total{job}    leases that expired (the item went back to pending)
    inference_dead_letters{job}            items in the dead-letter set (redrive lowers it)
    inference_pending_tokens{job}          input tokens waiting
    inference_oldest_pending_seconds{job}  age of the oldest pending item
    inference_job_progress_ratio{job}      settled / total (never 1 while finalizing)
    inference_job_items_per_second{job}    settled items per second (recent window)
    inference_job_tokens_per_second{job}   prompt + completion tokens per second
    inference_job_eta_seconds{job}         time to finish (absent while nothing moves)
    inference_tokens_total{job,kind}       prompt and completion tokens of completed items
    inference_gpu_seconds_total{job}       engine busy time (GPU-seconds on GPU workers)
    inference_cost{job}                    cost so far (``cost_per_gpu_hour`` x busy hours)
    inference_cost_to_finish{job}          projected cost of the items left
    inference_worker_batch_size{worker,pool}    items in the worker's last batch
    inference_worker_batch_tokens{worker,pool}  tokens in the worker's last batch
    inference_worker_batches_total / _items_total / _busy_seconds_total {worker,pool}
    inference_worker_state{worker,pool,state}   1 for the worker's current state
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.progress import TokenPrices, job_cost

logger = logging.getLogger(__name__)

Sample = tuple[dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]


def families(
    stats: Mapping[str, Mapping[str, Any]],
    progress: Mapping[str, Mapping[str, Any]],
    workers: Iterable[Mapping[str, Any]] = (),
    cost_per_gpu_hour: Mapping[str, float] | None = None,
    token_prices: Mapping[str, TokenPrices] | None = None,
) -> list[Family]:
    """The series above from queue stats by job, progress by job (the Controller's
    ``Progress.as_dict()``), worker ``info()`` dicts, the cost rate of each job and the token
    prices of its remote engines."""
    rates = cost_per_gpu_hour or {}
    prices = token_prices or {}
    per_job: dict[str, list[Sample]] = {
        name: []
        for name in (
            "lease_expiries",
            "dead",
            "pending_tokens",
            "oldest",
            "ratio",
            "items_s",
            "tokens_s",
            "eta",
            "tokens",
            "busy",
            "cost",
            "to_finish",
        )
    }
    leased = 0.0
    for job_id, st in stats.items():
        job = {"job": job_id}
        leased += float(st.get("leased", 0))
        per_job["lease_expiries"].append((job, float(st.get("lease_expiries", 0))))
        per_job["dead"].append((job, float(st.get("dead", 0))))
        per_job["pending_tokens"].append((job, float(st.get("pending_tokens", 0))))
        per_job["oldest"].append((job, float(st.get("oldest_pending_s") or 0.0)))
        for kind in ("prompt", "completion"):
            tokens = float(st.get(f"{kind}_tokens", 0))
            per_job["tokens"].append(({**job, "kind": kind}, tokens))
        per_job["busy"].append((job, float(st.get("busy_s", 0.0))))
        cost, to_finish = job_cost(st, rates.get(job_id, 0.0), prices.get(job_id))
        models = (progress.get(job_id) or {}).get("models")
        if models:  # several models: each at its own price
            cost = sum(m["cost"] for m in models.values())
            to_finish = sum(m["cost_to_finish"] or 0.0 for m in models.values())
        per_job["cost"].append((job, cost))
        if to_finish is not None:
            per_job["to_finish"].append((job, to_finish))
        p = progress.get(job_id)
        total = int(st.get("total", 0))
        settled = int(st.get("done", 0)) + int(st.get("dead", 0))
        ratio = float(p["fraction"]) if p else (settled / total if total else 1.0)
        per_job["ratio"].append((job, ratio))
        if p:
            per_job["items_s"].append((job, float(p.get("items_per_s") or 0.0)))
            per_job["tokens_s"].append((job, float(p.get("tokens_per_s") or 0.0)))
            if p.get("eta_s") is not None:
                per_job["eta"].append((job, float(p["eta_s"])))
    out: list[Family] = [
        ("inference_leases", "gauge", "Items leased to workers now.", [({}, leased)]),
        (
            "inference_lease_expiries_total",
            "counter",
            "Leases that expired (the item went back to pending, an attempt charged).",
            per_job["lease_expiries"],
        ),
        (
            "inference_dead_letters",
            "gauge",
            "Items in the dead-letter set.",
            per_job["dead"],
        ),
        (
            "inference_pending_tokens",
            "gauge",
            "Input tokens of pending items.",
            per_job["pending_tokens"],
        ),
        (
            "inference_oldest_pending_seconds",
            "gauge",
            "Age of the oldest pending item.",
            per_job["oldest"],
        ),
        (
            "inference_job_progress_ratio",
            "gauge",
            "Settled (completed or dead-lettered) items over all items; below 1 while finalizing.",
            per_job["ratio"],
        ),
        (
            "inference_job_items_per_second",
            "gauge",
            "Items settled per second over the recent window.",
            per_job["items_s"],
        ),
        (
            "inference_job_tokens_per_second",
            "gauge",
            "Prompt and completion tokens per second over the recent window.",
            per_job["tokens_s"],
        ),
        (
            "inference_job_eta_seconds",
            "gauge",
            "Seconds to finish, from the tokens left (absent while nothing moves).",
            per_job["eta"],
        ),
        (
            "inference_tokens_total",
            "counter",
            "Tokens of completed items by kind (prompt, completion).",
            per_job["tokens"],
        ),
        (
            "inference_gpu_seconds_total",
            "counter",
            "Engine busy time spent on the job's items (GPU-seconds on GPU workers).",
            per_job["busy"],
        ),
        (
            "inference_cost",
            "gauge",
            "Cost so far: busy hours times cost_per_gpu_hour.",
            per_job["cost"],
        ),
        (
            "inference_cost_to_finish",
            "gauge",
            "Projected cost of the items left, at the busy time per item so far.",
            per_job["to_finish"],
        ),
    ]
    return out + _worker_families(list(workers))


def _worker_families(workers: list[Mapping[str, Any]]) -> list[Family]:
    def samples(key: str) -> list[Sample]:
        return [
            ({"worker": str(w["worker"]), "pool": str(w.get("pool", ""))}, float(w.get(key) or 0))
            for w in workers
        ]

    states = [
        (
            {"worker": str(w["worker"]), "pool": str(w.get("pool", "")), "state": str(w["state"])},
            1.0,
        )
        for w in workers
        if w.get("state")
    ]
    return [
        (
            "inference_worker_batch_size",
            "gauge",
            "Items in the last batch.",
            samples("last_batch_size"),
        ),
        (
            "inference_worker_batch_tokens",
            "gauge",
            "Tokens in the last batch.",
            samples("last_batch_tokens"),
        ),
        ("inference_worker_batches_total", "counter", "Batches run.", samples("batches")),
        ("inference_worker_items_total", "counter", "Items run.", samples("items")),
        (
            "inference_worker_busy_seconds_total",
            "counter",
            "Time the worker's engine was busy.",
            samples("busy_s"),
        ),
        ("inference_worker_state", "gauge", "1 for the worker's current state.", states),
    ]


class _Families(Collector):
    def __init__(self, fams: list[Family]) -> None:
        self.fams = fams

    def collect(self) -> Iterable[Metric]:
        for name, kind, help_text, samples in self.fams:
            labels = sorted({k for lab, _ in samples for k in lab})
            metric: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                metric = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
            else:
                metric = GaugeMetricFamily(name, help_text, labels=labels)
            for lab, value in samples:
                metric.add_metric([lab.get(k, "") for k in labels], value)
            yield metric


def render(fams: list[Family]) -> str:
    """Prometheus text format (0.0.4) of the families, through ``prometheus_client``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(fams))
    return generate_latest(registry).decode()


# ---------------------------------------------------------------------- Ray's metrics
_ray_gauges: dict[str, Any] = {}
_ray_priorities: set[str] = set()  # seen before: set to 0 once their pending items are gone
_RAY_SERIES = {  # name: (description, tag keys)
    "inference_queue_items": ("Items by job and state.", ("job", "state")),
    "inference_queue_pending_by_priority": ("Pending items by priority.", ("priority",)),
    "inference_lease_expiries": ("Leases that expired, by job.", ("job",)),
    "inference_job_progress_ratio": ("Settled over all items.", ("job",)),
    "inference_job_items_per_second": ("Items settled per second.", ("job",)),
    "inference_job_tokens_per_second": ("Tokens per second.", ("job",)),
    "inference_job_eta_seconds": ("Seconds to finish.", ("job",)),
    "inference_gpu_seconds": ("Engine busy time, by job.", ("job",)),
    "inference_cost": ("Cost so far, by job.", ("job",)),
    "inference_cost_to_finish": ("Projected cost of the items left.", ("job",)),
}


def record_ray(
    stats: Mapping[str, Mapping[str, Any]],
    progress: Mapping[str, Mapping[str, Any]],
    jobs: Mapping[str, Mapping[str, Any]],
) -> None:
    """Set the ``ray.util.metrics`` gauges from one Controller tick (queue stats by job, the
    Controller's progress by job, its job records for ``cost_per_gpu_hour``). Ray exports them
    with its ``ray_`` prefix. Never raises: metrics must not stop the loop."""
    try:
        _record_ray(stats, progress, jobs)
    except Exception:
        logger.warning("could not record Ray metrics", exc_info=True)


def _record_ray(
    stats: Mapping[str, Mapping[str, Any]],
    progress: Mapping[str, Mapping[str, Any]],
    jobs: Mapping[str, Mapping[str, Any]],
) -> None:
    from ray.util.metrics import Gauge

    if not _ray_gauges:
        for name, (description, keys) in _RAY_SERIES.items():
            _ray_gauges[name] = Gauge(name, description=description, tag_keys=keys)
    g = _ray_gauges
    by_priority: dict[str, float] = {}
    for job_id, st in stats.items():
        tags = {"job": job_id}
        for state in ("pending", "leased", "done", "dead"):
            g["inference_queue_items"].set(float(st.get(state, 0)), {"job": job_id, "state": state})
        for priority, n in (st.get("pending_by_priority") or {}).items():
            by_priority[str(priority)] = by_priority.get(str(priority), 0.0) + float(n)
        g["inference_lease_expiries"].set(float(st.get("lease_expiries", 0)), tags)
        g["inference_gpu_seconds"].set(float(st.get("busy_s", 0.0)), tags)
        rec = jobs.get(job_id) or {}
        rate = float(((rec.get("config") or {}).get("scaling") or {}).get("cost_per_gpu_hour", 0))
        cost, to_finish = job_cost(st, rate)
        p = progress.get(job_id)
        if p:  # the Controller's tracker knows each model's price and its token prices
            cost, to_finish = float(p["cost"]), p.get("cost_to_finish")
        g["inference_cost"].set(cost, tags)
        if to_finish is not None:
            g["inference_cost_to_finish"].set(to_finish, tags)
        p = progress.get(job_id)
        if p:
            g["inference_job_progress_ratio"].set(float(p["fraction"]), tags)
            g["inference_job_items_per_second"].set(float(p.get("items_per_s") or 0.0), tags)
            g["inference_job_tokens_per_second"].set(float(p.get("tokens_per_s") or 0.0), tags)
            if p.get("eta_s") is not None:
                g["inference_job_eta_seconds"].set(float(p["eta_s"]), tags)
    _ray_priorities.update(by_priority)
    for priority in _ray_priorities:
        g["inference_queue_pending_by_priority"].set(
            by_priority.get(priority, 0.0), {"priority": priority}
        )
