"""The vLLM engine (GPU). Imported only when ``engine.kind: vllm``; needs the ``vllm`` extra.

One ``run`` call hands vLLM the whole batch at once (prompt token ids plus one SamplingParams per
item), so vLLM's own continuous batching and paged attention keep the GPU full; the worker's
batches for vLLM should therefore be large (``max_batch_size`` in the hundreds). Errors are
translated at this boundary: an engine-dead error is fatal to the worker, never to the items.
"""

from __future__ import annotations

import logging
from typing import Any

from inference.config import EngineConfig
from inference.engines.base import Prepared
from inference.errors import EngineFatalError, ItemError, PermanentError, TransientError
from inference.models import resolve_model
from inference.schema import Request, Result

logger = logging.getLogger(__name__)


class VllmEngine:
    def __init__(self, config: EngineConfig, max_batch_size: int = 256) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise EngineFatalError(
                "engine.kind is vllm but vLLM is not installed: pip install -e '.[vllm]'"
            ) from exc
        self._vllm = vllm
        self.path = resolve_model(config.model)
        self.model_name = config.model
        self.max_batch_size = max_batch_size
        options: dict[str, Any] = {"dtype": "auto", "enable_prefix_caching": True}
        if config.max_model_len:
            options["max_model_len"] = config.max_model_len
        options.update(config.options)
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(self.path).architectures or []
        self.is_generator = any(a.endswith("ForCausalLM") for a in architectures)
        if not self.is_generator:
            options.setdefault("runner", "pooling")
        try:
            self.llm = vllm.LLM(model=str(self.path), **options)
        except Exception as exc:  # vLLM raises many types at start-up
            raise EngineFatalError(f"vLLM could not start: {exc}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.context_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.tasks = frozenset({"chat", "completion"} if self.is_generator else {"embedding"})

    def prepare(self, request: Request) -> Prepared:
        if request.task not in self.tasks:
            raise PermanentError(
                f"model {self.model_name} does not serve {request.task} requests",
                code="unsupported",
            )
        if request.task == "chat":
            text = self.tokenizer.apply_chat_template(
                list(request.messages), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if len(ids) + request.max_tokens > self.context_len:
            raise PermanentError(
                f"{len(ids)} prompt tokens + max_tokens {request.max_tokens} exceed the model's "
                f"context of {self.context_len} tokens",
                code="context_length_exceeded",
            )
        return Prepared(request=request, prompt_ids=list(ids))

    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        if not batch:
            return []
        prompts = [{"prompt_token_ids": it.prompt_ids} for it in batch]
        try:
            if not self.is_generator:
                outputs = self.llm.embed(prompts, use_tqdm=False)
                return [
                    Result(embedding=list(o.outputs.embedding), prompt_tokens=it.prompt_tokens)
                    for it, o in zip(batch, outputs, strict=True)
                ]
            params = [self._sampling(it.request) for it in batch]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:
            raise _translate(exc) from exc
        results: list[Result | ItemError] = []
        for it, out in zip(batch, outputs, strict=True):
            choice = out.outputs[0]
            results.append(
                Result(
                    output_text=choice.text,
                    finish_reason="stop" if choice.finish_reason == "stop" else "length",
                    prompt_tokens=it.prompt_tokens,
                    completion_tokens=sum(len(c.token_ids) for c in out.outputs),
                )
            )
        return results

    def _sampling(self, r: Request) -> Any:
        return self._vllm.SamplingParams(
            n=r.n,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop=list(r.stop) or None,
            seed=r.seed,
        )

    def close(self) -> None:
        del self.llm


def _translate(exc: Exception) -> Exception:
    name = type(exc).__name__
    text = str(exc)
    if "EngineDead" in name or "EngineDeadError" in text:
        return EngineFatalError(f"vLLM engine died: {text}")
    if "out of memory" in text.lower():
        return TransientError(f"out of memory: {text}", code="out_of_memory")
    if isinstance(exc, ValueError):
        return PermanentError(text, code="invalid_request")
    return exc
