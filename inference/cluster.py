"""Joining a Ray cluster: the one named by ``RAY_ADDRESS``, or an embedded local one, which
listens on loopback only (nothing of it is reachable from another machine)."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from inference.queue.actor import NAMESPACE

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def listen_on_loopback() -> None:
    """Make the embedded cluster a loopback one: its node address 127.0.0.1, and every server of
    it (GCS, raylet, object manager, workers' gRPC, agents, metrics) listening there only.

    On Linux, Ray turns a node address of 127.0.0.1 into the host's reachable address unless
    it runs single-node (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import by the
    processes it starts and here from its constant), and then binds its servers to loopback.
    vLLM's Ray executor places its driver by ``VLLM_HOST_IP``, so that says loopback too."""
    os.environ[_SINGLE_NODE_ENV] = "0"
    os.environ.setdefault("VLLM_HOST_IP", LOOPBACK)
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


def connect(num_cpus: int | None = None, temp_dir: str | None = None) -> bool:
    """Connect this process to Ray; returns True when it started an embedded cluster."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return False
    listen_on_loopback()
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "namespace": NAMESPACE,
        "_node_ip_address": LOOPBACK,
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
