"""engine.lora's config, and the grouped CPU LoRA ops (inference/engines/cpu_lora.py) against a
token-by-token reference: no vLLM here (the ops are plain torch; vLLM runs them in
tests/integration/test_vllm_lora.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from inference.config import EngineConfig, parse_config
from inference.engines import cpu_lora
from inference.engines.lora import Adapters
from inference.errors import ConfigError
from inference.schema import Request


def vllm_engine(**lora: object) -> dict[str, object]:
    return {"engine": {"kind": "vllm", "model": "tiny-llama", "lora": lora}}


def test_lora_is_refused_on_the_transformers_engine() -> None:
    with pytest.raises(ConfigError, match=r"LoRA adapters are served by engine\.kind vllm"):
        parse_config({"engine": {"lora": {"adapters": {"a": "tiny-lora/a"}}}})


def test_an_adapter_named_as_the_base_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="'tiny-llama' is the base model's name"):
        parse_config(vllm_engine(adapters={"tiny-llama": "tiny-lora/a"}))
    folder = {"kind": "vllm", "model": "/models/llama-8b", "lora": {"adapters": {"llama-8b": "x"}}}
    with pytest.raises(ConfigError, match="'llama-8b' is the base model's name"):
        parse_config({"engine": folder})


def test_lora_fields_are_checked_with_their_paths() -> None:
    with pytest.raises(ConfigError, match=r"engine\.lora\.adapters: .*at least 1 item"):
        parse_config(vllm_engine(adapters={}))
    with pytest.raises(ConfigError, match=r"engine\.lora\.max_lora_rank"):
        parse_config(vllm_engine(adapters={"a": "x"}, max_lora_rank=4))
    with pytest.raises(ConfigError, match="adapter name 'a b'"):
        parse_config(vllm_engine(adapters={"a b": "x"}))
    with pytest.raises(ConfigError, match=r"engine\.lora\.max_loras"):
        parse_config(vllm_engine(adapters={"a": "x"}, max_loras=0))


def test_adapter_folders_are_not_needed_to_load_a_config() -> None:
    config = parse_config(vllm_engine(adapters={"a": "/not/on/this/machine"}))
    assert config.engine.model_names == ("tiny-llama", "a")


def test_without_lora_body_model_is_not_looked_at() -> None:
    adapters = Adapters(EngineConfig(kind="vllm"), cpu=True)
    request = Request(
        task="chat", model="anything-at-all", messages=({"role": "user", "content": "x"},)
    )
    assert adapters.select(request) is None
    assert adapters.vllm_options() == {}


# ---------------------------------------------------------------------------- grouped ops
SLOTS, RANK, FEATURES = 4, 8, 16


def reference_linear(y, x, a_stacked, b_stacked, slices, indices, scale):  # type: ignore[no-untyped-def]
    out = y.clone()
    for t in range(x.shape[0]):
        slot = int(indices[t])
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(a_stacked, b_stacked, slices, strict=True):
            out[t, offset : offset + size] += scale * (x[t] @ a[slot, 0].T) @ b[slot, 0].T
            offset += size
    return out


def wrapper(
    indices: torch.Tensor, layout: tuple[int | None, ...] = (1, 2, 3, 4)
) -> SimpleNamespace:
    w = SimpleNamespace(token_lora_indices=indices)
    w._inference_plan = cpu_lora._Plan(indices, layout)
    return w


@pytest.mark.parametrize("kind", ["mixed", "one adapter", "no adapter"])
def test_grouped_linear_matches_token_by_token_and_leaves_base_rows_exact(kind: str) -> None:
    torch.manual_seed(0)
    tokens = 37
    indices = {
        "mixed": torch.randint(-1, SLOTS, (tokens,)),
        "one adapter": torch.full((tokens,), 2),
        "no adapter": torch.full((tokens,), -1),
    }[kind]
    a = tuple(torch.randn(SLOTS, 1, RANK, FEATURES) for _ in range(2))
    b = tuple(torch.randn(SLOTS, 1, 5, RANK) for _ in range(2))
    x, y = torch.randn(tokens, FEATURES), torch.randn(tokens, 10)
    got = y.clone()
    cpu_lora._add_lora_linear(wrapper(indices), got, x, a, b, 0.5, (5, 5))
    assert torch.allclose(got, reference_linear(y, x, a, b, (5, 5), indices, 0.5), atol=1e-5)
    base = indices < 0
    assert torch.equal(got[base], y[base])  # not one bit added to the base model's rows
    if kind == "mixed":
        assert base.any() and not torch.equal(got[~base], y[~base])


def test_a_slice_no_adapter_adapts_is_skipped_until_the_slots_change() -> None:
    indices = torch.tensor([0, 1, -1, 1])
    a = (torch.randn(SLOTS, 1, RANK, FEATURES),)
    b = (torch.zeros(SLOTS, 1, 3, RANK),)  # e.g. k_proj, which q/v adapters leave alone
    x, y = torch.randn(4, FEATURES), torch.zeros(4, 3)
    w = wrapper(indices)
    cpu_lora._add_lora_linear(w, y, x, a, b, 1.0, (3,))
    assert not y.any()
    b[0][1] = 1.0  # an adapter moves into slot 1: vLLM updates the mapping with the new layout
    w._inference_plan = cpu_lora._Plan(indices, (1, 5, 3, 4))
    cpu_lora._add_lora_linear(w, y, x, a, b, 1.0, (3,))
    assert torch.allclose(y, reference_linear(torch.zeros(4, 3), x, a, b, (3,), indices, 1.0))


def test_grouped_bgmv_ops_match_token_by_token_and_skip_tokens_without_an_adapter() -> None:
    torch.manual_seed(1)
    tokens = 23
    indices = torch.randint(-1, SLOTS, (tokens,))
    x = torch.randn(tokens, FEATURES)
    a = torch.randn(SLOTS, 1, RANK, FEATURES)
    b = torch.randn(SLOTS, 1, 12, RANK)
    shrunk = torch.full((tokens, RANK), 7.0)
    cpu_lora.bgmv_shrink(x, a, shrunk, indices, 0.25)
    for t in range(tokens):
        slot = int(indices[t])
        want = 0.25 * x[t] @ a[slot, 0].T if slot >= 0 else torch.zeros(RANK)
        assert torch.allclose(shrunk[t], want, atol=1e-5)
    out = torch.randn(tokens, 20)
    before = out.clone()
    cpu_lora.bgmv_expand_slice(shrunk, b, out, indices, 4, 12, add_inputs=True)
    for t in range(tokens):
        slot = int(indices[t])
        delta = shrunk[t] @ b[slot, 0].T if slot >= 0 else torch.zeros(12)
        assert torch.allclose(out[t, 4:16], before[t, 4:16] + delta, atol=1e-5)
        assert torch.equal(out[t, :4], before[t, :4]) and torch.equal(out[t, 16:], before[t, 16:])
    replaced = torch.randn(tokens, 12)
    cpu_lora.bgmv_expand(shrunk, b, replaced, indices, add_inputs=False)
    assert torch.equal(replaced[indices < 0], torch.zeros(int((indices < 0).sum()), 12))
