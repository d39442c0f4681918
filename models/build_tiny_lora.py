"""Build tiny LoRA adapters for the bundled tiny Llama in ``models/tiny-lora/<name>/``.

Each folder is an ordinary PEFT LoRA adapter (``adapter_config.json`` and
``adapter_model.safetensors``, PEFT's tensor names) that vLLM loads with a ``LoRARequest``, written
by hand (peft is not needed). The weights are random but seeded, and large enough that greedy
answers with an adapter differ from the base model's; they exist only to test serving adapters
per request.

Everything is seeded, so running the script again writes the same bytes.

Usage::

    python models/build_tiny_lora.py [--out models/tiny-lora] [--names a b c d] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tiny-lora"
BASE = HERE / "tiny-llama"

NAMES = ["a", "b", "c", "d"]
SEED = 4321
RANK = 4
ALPHA = 8  # scaling alpha / r = 2
# (module, path under a layer, in features, out features) of the tiny Llama (hidden 128,
# intermediate 384); q/v/o of attention and the MLP's down projection.
TARGETS = [
    ("q_proj", "self_attn", 128, 128),
    ("v_proj", "self_attn", 128, 128),
    ("o_proj", "self_attn", 128, 128),
    ("down_proj", "mlp", 384, 128),
]
NUM_LAYERS = 2
B_STD = 0.5  # trained adapters start from B = 0; these are random so that they bite


def adapter_tensors(seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named float16 LoRA factors: ``lora_A`` (r, in) and ``lora_B`` (out, r)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(NUM_LAYERS):
        for module, parent, fan_in, fan_out in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a = torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5
            b = torch.randn(fan_out, RANK, generator=generator) * B_STD
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.float16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.float16).contiguous()
    return tensors


def adapter_config() -> dict[str, object]:
    return {
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": RANK,
        "target_modules": [module for module, *_ in TARGETS],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(out: Path, seed: int) -> None:
    out.mkdir(parents=True)
    save_file(adapter_tensors(seed), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(
        json.dumps(adapter_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def merged_model(adapter: Path | None) -> torch.nn.Module:
    """The base model with an adapter's ``scaling * B @ A`` added to its weights (PEFT's merge)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    if adapter is None:
        return model
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            params[target] += scaling * (b.float() @ a.float())
    return model


def greedy_ids(model: torch.nn.Module, ids: Any, max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of each row of a tokenizer's output (no padding)."""
    with torch.no_grad():
        generated = model.generate(  # type: ignore[operator]
            **ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
        )
    return [row[ids["input_ids"].shape[1] :].tolist() for row in generated]


def greedy(model: torch.nn.Module, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        outputs.extend(greedy_ids(model, ids, max_new_tokens))
    return outputs


def check(out: Path, names: list[str]) -> None:
    """Greedy answers of the base model and of each adapter (merged in transformers)."""
    prompts = ["The quick brown fox", "Once upon a time", "The capital of France is"]
    base = greedy(merged_model(None), prompts, 12)
    for name in names:
        answers = greedy(merged_model(out / name), prompts, 12)
        differ = sum(a != b for a, b in zip(answers, base, strict=True))
        print(f"adapter {name}: {differ}/{len(prompts)} greedy answers differ from the base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--names", nargs="+", default=NAMES, help="adapter names (one seed each)")
    parser.add_argument(
        "--check", action="store_true", help="compare greedy answers against the base model"
    )
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    for i, name in enumerate(args.names):
        write_adapter(out / name, SEED + i)
        size = sum(f.stat().st_size for f in (out / name).iterdir())
        print(f"wrote {out / name} ({size / 1e3:.1f} kB)")
    if args.check:
        check(out, args.names)


if __name__ == "__main__":
    main()
