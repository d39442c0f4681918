"""Joining a Ray cluster: the one named by ``RAY_ADDRESS``, or an embedded local one."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from inference.queue.actor import NAMESPACE

logger = logging.getLogger(__name__)


def connect(num_cpus: int | None = None, temp_dir: str | None = None) -> bool:
    """Connect this process to Ray; returns True when it started an embedded cluster."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return False
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "namespace": NAMESPACE,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    temp_dir = temp_dir or os.environ.get("INFERENCE_RAY_TEMP_DIR")
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    logger.info("started an embedded Ray cluster with %s CPUs", kwargs["num_cpus"])
    return True


def cluster_slots(cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers of this shape the cluster holds right now."""
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        return int(resources.get("GPU", 0) // gpus_per_worker)
    if cpus_per_worker <= 0:
        return 1
    return max(1, int(resources.get("CPU", 1) // cpus_per_worker))
