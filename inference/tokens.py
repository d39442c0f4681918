"""Counting a job's tokens before it runs, as its engine will count them.

Each item's prompt tokens with the model's own tokenizer, formatted as the engines format it (a
chat through the model's chat template with the generation prompt, a completion or an embedding
input as its text with the special tokens); its output budget is ``max_tokens`` x ``n``
(embeddings have none). A remote engine's model has no local tokenizer: its prompts are counted
from their characters (the queue's rule). Past ``exact_items`` items of a pool, the rest are not
tokenized: their prompt tokens are their characters at the counted items' tokens per character,
and :meth:`Counted.note` says so.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.config import EngineConfig
from inference.schema import Request

EXACT_ITEMS = 10_000  # items of a pool counted with the tokenizer; the rest are extrapolated
TOKENIZE_BATCH = 256


class TokenCounter:
    """Prompt tokens of requests to one engine: with its model's tokenizer when the model is
    local, else from characters (``method`` says which)."""

    def __init__(self, engine: EngineConfig) -> None:
        self.tokenizer: Any = None
        self.method = "characters"
        self.unformatted = 0  # chats the model's chat template refused
        if not engine.remote:
            from inference.models import resolve_model

            self.tokenizer = load_tokenizer(str(resolve_model(engine.model)))
            self.method = "tokenizer"

    def count(self, requests: list[Request]) -> list[int]:
        if self.tokenizer is None:
            return [len(r.text) // 3 + 8 for r in requests]  # the queue's estimate_tokens
        chats = [i for i, r in enumerate(requests) if r.task == "chat"]
        texts = [r.prompt for r in requests]
        out = [0] * len(requests)
        for i in list(chats):
            try:
                texts[i] = self.tokenizer.apply_chat_template(
                    list(requests[i].messages), tokenize=False, add_generation_prompt=True
                )
            except Exception:  # the template refuses it (a role it has not): the engine will
                chats.remove(i)  # dead-letter it; count its characters
                out[i] = len(requests[i].text) // 3 + 8
                self.unformatted += 1
        chat_set = set(chats)
        plain = [i for i, r in enumerate(requests) if i not in chat_set and r.task != "chat"]
        for indices, special in ((chats, False), (plain, True)):
            if indices:
                ids = self.tokenizer([texts[i] for i in indices], add_special_tokens=special)[
                    "input_ids"
                ]
                for i, one in zip(indices, ids, strict=True):
                    out[i] = len(one)
        return out


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The model folder's tokenizer, as ``AutoTokenizer`` loads it for the engines. A folder
    with a ``tokenizer.json`` is loaded as that fast tokenizer directly (the same class and
    counts, without importing torch: seconds less per estimate); others through
    ``AutoTokenizer``."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass
class Counted:
    """The counted work of one pool's items."""

    method: str = "tokenizer"  # how the prompts were counted: tokenizer | characters
    items: int = 0
    unsupported: int = 0  # valid requests no engine here runs: dead-lettered, no engine time
    prompt_tokens: int = 0
    max_output_tokens: int = 0  # sum of max_tokens x n (generations)
    exact_items: int = 0  # items whose prompts were counted with the tokenizer
    unformatted: int = 0  # of those, chats the chat template refused (counted by characters)
    counted_chars: int = 0
    rest_chars: int = 0  # characters of the items past exact_items (extrapolated)
    _batch: list[Request] = field(default_factory=list, repr=False)

    @property
    def sampled(self) -> bool:
        return self.exact_items < self.items - self.unsupported

    @property
    def tokens_per_char(self) -> float:
        return self.prompt_tokens / self.counted_chars if self.counted_chars else 1 / 3

    def total_prompt_tokens(self) -> int:
        return self.prompt_tokens + round(self.rest_chars * self.tokens_per_char)

    def note(self) -> str:
        how = (
            "the model's tokenizer"
            if self.method == "tokenizer"
            else "characters (no local tokenizer: characters / 3 + 8 per item)"
        )
        text = f"prompt tokens counted with {how}"
        if self.sampled:
            rest = self.items - self.unsupported - self.exact_items
            text += (
                f" for the first {self.exact_items} items; the other {rest} extrapolated from "
                f"their characters at {self.tokens_per_char:.3f} tokens per character"
            )
        if self.unsupported:
            text += f"; {self.unsupported} items no engine here runs (dead letters, no time)"
        if self.unformatted:
            text += (
                f"; {self.unformatted} chats the model's chat template refuses (counted by "
                "characters; the engine will refuse them too)"
            )
        return text


def count(
    requests: Iterable[tuple[str, Request | None]],
    counters: dict[str, TokenCounter],
    exact_items: int = EXACT_ITEMS,
) -> dict[str, Counted]:
    """The work of ``(pool, request)`` pairs by pool (a None request: a valid one no engine
    here runs). ``counters`` gives each pool's :class:`TokenCounter`."""
    out: dict[str, Counted] = {}
    for pool, request in requests:
        c = out.get(pool)
        if c is None:
            c = out[pool] = Counted(method=counters[pool].method)
        c.items += 1
        if request is None:
            c.unsupported += 1
            continue
        c.max_output_tokens += request.max_tokens * request.n if request.task != "embedding" else 0
        if c.exact_items + len(c._batch) < exact_items:
            c._batch.append(request)
            if len(c._batch) >= TOKENIZE_BATCH:
                _flush(c, counters[pool])
        else:
            c.rest_chars += len(request.text)
    for pool, c in out.items():
        _flush(c, counters[pool])
    return out


def _flush(c: Counted, counter: TokenCounter) -> None:
    if not c._batch:
        return
    before = counter.unformatted
    c.prompt_tokens += sum(counter.count(c._batch))
    c.unformatted += counter.unformatted - before
    c.counted_chars += sum(len(r.text) for r in c._batch)
    c.exact_items += len(c._batch)
    c._batch = []
