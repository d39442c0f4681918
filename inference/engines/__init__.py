"""Engines: one contract (:class:`~inference.engines.base.Engine`), several implementations.
``transformers`` runs anywhere; ``vllm`` (GPUs, or its CPU build) is imported only when a config
asks for it, and is fed continuously; ``openai`` sends each item to an OpenAI-compatible API and
``openai_batch`` sends them in files to a provider's Batch API."""

from __future__ import annotations

from inference.config import BatchingConfig, EngineConfig, LimitsConfig
from inference.engines.base import ContinuousEngine, Engine, Prepared, is_continuous

__all__ = ["ContinuousEngine", "Engine", "Prepared", "is_continuous", "make_engine"]


def make_engine(
    config: EngineConfig,
    batching: BatchingConfig,
    limits: LimitsConfig | None = None,
    client_id: str = "",
    pool: str = "",
) -> Engine:
    """The engine a config names. ``limits`` and ``client_id`` (the worker's id) are for the
    online remote engine, which shares the cluster's rate limiter; ``pool`` (the worker's) for
    the provider batch engine, which records its batches under it."""
    if config.kind == "openai":
        from inference.engines.remote import OpenAIEngine

        return OpenAIEngine(config, limits, client_id)
    if config.kind == "openai_batch":
        from inference.engines.remote_batch import OpenAIBatchEngine

        return OpenAIBatchEngine(config, pool)
    if config.kind == "vllm":
        from inference.engines.vllm import VllmEngine

        return VllmEngine(config, max_batch_size=batching.max_batch_size)
    from inference.engines.hf import TransformersEngine

    return TransformersEngine(config, max_batch_size=batching.max_batch_size)
