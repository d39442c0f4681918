"""Engines: one contract (:class:`~inference.engines.base.Engine`), two implementations.
``transformers`` runs anywhere; ``vllm`` (GPUs, or its CPU build) is imported only when a config
asks for it, and is fed continuously."""

from __future__ import annotations

from inference.config import BatchingConfig, EngineConfig
from inference.engines.base import ContinuousEngine, Engine, Prepared, is_continuous

__all__ = ["ContinuousEngine", "Engine", "Prepared", "is_continuous", "make_engine"]


def make_engine(config: EngineConfig, batching: BatchingConfig) -> Engine:
    if config.kind == "vllm":
        from inference.engines.vllm import VllmEngine

        return VllmEngine(config, max_batch_size=batching.max_batch_size)
    from inference.engines.hf import TransformersEngine

    return TransformersEngine(config, max_batch_size=batching.max_batch_size)
