"""A pool of ``InferenceWorker`` actors of one engine config: start, watch, replace, drain."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from inference.config import Config
from inference.queue.actor import NAMESPACE
from inference.worker import InferenceWorker

logger = logging.getLogger(__name__)

STOP_GRACE_S = 30.0  # after stop(), how long a worker may take to hand back and exit


@dataclass
class _Member:
    worker_id: str
    handle: Any
    run_ref: Any
    placement_group: Any = None  # a multi-GPU worker's, removed when the worker ends


def placement_bundles(config: Config) -> list[dict[str, float]] | None:
    """The placement group of one worker of a multi-GPU engine (``engine.tensor_parallel_size
    x pipeline_parallel_size`` ranks on GPUs): a GPU bundle per rank, the first also holding
    the worker actor's CPUs. vLLM's Ray executor starts a rank actor in each bundle with a GPU
    (``num_cpus=0``); the worker itself sits in the first with no GPU of its own, as Ray Serve
    LLM places its replicas. None for a worker of one GPU (or less), or whose ranks run on
    CPUs (``scaling.gpus_per_worker`` 0)."""
    world = config.engine.world_size
    scaling = config.scaling
    if world <= 1 or scaling.gpus_per_worker <= 0:
        return None
    bundles = [{"GPU": 1.0} for _ in range(world)]
    if scaling.cpus_per_worker > 0:
        bundles[0]["CPU"] = scaling.cpus_per_worker
    return bundles


def free_placement(member: _Member) -> None:
    """Remove an ended worker's placement group (what is left in it ends with it)."""
    group, member.placement_group = member.placement_group, None
    if group is None:
        return
    try:
        remove_placement_group(group)
    except Exception as exc:  # the cluster is going away; Ray drops it with its owner
        logger.warning("could not remove placement group of %s: %s", member.worker_id, exc)


class WorkerPool:
    """Workers leasing from one pool of the WorkQueue. The caller owns the pool's size."""

    def __init__(
        self, config: Config, pool: str, queue: Any, runtime_env: dict[str, Any] | None = None
    ) -> None:
        """``runtime_env``: Ray's, for the workers' processes (environment variables, say)."""
        # Workers get the job's config without the API's secrets (the server's tokens).
        self.config = config.model_copy(update={"api": config.api.redacted()})
        self.pool = pool
        self.queue = queue
        self.members: dict[str, _Member] = {}
        self.lost = 0
        self.fatal_errors: list[str] = []
        self.runtime_env = runtime_env

    def start(self, count: int) -> None:
        for _ in range(count):
            self._start_one()

    def _start_one(self) -> None:
        worker_id = f"{self.pool}-{uuid.uuid4().hex[:8]}"
        scaling = self.config.scaling
        actor_cls = ray.remote(InferenceWorker)
        placement: dict[str, Any] = {"num_gpus": scaling.gpus_per_worker}
        group = None
        bundles = placement_bundles(self.config)
        if bundles is not None:
            # One group per worker, named after it; vLLM finds it from inside the worker and
            # puts its rank actors in the GPU bundles (capture_child_tasks: so does anything
            # else the worker starts).
            group = placement_group(bundles, strategy=scaling.placement_strategy, name=worker_id)
            placement = {
                "num_gpus": 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group,
                    placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True,
                ),
            }
        handle: Any = actor_cls.options(
            name=worker_id,
            namespace=NAMESPACE,
            num_cpus=scaling.cpus_per_worker,
            max_concurrency=4,
            max_restarts=0,
            **({"runtime_env": self.runtime_env} if self.runtime_env else {}),
            **placement,
        ).remote(worker_id, self.config, self.pool)
        self.members[worker_id] = _Member(worker_id, handle, handle.run.remote(), group)
        logger.info("worker started worker=%s", worker_id)

    def check(self, replace: bool = True) -> list[str]:
        """Reap workers whose run ended; release a lost worker's leases (an attempt is charged)
        and start a replacement. Returns the ids of the workers that ended."""
        refs = {m.run_ref: m for m in self.members.values()}
        if not refs:
            return []
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        ended = []
        for ref in ready:
            member = refs[ref]
            ended.append(member.worker_id)
            del self.members[member.worker_id]
            try:
                ray.get(ref)
                free_placement(member)
                continue  # drained on purpose
            except ray.exceptions.RayError as exc:
                self.lost += 1
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.fatal_errors.append(message)
                released = ray.get(self.queue.release_worker.remote(member.worker_id))
                logger.warning(
                    "worker lost worker=%s released=%d: %s", member.worker_id, released, message
                )
                ray.kill(member.handle)  # an engine-fatal worker is alive: free its slot now
                free_placement(member)
            if replace:
                self._start_one()
        return ended

    def drain(self, timeout_s: float | None = None, grace_s: float = STOP_GRACE_S) -> None:
        """Ask every worker to drain, and wait ``scaling.drain_timeout_s`` (or ``timeout_s``).
        A worker still busy then is stopped: what it holds goes back with no attempt charged
        (it was asked to go; not the items' fault), and after a grace it is killed. A worker
        whose run failed is a lost worker: its leases are released with an attempt charged."""
        wait_s = self.config.scaling.drain_timeout_s if timeout_s is None else timeout_s
        members = list(self.members.values())
        for m in members:
            m.handle.drain.remote()
        if members:
            ray.wait([m.run_ref for m in members], num_returns=len(members), timeout=wait_s)
        late = [m for m in members if not ray.wait([m.run_ref], timeout=0)[0]]
        for m in late:
            logger.warning("worker drain timed out worker=%s: handing back", m.worker_id)
            m.handle.stop.remote()
        if late:
            ray.wait([m.run_ref for m in late], num_returns=len(late), timeout=grace_s)
        for m in members:
            try:
                ray.get(m.run_ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                ray.kill(m.handle)  # first, so that it commits nothing after the release
                ray.get(self.queue.release_worker.remote(m.worker_id, "drained"))
            except Exception as exc:
                logger.warning("worker %s ended with %s", m.worker_id, type(exc).__name__)
                ray.get(self.queue.release_worker.remote(m.worker_id))
            ray.kill(m.handle)
            free_placement(m)
        self.members.clear()

    def infos(self) -> list[dict[str, Any]]:
        refs = [m.handle.info.remote() for m in self.members.values()]
        try:
            return list(ray.get(refs, timeout=5))
        except ray.exceptions.RayError:
            return []
