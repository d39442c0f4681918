"""LoRA adapters per request for the vLLM engine (``engine.lora``).

An item's ``body.model`` picks what it runs on: ``""`` or the base model's name (``engine.model``
or its folder's name) runs on the base model, an adapter's name runs with that adapter
(``vllm.lora.request.LoRARequest``). Any other name is a permanent error for that item alone,
naming what is served. Without ``engine.lora`` ``body.model`` is not looked at.

Adapter folders are checked when the engine starts (configs are loaded on machines that may not
have them): a missing folder, a folder without ``adapter_config.json`` or an adapter whose rank is
over ``max_lora_rank`` fails the start with a :class:`~inference.errors.ConfigError` naming the
adapter and its folder, before vLLM is built.

Every adapter is loaded into the engine when it starts, so one vLLM cannot load fails the start
(naming it) rather than the engine core on its first request.

On vLLM's CPU backend, whose LoRA ops give base-model rows batched with adapter rows the wrong
answer and are slow (``inference/engines/cpu_lora.py``), the engine core gets grouped ops
instead. Where those cannot be installed (another vLLM's internals, or ``engine.options`` sets
its own ``worker_extension_cls``), the base model's items run with a *zero adapter* (one LoRA
module of the first adapter's shape, all zeros) instead of none: a zero delta is exactly the base
model's output, and it takes one of vLLM's ``max_loras`` slots, so one is added for it. GPUs
(Triton kernels) need neither.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from inference.config import EngineConfig
from inference.engines import cpu_lora
from inference.errors import ConfigError, PermanentError
from inference.models import models_dir
from inference.schema import Request

logger = logging.getLogger(__name__)


class Adapters:
    """The adapters one engine serves, and which one each request asks for."""

    def __init__(
        self, config: EngineConfig, cpu: bool = False, grouped: bool | None = None
    ) -> None:
        """``cpu``: vLLM runs on its CPU backend; ``grouped``: install cpu_lora's ops there
        (default: where this vLLM allows it)."""
        self.config = config.lora
        self.base_names = frozenset(("", *config.base_names))
        self.served = config.model_names
        self.requests: dict[str, Any] = {}  # name -> LoRARequest, the zero adapter's too
        self.base: Any = None  # the zero adapter the base model's items run with, if any
        self._scratch: Path | None = None
        self._targets: list[list[str] | None] = []  # each adapter's target_modules
        self.grouped = False
        if self.config is None:
            return
        if cpu and grouped is None:
            grouped = "worker_extension_cls" not in config.options and not cpu_lora.missing()
        self.grouped = bool(cpu and grouped)
        zero_base = cpu and not self.grouped
        from vllm.lora.request import LoRARequest

        # Ids 1..N in name order: the same adapter has the same id in every worker of a config.
        for lora_id, name in enumerate(sorted(self.config.adapters), start=1):
            folder, targets = _adapter_folder(
                name, self.config.adapters[name], self.config.max_lora_rank
            )
            self.requests[name] = LoRARequest(name, lora_id, str(folder))
            self._targets.append(targets)
        if zero_base:
            first = self.requests[min(self.requests)]
            self._scratch = Path(tempfile.mkdtemp(prefix="zero-lora-"))
            _write_zero_adapter(Path(first.lora_path), self._scratch)
            name = f"<{config.model} base>"  # no adapter can be named so ("<" is refused)
            self.base = LoRARequest(name, len(self.requests) + 1, str(self._scratch))
            self.requests[name] = self.base

    def vllm_options(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` that serve these adapters (none without lora)."""
        if self.config is None:
            return {}
        max_loras = self.config.max_loras + (self.base is not None)
        options: dict[str, Any] = {
            "enable_lora": True,
            "max_loras": max_loras,
            "max_lora_rank": self.config.max_lora_rank,
            # Every adapter stays loaded in host memory; max_loras of them run in one step.
            "max_cpu_loras": max(max_loras, len(self.requests)),
        }
        if self._targets and all(t is not None for t in self._targets):
            # Only the layers some adapter adapts get LoRA ops (vLLM wraps every layer it can
            # otherwise, the embeddings and the logits included).
            options["lora_target_modules"] = sorted({m for t in self._targets for m in t or ()})
        if self.grouped:
            options["worker_extension_cls"] = cpu_lora.EXTENSION
        return options

    def load(self, engine: Any) -> None:
        """Install the grouped CPU ops (if so) and load every adapter into a started vLLM
        ``LLMEngine``; ConfigError naming the adapter vLLM cannot load."""
        if self.grouped:
            done = engine.collective_rpc("install_grouped_lora_ops")
            logger.info("grouped CPU LoRA ops in the engine core: %s", done)
        for name, adapter in self.requests.items():
            try:
                engine.add_lora(adapter)
            except Exception as exc:
                raise ConfigError(
                    f"engine.lora.adapters.{name}: vLLM cannot load the adapter in "
                    f"{adapter.lora_path}: {type(exc).__name__}: {exc}"
                ) from exc

    def select(self, request: Request) -> Any:
        """The ``LoRARequest`` of the adapter ``request.model`` names; for the base model None
        (or the zero adapter).

        Raises PermanentError for a name that is neither (only when adapters are configured)."""
        if self.config is None:
            return None
        if request.model in self.base_names:
            return self.base if request.task != "embedding" else None
        adapter = self.requests.get(request.model)
        if adapter is None or adapter is self.base:
            raise PermanentError(
                f"body.model {request.model!r} is not served by this engine; served: "
                f"{', '.join(self.served)}",
                code="model_not_found",
            )
        if request.task == "embedding":
            raise PermanentError(
                f"body.model {request.model!r} is a LoRA adapter; adapters serve chat and "
                "completion requests, not embeddings",
                code="unsupported",
            )
        return adapter

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _write_zero_adapter(like: Path, out: Path) -> None:
    """A LoRA adapter whose delta is zero: the first module of ``like``, its factors zeroed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = like / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    else:
        loaded = torch.load(like / "adapter_model.bin", map_location="cpu", weights_only=True)
        shapes = {name: list(t.shape) for name, t in loaded.items()}
    a_name = min(n for n in shapes if ".lora_A." in n)
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    zeros = {n: torch.zeros(shapes[n], dtype=torch.float32) for n in (a_name, b_name)}
    save_file(zeros, str(out / "adapter_model.safetensors"))
    shutil.copy(like / "adapter_config.json", out / "adapter_config.json")


def _adapter_folder(name: str, folder: str, max_rank: int) -> tuple[Path, list[str] | None]:
    """The adapter's folder, checked (it exists, holds a PEFT config, and fits max_lora_rank),
    and its target modules (None where PEFT's config names them by a pattern)."""
    where = f"engine.lora.adapters.{name}"
    path = Path(folder).expanduser()
    if not path.is_absolute() and not path.exists() and (models_dir() / path).exists():
        path = models_dir() / path
    if not path.is_dir():
        raise ConfigError(f"{where}: adapter folder {folder!r} does not exist on this machine")
    config_file = path / "adapter_config.json"
    try:
        peft = json.loads(config_file.read_text())
    except OSError:
        raise ConfigError(
            f"{where}: {path} has no adapter_config.json (not a PEFT LoRA adapter)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {config_file} is not valid JSON: {exc}") from None
    rank = peft.get("r") if isinstance(peft, dict) else None
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{where}: {config_file} has no LoRA rank r")
    if rank > max_rank:
        raise ConfigError(
            f"{where}: the adapter's rank {rank} is over engine.lora.max_lora_rank {max_rank}"
        )
    targets = peft.get("target_modules")
    names = (
        targets if isinstance(targets, list) and all(isinstance(t, str) for t in targets) else None
    )
    return path.resolve(), names
