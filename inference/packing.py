"""Request batching for classification-style prompts (``batching.pack_items: k``).

k short chat items become one prompt with numbered tasks; the answer's numbered lines are
parsed back per item. A pack whose answer does not parse (or whose prompt would not fit) falls
back to one item per prompt, so packing can only save work, never lose an item.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from inference.batching import run_isolated
from inference.engines.base import Engine, Prepared
from inference.errors import ItemError
from inference.schema import Request, Result

_INSTRUCTION = (
    "You will get {n} numbered tasks. Answer every task, in order, each answer on its own line "
    "starting with its number and a colon, like '1: ...'. Write nothing else."
)
_NUMBERED = re.compile(r"^\s*(\d+)\s*[:.)]\s?(.*)$")


def pack_requests(members: list[Request]) -> Request:
    """One chat request asking for numbered answers to ``members`` (chat requests alike in
    sampling settings)."""
    lines = []
    for i, member in enumerate(members, start=1):
        question = member.messages[-1]["content"].replace("\n", " ").strip()
        lines.append(f"{i}: {question}")
    first = members[0]
    return Request(
        task="chat",
        model=first.model,
        messages=(
            {"role": "system", "content": _INSTRUCTION.format(n=len(members))},
            {"role": "user", "content": "\n".join(lines)},
        ),
        max_tokens=sum(m.max_tokens for m in members),
        temperature=first.temperature,
        top_p=first.top_p,
        stop=(),
        seed=first.seed,
    )


def unpack_answer(text: str, n: int) -> list[str] | None:
    """The answers 1..n of a packed reply, or None unless each number appears exactly once
    and in order (anything else means the model did not follow the format)."""
    answers: dict[int, list[str]] = {}
    current: int | None = None
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match and int(match.group(1)) == (current or 0) + 1:
            current = int(match.group(1))
            answers[current] = [match.group(2)]
        elif current is not None:
            answers[current].append(line)
        elif line.strip():
            return None  # text before the first answer
    if sorted(answers) != list(range(1, n + 1)):
        return None
    return ["\n".join(answers[i]).strip() for i in range(1, n + 1)]


def _packable(item: Prepared) -> bool:
    r = item.request
    # Only single-question items: a conversation's earlier turns would be lost in a pack. And
    # only plain sampling: a pack's logprobs, response format or penalties would not be the
    # item's own.
    return (
        r.task == "chat"
        and r.n == 1
        and not r.stop
        and len(r.messages) == 1
        and not r.logprobs
        and r.response_format is None
        and r.presence_penalty == 0.0
        and r.frequency_penalty == 0.0
    )


def run_packed(
    engine: Engine, batch: list[Prepared], pack_size: Callable[[Prepared], int]
) -> list[Result | ItemError]:
    """Run a batch, packing the items whose job asks for it; the rest run as they are."""
    groups: dict[tuple[int, float, float, int | None, str], list[int]] = defaultdict(list)
    singles: list[int] = []
    for i, item in enumerate(batch):
        k = pack_size(item)
        if k > 1 and _packable(item):
            r = item.request
            groups[(k, r.temperature, r.top_p, r.seed, str(item.extra.get("job")))].append(i)
        else:
            singles.append(i)
    packs: list[tuple[list[int], Prepared]] = []
    for (k, *_rest), indices in groups.items():
        for start in range(0, len(indices), k):
            chunk = indices[start : start + k]
            if len(chunk) == 1:
                singles.extend(chunk)
                continue
            try:
                packed = engine.prepare(pack_requests([batch[i].request for i in chunk]))
            except ItemError:
                singles.extend(chunk)  # too long together: run them one by one
                continue
            packs.append((chunk, packed))
    first_pass = [batch[i] for i in singles] + [p for _, p in packs]
    outputs = run_isolated(engine, first_pass) if first_pass else []
    results: list[Result | ItemError | None] = [None] * len(batch)
    for i, out in zip(singles, outputs[: len(singles)], strict=True):
        results[i] = out
    fallback: list[int] = []
    for (chunk, packed), out in zip(packs, outputs[len(singles) :], strict=True):
        answers = None
        if isinstance(out, Result) and out.output_text is not None:
            answers = unpack_answer(out.output_text, len(chunk))
        if answers is None or not isinstance(out, Result):
            fallback.extend(chunk)
            continue
        share = max(1, out.completion_tokens // len(chunk))
        for i, answer in zip(chunk, answers, strict=True):
            results[i] = Result(
                output_text=answer,
                finish_reason=out.finish_reason,
                prompt_tokens=packed.prompt_tokens // len(chunk),
                completion_tokens=share,
            )
    if fallback:
        for i, out in zip(
            fallback, run_isolated(engine, [batch[i] for i in fallback]), strict=True
        ):
            results[i] = out
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]
