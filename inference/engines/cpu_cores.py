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
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_MODEL_WORKER = "VLLM::Worker"
_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def rank_cores(world_size: int, cores: list[int]) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``world_size`` CPU ranks on ``cores``: equal groups of
    cores, one per rank (``"0|1"``, ``"0,1|2,3"``), keeping one core for the frontend and the
    engine core when there are more cores than ranks. None when there are fewer cores than
    ranks."""
    cores = sorted(cores)
    if world_size < 1 or len(cores) < world_size:
        return None
    usable = cores[:-1] if len(cores) > world_size else cores
    per = len(usable) // world_size
    groups = [usable[i * per : (i + 1) * per] for i in range(world_size)]
    return "|".join(",".join(map(str, group)) for group in groups)


@contextmanager
def cpu_rank_binding(world_size: int) -> Iterator[None]:
    """While a vLLM CPU engine of several ranks (tensor x pipeline parallel) starts, give each
    rank cores of its own. vLLM's own ``auto`` binding puts one rank on each NUMA node and
    refuses a host with fewer nodes than ranks ("Not enough allowed NUMA nodes"), the usual
    case; this splits the cores this process may run on (:func:`rank_cores`). The ranks read it
    when they start; it is restored afterwards. Does nothing for one rank or when
    ``VLLM_CPU_OMP_THREADS_BIND`` is set already."""
    binding = None
    if world_size > 1 and _BIND not in os.environ and hasattr(os, "sched_getaffinity"):
        binding = rank_cores(world_size, list(os.sched_getaffinity(0)))
    if binding is None:
        yield
        return
    logger.info("vLLM CPU ranks bound to cores %s (%s)", binding, _BIND)
    os.environ[_BIND] = binding
    try:
        yield
    finally:
        os.environ.pop(_BIND, None)


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
