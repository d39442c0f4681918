"""LoRA adapters per request on vLLM's CPU build (``engine.lora``, ``configs/vllm-cpu-lora.yaml``):
the four tiny adapters of ``models/tiny-lora`` (``models/build_tiny_lora.py``) change the answers
of the bundled tiny Llama exactly as the adapter merged into its weights does in transformers,
mix in one batch with each other and with the base model (whose answers stay exactly the base
model's), an unknown ``body.model`` fails its own item alone, and a whole job runs through.

Greedy answers are compared with transformers on the same float32 weights: the base model's
answers, and each adapter's, where ``scaling * B @ A`` is added to the base weights (PEFT's
merge). The tiny model never emits EOS, so every answer is ``max_tokens`` long."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.config import BatchingConfig, EngineConfig, LoraConfig, load_config
from inference.engines import make_engine
from inference.engines.lora import Adapters
from inference.engines.vllm import VllmEngine
from inference.errors import ConfigError, PermanentError
from inference.schema import Request, Result
from inference.shards import read_results
from tests.conftest import REPO
from tests.engine_contract import chat
from tests.faults.harness import assert_exactly_once, run_in_thread

ADAPTERS = ["a", "b", "c", "d"]
PROMPTS = ["Once upon a time", "The capital of France is", "Hello! How are you today?"]
MAX_TOKENS = 12
BASE = ""  # body.model of a base-model item; "tiny-llama" is the same


def lora_config() -> Any:
    config = load_config(REPO / "configs/vllm-cpu-lora.yaml")
    return config.with_updates(
        engine={"options": {**config.engine.options, "kv_cache_memory_bytes": 256 << 20}}
    )


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "build_tiny_lora", REPO / "models/build_tiny_lora.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def expected() -> dict[tuple[str, str], str]:
    """(model, prompt) -> the greedy answer transformers gives (the adapter merged in)."""
    from transformers import AutoTokenizer

    build = _builder()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/tiny-llama")
    answers = {}
    for model in [BASE, *ADAPTERS]:
        merged = build.merged_model(REPO / "models/tiny-lora" / model if model else None)
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            [new] = build.greedy_ids(merged, ids, MAX_TOKENS)
            answers[(model, prompt)] = _text(tokenizer.decode(new, skip_special_tokens=True))
    return answers


def _text(answer: str) -> str:
    # vLLM's detokenizer holds back a last token that ends inside a UTF-8 character.
    return answer.rstrip("\ufffd")


def ask(model: str, prompt: str) -> Request:
    return chat(prompt, model=model, max_tokens=MAX_TOKENS, temperature=0)


def answers(engine: VllmEngine, requests: list[Request]) -> list[str]:
    results = engine.run([engine.prepare(r) for r in requests])
    assert all(isinstance(r, Result) for r in results), results
    return [_text(r.output_text or "") for r in results if isinstance(r, Result)]


# ---------------------------------------------------------------------------- a whole job
# First in this module: the job's worker starts its own vLLM engine, before the module's
# engine below exists (two engines on two cores would slow each other badly).


def test_a_job_mixing_adapters_base_items_and_an_unknown_name_ends_exactly_once(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, expected: dict[tuple[str, str], str]
) -> None:
    bodies = []
    for i in range(60):
        model = ["tiny-llama", *ADAPTERS, BASE][i % 6]
        prompt = PROMPTS[i % len(PROMPTS)]
        bodies.append((f"item-{i:03d}", model, prompt))
    bodies.append(("unknown", "no-such-adapter", PROMPTS[0]))
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for custom_id, model, prompt in bodies:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                **({"model": model} if model else {}),
            }
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    config = lora_config().with_updates(
        output={"path": str(tmp_path / "out"), "rows_per_shard": 200, "max_shard_age_s": 2},
        queue={"db_path": str(queue_db), "max_attempts": 3, "backoff_base_s": 0.1},
    )
    thread, box = run_in_thread(path, config, "vllm-lora")
    thread.join(600)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert (summary.done, summary.dead) == (60, 1)
    assert_exactly_once(Path(summary.output), queue_db, "vllm-lora", len(bodies))
    rows = {r["custom_id"]: r for r in read_results(summary.output).to_pylist()}
    for custom_id, model, prompt in bodies[:-1]:
        row = rows[custom_id]
        base = model in (BASE, "tiny-llama")
        assert row["model"] == ("tiny-llama" if base else model)
        assert _text(row["output_text"]) == expected[(BASE if base else model, prompt)]
    [error] = read_results(summary.output, errors=True).to_pylist()
    assert (error["custom_id"], error["error_kind"], error["error_code"]) == (
        "unknown",
        "permanent",
        "model_not_found",
    )
    assert "tiny-llama, a, b, c, d" in error["message"]


# ---------------------------------------------------------------------------- one engine


@pytest.fixture(scope="module")
def engine() -> Iterator[VllmEngine]:
    built = make_engine(lora_config().engine, BatchingConfig(max_batch_size=256))
    assert isinstance(built, VllmEngine)
    yield built
    built.close()


def test_the_engine_core_runs_the_grouped_cpu_lora_ops(engine: VllmEngine) -> None:
    assert engine.adapters.grouped and engine.adapters.base is None
    assert engine.engine.collective_rpc("install_grouped_lora_ops") == ["already installed"]


def test_an_adapter_answers_as_the_adapter_merged_into_the_base_weights(
    engine: VllmEngine, expected: dict[tuple[str, str], str]
) -> None:
    for model in ADAPTERS:
        got = answers(engine, [ask(model, p) for p in PROMPTS])
        assert got == [expected[(model, p)] for p in PROMPTS], model
        # ... and that is not the base model's answer.
        assert all(g != expected[(BASE, p)] for g, p in zip(got, PROMPTS, strict=True)), model


def test_base_items_batched_with_every_adapter_answer_exactly_as_a_base_only_run(
    engine: VllmEngine, expected: dict[tuple[str, str], str]
) -> None:
    base_only = answers(engine, [ask(BASE, p) for p in PROMPTS])
    assert base_only == [expected[(BASE, p)] for p in PROMPTS]
    # One batch: base items between items of all four adapters (max_loras 4), every prompt.
    mixed = [(m, p) for p in PROMPTS for m in [BASE, "a", "b", "tiny-llama", "c", "d"]]
    got = answers(engine, [ask(m, p) for m, p in mixed])
    for (model, prompt), answer in zip(mixed, got, strict=True):
        key = (BASE if model == "tiny-llama" else model, prompt)
        assert answer == expected[key], (model, prompt)


def test_an_unknown_model_name_fails_its_item_alone(
    engine: VllmEngine, expected: dict[tuple[str, str], str]
) -> None:
    requests = [ask("a", PROMPTS[0]), ask("nope", PROMPTS[0]), ask(BASE, PROMPTS[0])]
    prepared, refused = [], []
    for request in requests:  # as the worker does: prepare each item, refuse the bad one
        try:
            prepared.append(engine.prepare(request))
        except PermanentError as exc:
            refused.append(exc)
    [error] = refused
    assert error.code == "model_not_found"
    assert error.message == (
        "body.model 'nope' is not served by this engine; served: tiny-llama, a, b, c, d"
    )
    results = engine.run(prepared)
    texts = [_text(r.output_text or "") for r in results if isinstance(r, Result)]
    assert texts == [expected[("a", PROMPTS[0])], expected[(BASE, PROMPTS[0])]]


def test_base_items_run_with_a_zero_adapter_on_cpu_and_embeddings_with_none(
    tmp_path: Path,
) -> None:
    """vLLM's CPU LoRA ops read "no adapter" (-1) as the last adapter slot (see
    engines/lora.py): on CPU the base model's items carry an all-zero adapter instead."""
    from safetensors.torch import load_file

    adapters = Adapters(lora_config().engine, cpu=True, grouped=False)
    try:
        base = adapters.select(ask(BASE, "x"))
        assert base is adapters.select(ask("tiny-llama", "x")) is adapters.base
        assert base.lora_int_id == 5 and base.lora_name not in ("", "tiny-llama", *ADAPTERS)
        tensors = load_file(str(Path(base.lora_path) / "adapter_model.safetensors"))
        assert len(tensors) == 2 and all(not t.any() for t in tensors.values())
        assert adapters.vllm_options()["max_loras"] == 5  # 4 adapters in one step, and the base
        with pytest.raises(PermanentError, match="not served"):
            adapters.select(ask(base.lora_name, "x"))
        embedding = Request(task="embedding", model="a", prompt="x", max_tokens=0)
        with pytest.raises(PermanentError, match="not embeddings") as info:
            adapters.select(embedding)
        assert info.value.code == "unsupported"
        assert adapters.select(Request(task="embedding", prompt="x", max_tokens=0)) is None
        scratch = Path(base.lora_path)
    finally:
        adapters.close()
    assert not scratch.exists()


def test_a_missing_adapter_folder_fails_the_start_naming_the_adapter_and_folder() -> None:
    config = EngineConfig(
        kind="vllm",
        dtype="float32",
        lora=LoraConfig(adapters={"a": "tiny-lora/a", "gone": "/nowhere/adapter"}),
    )
    with pytest.raises(ConfigError, match=r"engine\.lora\.adapters\.gone: .*'/nowhere/adapter'"):
        make_engine(config, BatchingConfig())
