"""Keeping a vLLM CPU engine's cores to itself.

vLLM's CPU build binds each model worker's OpenMP threads to cores (``VLLM::Worker``, one
thread per core, spinning between kernels) and leaves the rest (``reserved_cpus``) to everything
else. The operating system does not know that: the worker's frontend (this process: leasing,
tokenizing, vLLM's output processing), the scheduler process ``VLLM::EngineCore`` and their
threads run wherever a core looks free, often on an OpenMP core, and every time they do the
whole forward pass waits for the preempted thread. Measured on the 2-core development VM with a
long-tailed workload: 0.78 of vLLM's offline rate unpinned, 0.97-1.0 with this process and the
engine core kept on the reserved core.

:func:`keep_off_engine_cores` moves this process (every thread; threads started later inherit
it) and the engine core processes off the model workers' cores. It does nothing when the model
workers are not pinned (GPUs) or would leave no core for the rest.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_MODEL_WORKER = "VLLM::Worker"


def _pin_threads(pid: int, cores: set[int]) -> None:
    """sched_setaffinity on every thread of ``pid`` (on Linux it acts on one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            continue


def keep_off_engine_cores(core_pids: list[int]) -> set[int] | None:
    """Pin this process and ``core_pids`` (the engine core processes) to the cores that vLLM's
    model workers (children named ``VLLM::Worker``) are not bound to. Returns those cores, or
    None when nothing was changed."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    import psutil

    everything = set(os.sched_getaffinity(0))
    engine_cores: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith(_MODEL_WORKER):
                engine_cores |= set(child.cpu_affinity())
        except psutil.Error:
            continue
    rest = everything - engine_cores
    if not engine_cores or engine_cores == everything or not rest:
        return None
    for pid in [os.getpid(), *core_pids]:
        try:
            _pin_threads(pid, rest)
        except OSError as exc:
            logger.warning("could not pin pid %d off the engine's cores: %s", pid, exc)
    logger.info(
        "vLLM model workers hold cores %s; frontend and engine core pinned to %s",
        sorted(engine_cores),
        sorted(rest),
    )
    return rest
