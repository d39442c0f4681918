"""Build the tiny random Llama test model in ``models/tiny-llama/``.

The folder is an ordinary Hugging Face model folder (config, safetensors weights, fast
tokenizer with a chat template, generation config) that ``AutoTokenizer`` and
``AutoModelForCausalLM`` load offline and that vLLM can serve. The weights are random: the
model only exists to exercise the inference service quickly and deterministically.

Everything is seeded, so running the script again writes the same bytes (for the same
versions of ``tokenizers``, ``transformers`` and ``torch``).

Usage::

    python models/build_tiny_llama.py [--out models/tiny-llama] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

# Set before tokenizers is imported: train single-threaded, stay quiet, never go online.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tiny-llama"
CORPUS = HERE / "tiny_llama_corpus.txt"

SEED = 1234
VOCAB_SIZE = 2048
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]

# Each turn is "<|role|>\n{content}</s>\n"; the prompt starts with "<s>". String contents and
# OpenAI-style lists of {"type": "text", "text": ...} parts are both accepted.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# head_dim 64 keeps every attention backend (including vLLM's GPU kernels) happy.
HIDDEN_SIZE = 128
NUM_HEADS = 2
NUM_KV_HEADS = 2
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 384
INITIALIZER_RANGE = 0.2

CHECK_PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "Hello! How are you today?",
    "Write a short poem about the sea.",
    "The capital of France is",
    "Step 3: put the lamp next to the",
    "Nobody fully agrees on what makes",
    "In the morning, Ada found a",
    "Numbers matter too: 1, 2, 3",
    "Please summarize the following paragraph.",
]


def train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE tokenizer on the committed corpus."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    # Like Llama: encoding with special tokens prepends <s>; the chat template writes its own.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap the raw tokenizer for transformers, with special tokens and chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create the randomly initialised model with a fixed seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=2048,
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model


def make_portable(out: Path) -> None:
    """Rewrite the saved JSON so that transformers 4.x (e.g. inside vLLM) loads it too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list-valued
    ``extra_special_tokens``, which 4.x cannot read; the classic spelling works in both.
    The config gets the 4.x names ``rope_theta`` and ``torch_dtype`` next to the 5.x ones.
    """
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text(encoding="utf-8"))
    tok_config.pop("backend", None)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tok_config.pop("extra_special_tokens", ROLE_TOKENS)
    tok_config["additional_special_tokens"] = extra
    write_json(tok_path, tok_config)

    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    write_json(config_path, config)


def write_json(path: Path, data: dict[str, object]) -> None:
    """Write JSON the way transformers does: sorted keys, indent 2, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def folder_size(path: Path) -> int:
    """Total size in bytes of the files in a folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_outputs(out: Path, max_new_tokens: int = 40) -> float:
    """Greedy-generate from a few prompts; print them and return the distinct-token ratio."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    outputs: list[list[int]] = []
    for prompt in CHECK_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(
                **ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
            )
        new = generated[0, ids["input_ids"].shape[1] :].tolist()
        outputs.append(new)
        print(f"{prompt!r} -> {tokenizer.decode(new)!r}")
    ratios = [len(set(o)) / len(o) for o in outputs]
    mean_ratio = sum(ratios) / len(ratios)
    distinct_outputs = len({tuple(o) for o in outputs})
    print(f"distinct outputs: {distinct_outputs}/{len(outputs)}")
    print(f"mean distinct-token ratio: {mean_ratio:.2f} (min {min(ratios):.2f})")
    return mean_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--check", action="store_true", help="reload the folder and greedy-generate samples"
    )
    args = parser.parse_args()
    out: Path = args.out

    tokenizer = wrap_tokenizer(train_tokenizer())
    model = build_model(tokenizer)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    make_portable(out)

    params = sum(p.numel() for p in model.parameters())
    print(f"vocab size: {len(tokenizer)}")
    print(f"parameters: {params:,}")
    print(f"wrote {out} ({folder_size(out) / 1e6:.2f} MB)")
    print(json.dumps(sorted(f.name for f in out.iterdir())))
    if args.check:
        check_outputs(out)


if __name__ == "__main__":
    main()
