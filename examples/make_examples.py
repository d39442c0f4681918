"""Generate example OpenAI Batch API input files (JSONL) for the inference service.

Text comes from the committed tokenizer corpus ``models/tiny_llama_corpus.txt``; every item
is drawn from its own seeded random generator, so the output is the same bytes on every run
and the first N items of a longer file equal an N-item file.

Usage::

    python examples/make_examples.py                   # rewrite chat.jsonl and embeddings.jsonl
    python examples/make_examples.py --kind chat --count 10000 --out /tmp/chat-10k.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "models" / "tiny_llama_corpus.txt"
SEED = 7

CHAT_MODEL = "tiny-llama"
EMBEDDING_MODEL = "all-minilm-l6-v2"
DEFAULT_COUNTS = {"chat": 2000, "embeddings": 500}
DEFAULT_FILES = {"chat": HERE / "chat.jsonl", "embeddings": HERE / "embeddings.jsonl"}
ID_PREFIXES = {"chat": "chat", "embeddings": "emb"}

# Chat prompt length in words: log-normal with median ~30, clipped to [3, 400].
PROMPT_WORDS_MEDIAN = 30
PROMPT_WORDS_SIGMA = 1.1
PROMPT_WORDS_MAX = 400
# Embedding input length in words: median ~20 (a sentence or two), up to a paragraph.
EMBED_WORDS_MEDIAN = 20
EMBED_WORDS_SIGMA = 0.8
EMBED_WORDS_MAX = 160

MAX_TOKENS_CHOICES = [8, 16, 24, 32, 48, 64, 96, 128]
MAX_TOKENS_WEIGHTS = [10, 20, 15, 20, 12, 12, 6, 5]
SYSTEM_PROBABILITY = 0.2
MULTI_TURN_PROBABILITY = 0.05

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly tutor who explains things simply.",
    "You are an editor. Keep the author's voice.",
    "Reply in plain English without lists.",
]
SHORT_PROMPTS = [
    "Tell me about {word}.",
    "Write a haiku about {word}.",
    "Define {word}.",
    "Give me a fun fact about {word}.",
    "What rhymes with {word}?",
    "Why is {word} important?",
    "Describe {word} in three words.",
]
PASSAGE_PROMPTS = [
    "Summarize the following text:\n\n{text}",
    "Continue this story:\n\n{text}",
    "Rewrite the following paragraph in simpler words.\n\n{text}",
    "What is the main idea of this passage?\n{text}",
    "Give this text a short title: {text}",
    "{text}",
    "Translate into French: {text}",
    "List three questions a reader might ask after reading this:\n\n{text}",
]
ASSISTANT_REPLIES = [
    "Sure, here is a short answer.",
    "I think the main idea is about change over time.",
    "That is an interesting question. Let me explain.",
    "Here is a first draft.",
]
FOLLOW_UPS = [
    "Can you make it shorter?",
    "Thanks. Now explain it to a child.",
    "Please continue.",
    "Could you give one more example?",
]


def load_sentences(path: Path = CORPUS) -> list[str]:
    """Split the corpus into sentences (roughly: text up to '.', '!' or '?')."""
    sentences: list[str] = []
    for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
        current: list[str] = []
        for word in paragraph.split():
            current.append(word)
            if word.endswith((".", "!", "?", '."', '?"')):
                sentences.append(" ".join(current))
                current = []
        if current:
            sentences.append(" ".join(current))
    return sentences


def log_normal_words(rng: random.Random, median: int, sigma: float, maximum: int) -> int:
    """Draw a word count from a log-normal distribution, clipped to [3, maximum]."""
    value = rng.lognormvariate(math.log(median), sigma)
    return max(3, min(maximum, round(value)))


def passage(rng: random.Random, sentences: list[str], words: int) -> str:
    """Consecutive corpus sentences from a random start, until at least `words` words."""
    start = rng.randrange(len(sentences))
    parts: list[str] = []
    count = 0
    index = start
    while count < words:
        sentence = sentences[index % len(sentences)]
        parts.append(sentence)
        count += len(sentence.split())
        index += 1
    return " ".join(parts)


def chat_prompt(rng: random.Random, sentences: list[str]) -> str:
    """One user message: a short question or an instruction around a corpus passage."""
    words = log_normal_words(rng, PROMPT_WORDS_MEDIAN, PROMPT_WORDS_SIGMA, PROMPT_WORDS_MAX)
    if words <= 8:
        word = rng.choice(rng.choice(sentences).split()).strip(".,!?\"'():;").lower()
        return rng.choice(SHORT_PROMPTS).format(word=word or "rain")
    return rng.choice(PASSAGE_PROMPTS).format(text=passage(rng, sentences, words))


def chat_request(
    index: int, rng: random.Random, sentences: list[str], width: int
) -> dict[str, Any]:
    """A /v1/chat/completions batch line."""
    messages: list[dict[str, str]] = []
    if rng.random() < SYSTEM_PROBABILITY:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": chat_prompt(rng, sentences)})
    if rng.random() < MULTI_TURN_PROBABILITY:
        messages.append({"role": "assistant", "content": rng.choice(ASSISTANT_REPLIES)})
        messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
    max_tokens = rng.choices(MAX_TOKENS_CHOICES, weights=MAX_TOKENS_WEIGHTS)[0]
    return {
        "custom_id": f"chat-{index:0{width}d}",
        "method": "POST",
        "url": "/v1/chat/completions",
        # Greedy: the demo's output is the same on every run (and never an empty sample).
        "body": {
            "model": CHAT_MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def embedding_request(
    index: int, rng: random.Random, sentences: list[str], width: int
) -> dict[str, Any]:
    """A /v1/embeddings batch line."""
    words = log_normal_words(rng, EMBED_WORDS_MEDIAN, EMBED_WORDS_SIGMA, EMBED_WORDS_MAX)
    return {
        "custom_id": f"emb-{index:0{width}d}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": EMBEDDING_MODEL, "input": passage(rng, sentences, words)},
    }


def generate(kind: str, count: int, seed: int = SEED) -> list[str]:
    """Return `count` JSONL lines (without newlines) of the given kind."""
    sentences = load_sentences()
    width = max(5, len(str(count)))
    make = chat_request if kind == "chat" else embedding_request
    lines = []
    for index in range(1, count + 1):
        rng = random.Random(f"{seed}:{kind}:{index}")
        lines.append(json.dumps(make(index, rng, sentences, width)))
    return lines


def write(kind: str, count: int, out: Path, seed: int = SEED) -> None:
    """Write a JSONL file and report its size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = generate(kind, count, seed)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}: {count} {kind} requests, {out.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(DEFAULT_COUNTS), help="default: both files")
    parser.add_argument("--count", type=int, help="number of requests (default 2000 / 500)")
    parser.add_argument("--out", type=Path, help="output file (default: the committed file)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    if args.kind is None and (args.count is not None or args.out is not None):
        parser.error("--count and --out need --kind")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    kinds = [args.kind] if args.kind else ["chat", "embeddings"]
    for kind in kinds:
        count = args.count if args.count is not None else DEFAULT_COUNTS[kind]
        out = args.out if args.out is not None else DEFAULT_FILES[kind]
        write(kind, count, out, args.seed)


if __name__ == "__main__":
    main()
