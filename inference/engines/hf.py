"""The transformers engine: CPU or CUDA, the embedded default and the test engine.

Generation uses the model's chat template, left padding and ``generate``; items in one call are
grouped by sampling settings, each group generated as one batch. Per-item ``max_tokens`` and stop
strings are applied to each row. Embeddings use the model's own pooling (sentence-transformers'
``1_Pooling`` and ``Normalize`` modules when the folder has them, else mean pooling).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import torch

from inference.config import EngineConfig
from inference.engines.base import Prepared
from inference.errors import EngineFatalError, ItemError, PermanentError, TransientError
from inference.models import resolve_model
from inference.schema import Request, Result

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    """A Hugging Face model folder on one device."""

    def __init__(self, config: EngineConfig, max_batch_size: int = 64) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(config.threads)
        self.path = resolve_model(config.model)
        self.model_name = config.model
        self.max_batch_size = max_batch_size
        self.device = _device(config.device)
        dtype = _DTYPES.get(config.dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        hf_config = AutoConfig.from_pretrained(self.path)
        self.is_generator = any(a.endswith("ForCausalLM") for a in hf_config.architectures or [])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.is_generator:
            self.tasks = frozenset({"chat", "completion"})
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        else:
            self.tasks = frozenset({"embedding"})
            model = AutoModel.from_pretrained(self.path, dtype=dtype)
            self.pooling, self.normalize = _sentence_transformers_head(self.path)
        self.model: Any = cast(Any, model).to(self.device).eval()
        model_len = getattr(hf_config, "max_position_embeddings", None) or 2048
        if not self.is_generator:
            model_len = min(model_len, _max_seq_length(self.path) or model_len)
        self.context_len = min(config.max_model_len or model_len, model_len)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        logger.info(
            "transformers engine ready model=%s device=%s dtype=%s tasks=%s context=%d",
            self.path,
            self.device,
            dtype,
            sorted(self.tasks),
            self.context_len,
        )

    # ------------------------------------------------------------------ prepare
    def prepare(self, request: Request) -> Prepared:
        if request.task not in self.tasks:
            raise PermanentError(
                f"model {self.model_name} does not serve {request.task} requests",
                code="unsupported",
            )
        reason = _unsupported_reason(request)
        if reason is not None:
            raise PermanentError(reason, code="unsupported")
        if request.task == "chat":
            text = self.tokenizer.apply_chat_template(
                list(request.messages), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif request.task == "completion":
            ids = self.tokenizer(request.prompt)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if len(ids) + request.max_tokens > self.context_len:
            raise PermanentError(
                f"{len(ids)} prompt tokens + max_tokens {request.max_tokens} exceed the model's "
                f"context of {self.context_len} tokens",
                code="context_length_exceeded",
            )
        return Prepared(request=request, prompt_ids=list(ids))

    # ------------------------------------------------------------------ run
    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        if not batch:
            return []
        try:
            with torch.inference_mode():
                if self.is_generator:
                    return self._generate_all(batch)
                return list(self._embed(batch))
        except torch.OutOfMemoryError as exc:
            raise TransientError(f"out of memory: {exc}", code="out_of_memory") from exc
        except RuntimeError as exc:
            if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                raise EngineFatalError(f"device failure: {exc}") from exc
            raise

    def _generate_all(self, batch: list[Prepared]) -> list[Result | ItemError]:
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(batch):
            r = item.request
            greedy = r.temperature == 0.0
            groups[(greedy, r.temperature, r.top_p, r.seed)].append(i)
        out: list[Result | ItemError] = [PermanentError("not run")] * len(batch)
        for (greedy, temperature, top_p, seed), indices in groups.items():
            results = self._generate([batch[i] for i in indices], greedy, temperature, top_p, seed)
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        return out

    def _generate(
        self,
        items: list[Prepared],
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[Result]:
        width = max(it.prompt_tokens for it in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = it.prompt_tokens
            input_ids[row, width - n :] = torch.tensor(it.prompt_ids, dtype=torch.long)
            attention[row, width - n :] = 1
        max_new = max(it.request.max_tokens for it in items)
        kwargs: dict[str, Any] = {"do_sample": not greedy}
        if not greedy:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=max_new,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            **kwargs,
        )
        new_tokens = output[:, width:].tolist()
        return [self._finish(it, tokens) for it, tokens in zip(items, new_tokens, strict=True)]

    def _finish(self, item: Prepared, tokens: list[int]) -> Result:
        limit = item.request.max_tokens
        finish = "length"
        kept: list[int] = []
        for tok in tokens[:limit]:
            if tok in self.eos_ids:
                finish = "stop"
                break
            kept.append(tok)
        text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
        cut = min((text.find(s) for s in item.request.stop if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            kept = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Result(
            output_text=text,
            finish_reason=finish,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=len(kept),
        )

    def _embed(self, items: list[Prepared]) -> list[Result]:
        width = max(it.prompt_tokens for it in items)
        pad = self.pad_id
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = it.prompt_tokens
            input_ids[row, :n] = torch.tensor(it.prompt_ids, dtype=torch.long)
            attention[row, :n] = 1
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
        ).last_hidden_state.float()
        mask = attention.to(hidden.device).unsqueeze(-1).float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        vectors = pooled.cpu().tolist()
        return [
            Result(embedding=vec, finish_reason="stop", prompt_tokens=it.prompt_tokens)
            for it, vec in zip(items, vectors, strict=True)
        ]

    def close(self) -> None:
        del self.model


def _unsupported_reason(request: Request) -> str | None:
    """Why this engine cannot honour a request's sampling options (it refuses rather than
    ignores them), naming the field; None when it can."""
    needs = "needs engine.kind vllm (the transformers engine has"
    if request.n != 1:
        return f"body.n > 1 {needs} one choice per item)"
    if request.response_format is not None:
        where = "body.response_format (body.text.format on /v1/responses)"
        return f"{where} {needs} no structured outputs)"
    if request.logprobs:
        return f"body.logprobs {needs} no token logprobs)"
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) != 0.0:
            return f"body.{name} {needs} no {name.replace('_', ' ')})"
    return None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineFatalError("engine.device is cuda but no CUDA device is visible")
    return torch.device(name)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _max_seq_length(path: Path) -> int | None:
    """sentence-transformers' own input limit (often below the position embeddings)."""
    config = path / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None


def _sentence_transformers_head(path: Path) -> tuple[str, bool]:
    """Pooling mode and whether to L2-normalize, from a sentence-transformers folder."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((path / m.get("path", "1_Pooling") / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
    return pooling, normalize
